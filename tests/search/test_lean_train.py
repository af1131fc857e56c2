"""Issue 19: lean trials (what a trial's seconds cover, packed checkpoints, the clip), the compile option on CPU,
and the GPU check's line on a machine without CUDA."""

import contextlib
import math
import os
import subprocess
import sys
import time
import zipfile

import pytest
import torch

import einstruct as es
from search import checkpoints, step, tasks, train
from search.errors import SearchError

from .test_tasks import TINY_REGRESSION

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def task():
    return tasks.get("regression", **TINY_REGRESSION)


def test_seconds_cover_model_construction(task, monkeypatch):
    """Result.seconds runs from model construction to the last evaluation (it used to start after construction)."""
    build = type(task).build

    def slow_build(self, *a, **k):
        time.sleep(0.3)
        return build(self, *a, **k)

    monkeypatch.setattr(type(task), "build", slow_build)
    _, per_step = train.plan(task, None, 16, 1.0)
    t0 = time.perf_counter()
    r = train.run(task, None, 16, 3 * per_step, seed=0, device="cpu", evals=1)
    assert 0.3 <= r.seconds <= time.perf_counter() - t0
    assert r.compile_seconds == 0.0


def test_clip_is_torchs_clip_grad_norm(task):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in ((3, 4), (5,), (2, 2, 2))]
    for p in params:
        p.grad = torch.randn_like(p) * 10
    ref = [p.grad.clone() for p in params]
    refs = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for r, g in zip(refs, ref):
        r.grad = g
    torch.nn.utils.clip_grad_norm_(refs, 1.0)
    step.clip_(params, 1.0)
    assert all(torch.equal(p.grad, r.grad) for p, r in zip(params, refs))
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    assert abs(float(total) - 1.0) < 1e-5  # clipped to max_norm


def test_packed_state_round_trips_in_few_tensors(task, tmp_path):
    model = task.build(es.presets.btt(rank=1), 16)
    opt = step.optimizer(task.param_groups(model, 1e-3), 1e-3, task.hyper)
    model(torch.randn(4, task.config.inputs)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "n": [1, 2.5]}
    path = str(tmp_path / "c.pt")
    train.save_checkpoint(path, state)
    back = checkpoints.unpack(torch.load(path, weights_only=True))
    assert back["n"] == [1, 2.5] and torch.equal(back["rng"], state["rng"])
    for k, v in state["model"].items():
        assert back["model"][k].dtype == v.dtype and torch.equal(back["model"][k], v)
    for i, s in state["optimizer"]["state"].items():
        assert all(torch.equal(back["optimizer"]["state"][i][k], t) for k, t in s.items())
    with zipfile.ZipFile(path) as z:  # one storage record per dtype, not one per tensor
        records = [n for n in z.namelist() if "/data/" in n]
    dtypes = {str(t.dtype) for t in [*state["model"].values(), state["rng"]]} | {"torch.float32"}
    assert len(records) <= len(dtypes) < len(state["model"])
    assert checkpoints.load_checkpoint(path) is not None
    torch.save(state, path)  # the previous format (plain state dicts) is not resumed
    assert checkpoints.load_checkpoint(path) is None


def test_a_run_resumed_from_its_checkpoint_ends_as_an_uninterrupted_one(task, tmp_path):
    spec = es.presets.btt(rank=1)
    _, per_step = train.plan(task, spec, 16, 1.0)
    whole = train.run(task, spec, 16, 45 * per_step, seed=3)
    ckpt = str(tmp_path / "run.pt")

    def die(info):
        if info["step"] == 30:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.run(task, spec, 16, 45 * per_step, seed=3, checkpoint=ckpt, checkpoint_every=20, callback=die)
    assert train.checkpoint_step(ckpt) == 20
    r = train.run(task, spec, 16, 45 * per_step, seed=3, checkpoint=ckpt, checkpoint_every=20)
    assert r.resumed_step == 20
    assert r.curve == whole.curve and r.train_curve == whole.train_curve


def test_compile_on_cpu_follows_the_eager_losses_and_charges_no_flops():
    from torch._dynamo.utils import counters

    task = tasks.get("regression", **{**TINY_REGRESSION, "depth": 1})  # one block: the least to compile
    spec = es.presets.btt(rank=1)
    _, per_step = train.plan(task, spec, 16, 1.0)
    kw = dict(seed=0, device="cpu", evals=2, check_every=1)
    eager = train.run(task, spec, 16, 6 * per_step, **kw)
    graphs = counters["stats"]["unique_graphs"]
    comp = train.run(task, spec, 16, 6 * per_step, compile="default", **kw)
    assert counters["stats"]["unique_graphs"] > graphs  # it did compile
    assert comp.steps == eager.steps == 6 and comp.train_flops == eager.train_flops == 6 * per_step
    assert comp.settings["compile"] == "default" and eager.compile_seconds == 0.0
    assert 0 < comp.compile_seconds <= comp.seconds  # reported apart, and inside the run's time
    for (fa, la), (fb, lb) in zip(eager.train_curve, comp.train_curve):
        assert fa == fb and math.isclose(la, lb, rel_tol=1e-4, abs_tol=1e-6)
    for (_, la), (_, lb) in zip(eager.curve, comp.curve):
        assert math.isclose(la, lb, rel_tol=1e-4, abs_tol=1e-6)


