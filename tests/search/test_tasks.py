"""Each task's FLOPs per step equal FlopCounterMode's count of one training step; data errors are clear."""

import os
import pickle

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import einstruct as es
from search import tasks
from search.errors import DataError, SearchError

from .conftest import write_cifar

TINY_REGRESSION = dict(pool=2048, eval_size=512, batch=32, teacher_width=32, teacher_depth=2)
TINY_LM = dict(context=32, batch=4, depth=2, d_head=32, explicit_attention=True)


def counted_step_flops(task, model, seed=0):
    task.prepare(seed)
    batch = task.batch(0, torch.Generator().manual_seed(seed), "cpu")
    with FlopCounterMode(display=False) as fc:
        task.loss(model, batch).backward()
    return fc.get_total_flops()


SPECS = [
    None,
    es.presets.btt(rank=1),
    es.presets.btt(rank=2),
    es.presets.low_rank(rank=4),
    es.presets.monarch(blocks=2),
    es.presets.kron(),
    es.theta(0.5, 0.25, 0.25, 0.25, 0.5, 0.25, 0.25),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: getattr(s, "label", "dense"))
def test_regression_flops_per_step_match_flop_counter(spec):
    task = tasks.get("regression", **TINY_REGRESSION)
    model = task.build(spec, 64)
    assert task.flops_per_step(model) == counted_step_flops(task, model)


@pytest.mark.parametrize("spec", SPECS[:4], ids=lambda s: getattr(s, "label", "dense"))
def test_lm_flops_per_step_match_flop_counter(corpus, spec):
    task = tasks.get("lm", data=corpus, **TINY_LM)
    model = task.build(spec, 64)
    assert task.flops_per_step(model) == counted_step_flops(task, model)


def test_lm_attention_is_counted_analytically_without_causal_halving(corpus):
    task = tasks.get("lm", data=corpus, **TINY_LM)
    c = task.config
    assert task.extra_train_flops(64) == 3 * c.depth * (2 * 2 * c.context * 64) * c.batch * c.context


def test_lm_sdpa_and_explicit_attention_agree(corpus):
    fast = tasks.get("lm", data=corpus, **{**TINY_LM, "explicit_attention": False})
    slow = tasks.get("lm", data=corpus, **TINY_LM)
    m1, m2 = fast.build(es.presets.btt(rank=1), 64, seed=3), slow.build(es.presets.btt(rank=1), 64, seed=3)
    for p in m1.parameters():  # zero-init query/head would make both trivially equal: perturb
        torch.nn.init.normal_(p, std=0.05) if p.dim() > 1 else None
    m2.load_state_dict(m1.state_dict())
    x = torch.randint(0, fast.vocab, (2, 32))
    torch.testing.assert_close(m1(x), m2(x), atol=1e-5, rtol=1e-4)
    assert fast.flops_per_step(m1) == slow.flops_per_step(m2)


@pytest.mark.parametrize("spec", SPECS[:3], ids=lambda s: getattr(s, "label", "dense"))
def test_cifar_flops_per_step_match_flop_counter(cifar_dir, spec):
    task = tasks.get("cifar", data=cifar_dir, batch=32, eval_size=48)
    model = task.build(spec, 64)
    assert task.flops_per_step(model) == counted_step_flops(task, model)


def test_lm_encoding_maps_96_symbols_and_others_to_question_mark(tmp_path):
    from search.tasks.lm import decode, encode_text

    ids = encode_text("a b\n~\té".encode())
    assert ids.max() < 96
    assert decode(ids) == "a b\n~???"  # tab and the two bytes of é become '?'


