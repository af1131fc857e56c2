"""Regressions of issue 14 (defects 1, 2, 4): weights read live in every mode, autocast in both grad modes,
FLOPs that do not depend on where they are asked for. The systematic matrix is tests/layers/test_mode_matrix.py."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import einstruct as es
from einstruct.layers.linear import StructuredLinear

from .test_linear import PRESETS, einsum_reference
from .test_linear_fast import _seed, counted  # noqa: F401 (_seed: the autouse seed fixture)

P = es.presets


def truth(layer, x):
    with torch.no_grad():
        return einsum_reference(layer, x) + layer.bias


def _step(layer, opt, x):
    layer(x).square().mean().backward()
    opt.step()
    opt.zero_grad()


OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-1, fused=True),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-1, fused=True),
}


@pytest.mark.parametrize("rows", [1, 8, 64])
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_no_grad_forward_sees_fused_optimizer_steps(opt, rows):
    # Fused steps do not bump version counters: a cache keyed on them served the first weights forever.
    layer = StructuredLinear(256, 256, P.btt(rank=2))
    x = torch.randn(rows, 256)
    with torch.no_grad():
        layer(x)  # the first evaluation
    optimizer = OPTIMIZERS[opt](layer.parameters())
    _step(layer, optimizer, torch.randn(16, 256))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), truth(layer, x), atol=1e-5, rtol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), truth(layer, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("rows", [1, 8, 64])
def test_no_grad_forward_sees_edits_through_data(rows, normalize):
    layer = StructuredLinear(256, 256, P.btt(rank=2), normalize=normalize)
    x = torch.randn(rows, 256)
    with torch.no_grad():
        layer(x)
    layer.R.data.mul_(2)  # EMA and clipping idioms write through .data
    if normalize:
        layer.gains["L"].data.mul_(3)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), truth(layer, x), atol=1e-5, rtol=1e-5)
    layer.L.data = torch.randn_like(layer.L)  # a new tensor behind the same parameter
    with torch.no_grad():
        torch.testing.assert_close(layer(x), truth(layer, x), atol=1e-5, rtol=1e-5)


def test_inference_cache_scope_is_fast_path_and_ends_with_the_scope():
    layer = StructuredLinear(256, 256, P.btt(rank=2))
    assert layer.dense_rows == 16
    x = torch.randn(4, 256)
    st = layer.structure
    with torch.no_grad():  # outside a scope nothing is cached: the factored chain, every call
        assert layer.flops(4) == counted(lambda: layer(x)) == st.flops * 4
        with es.inference_cache(layer):
            assert layer.flops(4) == 2 * 256 * 256 * 4  # the materialised matrix, once built
            first = counted(lambda: layer(x))
            assert first == st.flops * 256 + 2 * 256 * 256 * 4  # building it: st.flops per input column
            assert counted(lambda: layer(x)) == layer.flops(4)
            torch.testing.assert_close(layer(x), truth(layer, x), atol=1e-5, rtol=1e-5)
        assert layer._cache == {}  # dropped with the scope
        assert layer.flops(4) == st.flops * 4
    # A fused step after the scope is seen by the next one.
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, fused=True)
    _step(layer, opt, torch.randn(16, 256))
    with torch.no_grad(), es.inference_cache(layer):
        torch.testing.assert_close(layer(x), truth(layer, x), atol=1e-5, rtol=1e-5)


def test_inference_cache_takes_a_model_and_nests():
    model = torch.nn.Sequential(
        StructuredLinear(64, 64, P.btt(rank=1)), torch.nn.ReLU(), StructuredLinear(64, 32, P.kron())
    )
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = model(x)
        with es.inference_cache(model):
            with es.inference_cache(model[0]):
                torch.testing.assert_close(model(x), ref)
            assert model[0]._cache  # the outer scope still holds it
            torch.testing.assert_close(model(x), ref)
    assert model[0]._cache == {} and model[2]._cache == {}
    with pytest.raises(es.SpecError, match=r"nn\.Module"):
        with es.inference_cache("not a model"):
            pass


PATHS = {  # (grad mode, rows, builtin_rows override): every way a forward can run
    "builtin": (True, 8, None),
    "custom Functions": (True, 8, 0),
    "no-grad chain": (False, 64, None),
    "cached dense": (False, 4, None),
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name", ["btt1", "btt3", "monarch4", "tt2", "kron", "low_rank3", "dense"])
def test_every_path_runs_under_bf16_autocast(name, path):
    grad, rows, builtin = PATHS[path]
    layer = StructuredLinear(256, 256, PRESETS[name]())
    with torch.no_grad():
        layer.bias.normal_()
    if builtin is not None:
        layer.builtin_rows = builtin
    x = torch.randn(rows, 256)
    ref = truth(layer, x)
    with torch.set_grad_enabled(grad), es.inference_cache(layer), torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        assert counted(lambda: layer(x)) == layer.flops(rows)
    assert y.dtype == torch.bfloat16  # as nn.Linear under autocast
    err = (y.float() - ref).norm() / ref.norm()
    assert err < 2e-2, f"{name} {path}: relative error {err:.3g} against float32"
    if grad:  # gradients flow in float32 parameters
        y.float().square().mean().backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters())


def test_issue_reproduction_bf16_no_grad_btt():
    layer = StructuredLinear(1024, 1024, P.btt(rank=2))
    x = torch.randn(8, 1024)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    ref = truth(layer, x)
    assert (y.float() - ref).norm() / ref.norm() < 2e-2


def test_summary_does_not_depend_on_grad_mode():
    model = torch.nn.Sequential(StructuredLinear(256, 256, P.btt(rank=1)), torch.nn.Linear(256, 10))
    train = es.summary(model)
    with torch.no_grad():
        nograd = es.summary(model)
    with torch.no_grad(), es.inference_cache(model):
        cached = es.summary(model)
    assert train == nograd == cached
    row = train.row("0")
    assert row.flops == model[0].structure.flops == 16384  # the training path, per example
    assert row.inference_flops == 2 * 256 * 256  # a cached no-grad batch of at most dense_rows rows
    assert "inference" in str(train)


@pytest.mark.parametrize("dispatch", ["dense", "sparse"])
@pytest.mark.parametrize("spec", ["btt", "kron"])
def test_moe_flops_equal_the_counter_in_every_mode(spec, dispatch):
    layer = es.MoE(64, 64, experts=4, active=2, spec=spec, dispatch=dispatch)
    x = torch.randn(512, 64)
    for grad in (True, False):
        for scope in (False, True):
            with torch.set_grad_enabled(grad):
                if scope:
                    with es.inference_cache(layer):
                        n = counted(lambda: layer(x))
                        assert layer.flops(512) == n
                else:
                    assert layer.flops(512) == counted(lambda: layer(x))


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize(
    "kind, dispatch",
    [
        (k, d)
        for k in ("btt_moe", "moe_btt", "moe_dense")
        for d in ("dense", "sparse", "tiled")
        if (k, d) != ("moe_btt", "tiled")
    ],
)
def test_moe_layers_run_under_bf16_autocast_in_both_grad_modes(kind, dispatch, grad):
    make = {
        "btt_moe": lambda: es.BTTMoE(64, 64, experts=4, active=2, dispatch=dispatch),
        "moe_btt": lambda: es.MoE(64, 64, experts=4, active=2, spec="btt", dispatch=dispatch),
        "moe_dense": lambda: es.MoE(64, 64, experts=4, active=2, dispatch=dispatch),
    }
    layer = make[kind]()
    x = torch.randn(33, 64)
    with torch.no_grad():
        ref = layer(x)
    with torch.set_grad_enabled(grad), es.inference_cache(layer), torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        assert counted(lambda: layer(x)) == layer.flops(33)
    assert y.dtype == torch.bfloat16
    assert (y.float() - ref).norm() / ref.norm() < 2e-2


def test_summary_and_training_flops_count_gpt2_conv1d():
    from search.flops import model_train_flops

    from .test_dropin import Conv1D

    model = torch.nn.Sequential(Conv1D(48, 32), torch.nn.GELU(), StructuredLinear(48, 16, P.kron()))
    s = es.summary(model)
    assert (s.row("0").in_features, s.row("0").out_features, s.row("0").flops) == (32, 48, 2 * 32 * 48)
    x = torch.randn(7, 32)
    with FlopCounterMode(display=False) as fc:
        model(x).sum().backward()  # the Conv1D is fed by data: no input gradient for it
    assert model_train_flops(model, 7, data_fed=frozenset({"0"})) == fc.get_total_flops()
    with torch.no_grad():
        assert model_train_flops(model, 7, data_fed=frozenset({"0"})) == fc.get_total_flops()