@pytest.mark.parametrize(
    "mode, match", [("fast", "compile mode 'fast' is not known"), ("reduce-overhead", "needs --device cuda")]
)
def test_bad_compile_modes(task, mode, match):
    with pytest.raises(SearchError, match=match):
        train.run(task, None, 16, 1e6, device="cpu", compile=mode)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA line is for machines without a GPU")
def test_gpu_check_without_cuda_says_so_in_one_line():
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu"], env=env, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU here" in lines[0] and not done.stderr.strip()


@pytest.mark.parametrize("decay", [0.0, 0.1])
def test_direct_fused_update_is_optimizer_step(task, decay):
    """Step's direct fused AdamW call changes parameters and moments exactly as optimizer.step() does."""
    models = [task.build(es.presets.btt(rank=1), 16, seed=1) for _ in range(2)]
    groups = [[{**g, "weight_decay": decay} for g in task.param_groups(m, 3e-3)] for m in models]
    opts = [step.optimizer(g, 3e-3, task.hyper) for g in groups]
    assert all(o.defaults.get("fused") for o in opts)
    steps = [step.Step(task.loss, m, m, o, task.hyper.clip) for m, o in zip(models, opts)]
    steps[1].fused = False  # the reference: optimizer.step()
    gen = [torch.Generator().manual_seed(0) for _ in range(2)]
    calls = []
    plain_step = opts[0].step
    opts[0].step = lambda: calls.append(1) or plain_step()
    task.prepare(0)
    for i in range(4):
        losses = [s(task.batch(i, g, "cpu"), 0.5 * (i + 1), contextlib.nullcontext()) for s, g in zip(steps, gen)]
        assert torch.equal(losses[0], losses[1])
    assert len(calls) == 1  # optimizer.step() made the state at step 1; the direct update did steps 2-4
    for pa, pb in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(pa, pb)
        sa, sb = opts[0].state[pa], opts[1].state[pb]
        assert all(torch.equal(sa[k], sb[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    assert [g["lr"] for g in opts[0].param_groups] == [g["lr"] for g in opts[1].param_groups]


def test_search_refuses_cuda_graphs_on_cpu_in_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "search.run", "--compile", "reduce-overhead", "--device", "cpu", "--dry-run"]
    done = subprocess.run([*cmd, "--out", str(tmp_path / "s")], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "search.run: error: --compile reduce-overhead uses CUDA graphs and needs --device cuda; use --compile default"
    ]


class _Flagged(torch.nn.Module):
    """Remembers the mode it was called in."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.seen: list[bool] = []

    def forward(self, x):
        self.seen.append(self.training)
        return self.lin(x)


class _OwnTrain(_Flagged):
    def train(self, mode: bool = True):
        self.switched = getattr(self, "switched", 0) + 1
        return super().train(mode)


def test_mode_setter_is_module_train():
    """The evaluation's mode switch sets what Module.train sets, on every module; a model that overrides
    train() gets its own method called."""
    model = torch.nn.Sequential(_Flagged(), torch.nn.Sequential(torch.nn.Dropout(0.5), _Flagged()))
    set_training = train.mode_setter(model)
    for mode in (False, True, False):
        set_training(mode)
        assert [m.training for m in model.modules()] == [mode] * len(list(model.modules()))
    own = torch.nn.Sequential(_OwnTrain())
    set_training = train.mode_setter(own)
    set_training(False)
    assert own[0].switched == 1 and not own[0].training and not own.training


def test_evaluation_runs_in_eval_mode_and_training_in_train_mode(task, monkeypatch):
    """A trial's training steps see training=True, its evaluations training=False."""
    modes = {"train": set(), "eval": set()}
    loss, eval_loss = type(task).loss, type(task).eval_loss

    def spy_loss(self, model, batch):
        modes["train"].update(m.training for m in model.modules())
        return loss(self, model, batch)

    def spy_eval(self, model, device):
        modes["eval"].update(m.training for m in model.modules())
        return eval_loss(self, model, device)

    monkeypatch.setattr(type(task), "loss", spy_loss)
    monkeypatch.setattr(type(task), "eval_loss", spy_eval)
    _, per_step = train.plan(task, es.presets.btt(rank=1), 16, 1.0)
    train.run(task, es.presets.btt(rank=1), 16, 6 * per_step, seed=0, device="cpu", evals=3)
    assert modes == {"train": {True}, "eval": {False}}