def test_lm_beats_unigram_entropy_quickly(corpus):
    from search import train

    task = tasks.get("lm", data=corpus, context=32, batch=8, depth=1, d_head=32)
    r = train.run(task, es.presets.btt(rank=1), width=64, train_flops=6e9, seed=0, evals=2)
    assert r.loss < task.unigram_entropy() - 0.3


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: tasks.get("lm", data=str(p / "missing.txt")), "does not exist"),
        (lambda p: tasks.get("lm"), "needs data="),
        (lambda p: tasks.get("lm", data=str(p)), "is a folder"),
        (lambda p: (p / "empty.txt").write_text("") or tasks.get("lm", data=str(p / "empty.txt")), "empty"),
        (
            lambda p: (p / "short.txt").write_text("hello world " * 10) and tasks.get("lm", data=str(p / "short.txt")),
            "shorter than one",
        ),
        (
            lambda p: (p / "bin.txt").write_bytes(b"\x00\x01\x02" * 100) and tasks.get("lm", data=str(p / "bin.txt")),
            "looks binary",
        ),
        (
            lambda p: (p / "odd.bin").write_bytes(b"\x00" * 301) and tasks.get("lm", data=str(p / "odd.bin")),
            "odd number of bytes",
        ),
        (lambda p: tasks.get("cifar", data=str(p / "nope")), "does not exist"),
        (lambda p: tasks.get("cifar", data=str(p)), "holds no CIFAR batches"),
        (lambda p: tasks.get("nonsense"), "unknown task"),
        (lambda p: tasks.get("regression", config="huge"), "unknown regression config"),
        (lambda p: tasks.get("regression", widht=3), "settings are"),
    ],
)
def test_bad_data_and_settings_give_clear_errors(tmp_path, make, match):
    with pytest.raises(SearchError, match=match):
        make(tmp_path)


def test_cifar_refuses_a_pickle_that_would_run_code(tmp_path):
    folder = tmp_path / "evil"
    write_cifar(folder)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(DataError, match="not a CIFAR python pickle"):
        tasks.get("cifar", data=str(folder))


def test_cifar_too_few_images_for_one_batch(tmp_path):
    folder = write_cifar(tmp_path / "small", n_train=10, n_test=5)
    with pytest.raises(DataError, match="fewer than one batch"):
        tasks.get("cifar", data=folder, batch=32)


def test_cifar_pixels_are_shuffled_by_a_fixed_permutation(cifar_dir):
    a = tasks.get("cifar", data=cifar_dir, batch=32)
    b = tasks.get("cifar", data=cifar_dir, batch=32)
    c = tasks.get("cifar", data=cifar_dir, batch=32, permutation_seed=1)
    assert torch.equal(a.train_x, b.train_x) and not torch.equal(a.train_x, c.train_x)
    # the same pixels in another order
    assert torch.equal(a.train_x.sort(dim=1).values, c.train_x.sort(dim=1).values)


@pytest.mark.parametrize("width", [64, 128])
@pytest.mark.parametrize("spec", [None, es.presets.btt(rank=1)], ids=["dense", "btt"])
def test_cifar_input_rate_goes_to_the_input_layer_only(cifar_dir, spec, width):
    # At the base width every layer once looked like an input layer and trained at 0.1x (issue 14, 6).
    task = tasks.get("cifar", data=cifar_dir, batch=32, eval_size=48)
    assert task.base_width == 64 and task.hyper.input_lr_mult == 0.1
    model = task.build(spec, width)
    lr = 1e-3
    rates = {id(p): g["lr"] / lr for g in task.param_groups(model, lr) for p in g["params"]}
    first = next(m for m in model.modules() if isinstance(m, (torch.nn.Linear, es.StructuredLinear)))
    first_ids = {id(p) for p in first.parameters() if p.dim() >= 2}
    for name, p in model.named_parameters():
        if id(p) in first_ids:
            assert rates[id(p)] <= 0.1 + 1e-12, name  # the layer fed by pixels (times kappa for cores)
        elif p.dim() >= 2:
            assert rates[id(p)] > 0.1 * 64 / width + 1e-12 or "head" in name, (name, rates[id(p)])
