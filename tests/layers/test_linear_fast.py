"""StructuredLinear's fast paths: strided views, the graph-free chain, the cached dense matrix, exact FLOPs."""

import contextlib
import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import einstruct as es
from einstruct.layers.layerplan import ANY_BATCH
from einstruct.layers.linear import StructuredLinear, default_dense_rows

from .test_linear import PRESETS, check_against_dense

P = es.presets
FAST = {
    **{k: PRESETS[k] for k in ("dense", "low_rank3", "kron", "tt2", "btt1", "btt3", "monarch4", "block_diag4")},
    "theta_a": lambda: es.theta(0.5, 0.25, 0.25, 0.25, 0.5, 0.25, 0.25),
    "theta_b": lambda: es.theta(0.75, 0, 0.25, 0, 0.75, 0.25, 0.25),
}
SIZES = [(64, 64), (144, 36), (256, 256)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def counted(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def reference(layer, x):
    w = layer.to_dense().detach()
    return x @ w.T + layer.bias.detach()


@pytest.mark.parametrize("d_in, d_out", SIZES)
@pytest.mark.parametrize("name", list(FAST))
def test_every_path_equals_the_dense_matrix_float64(name, d_in, d_out):
    layer = StructuredLinear(d_in, d_out, FAST[name](), dtype=torch.float64)
    with torch.no_grad():
        layer.bias.normal_()
    for rows in (1, 2, 7):  # one row has degenerate strides: no views there
        x = torch.randn(rows, d_in, dtype=torch.float64)
        ref = reference(layer, x)
        with torch.no_grad():
            y_live = layer(x)  # graph-free chain on the live cores
            with es.inference_cache(layer):
                y_auto = layer(x)  # dense or graph-free chain, by the rule
                layer.dense_rows, saved = 0, layer.dense_rows
                y_chain = layer(x)  # graph-free chain on cached step cores
                layer.dense_rows = saved
        with torch.inference_mode():
            y_inf = layer(x)
        for y in (y_live, y_auto, y_chain, y_inf):
            torch.testing.assert_close(y, ref, atol=1e-11, rtol=0)
    # Graph path (strided views where the plan allows): forward and every gradient, at 1 and 15 rows.
    for lead in ((1,), (3, 5)):
        layer.zero_grad()
        check_against_dense(layer, lead=lead, atol=1e-10)


@pytest.mark.parametrize("name", ["btt1", "btt3", "monarch4", "theta_a", "kron", "tt2"])
def test_float32_paths_agree_loosely(name):
    layer = StructuredLinear(1024, 1024, FAST[name]())
    with torch.no_grad():
        layer.bias.normal_()
    w64 = layer.double().to_dense().detach()
    layer.float()
    for rows in (1, 16, 300):
        x = torch.randn(rows, 1024)
        ref = (x.double() @ w64.T + layer.bias.double()).float()
        xg = x.clone().requires_grad_(True)
        y = layer(xg)
        with torch.no_grad():
            y_plain = layer(x)
        for got in (y, y_plain):
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
        c = torch.randn_like(y)
        (y * c).sum().backward()
        torch.testing.assert_close(xg.grad, (c.double() @ w64).float(), atol=1e-4, rtol=1e-4)


def test_dense_rows_rule():
    small = StructuredLinear(256, 256, P.btt(rank=1))
    assert small.dense_rows == default_dense_rows(small.structure, 256, 256) == 16
    assert StructuredLinear(512, 512, P.btt(rank=1)).dense_rows == 16  # 2^22 MACs / 512^2
    assert StructuredLinear(512, 1024, P.btt(rank=1)).dense_rows == 0  # weight 2^19 > 2^18
    assert StructuredLinear(1024, 1024, P.btt(rank=1)).dense_rows == 0  # weight over 2^18 elements
    assert StructuredLinear(64, 64, P.dense()).dense_rows == 0  # no fewer FLOPs than dense
    assert StructuredLinear(64, 64, P.low_rank(rank=64)).dense_rows == 0


@pytest.mark.parametrize("name", ["btt1", "monarch4", "theta_a", "tt2"])
@pytest.mark.parametrize("d", [32, 64, 128])
def test_small_weights_run_every_cached_batch_dense(name, d):
    # At most 2^14 weights and a chain that copies: every cached no-grad batch runs on the dense matrix,
    # and flops() reports what runs (the FLOP counter's count), at the eval batch the search uses too.
    layer = StructuredLinear(d, d, FAST[name]())
    assert layer._plan.chain.layout.cost > 0
    assert layer.dense_rows == default_dense_rows(layer.structure, d, d, layer._plan) == ANY_BATCH
    x = torch.randn(4096, d)
    with torch.no_grad():
        chain = layer(x)
        with es.inference_cache(layer):
            layer(x[:1])  # built on first use
            assert layer.flops(4096) == counted(lambda: layer(x)) == 2 * d * d * 4096
            torch.testing.assert_close(layer(x), chain, atol=1e-5, rtol=1e-5)
    assert layer.flops(4096) == layer.structure.flops * 4096  # outside the scope: the chain


def test_dense_rows_any_batch_needs_a_small_weight_and_a_copying_chain():
    low = StructuredLinear(64, 64, P.low_rank(rank=4))  # one plain matmul after another: nothing copied
    assert low._plan.chain.layout.cost == 0 and low.dense_rows == 16
    assert StructuredLinear(256, 256, FAST["theta_a"]()).dense_rows == 16  # 2^16 weights: the chain
    assert StructuredLinear(128, 256, P.btt(rank=1)).dense_rows == 16  # 2^15 weights
    layer, other = StructuredLinear(64, 64, P.btt(rank=1)), StructuredLinear(64, 64, P.btt(rank=1))
    layer.dense_rows = 3  # a threshold the user set survives re-planning; a default one is recomputed
    free = dataclasses.replace(es.layers.costs.CPU, copy=0, scattered=0, form=0, source="test: copies free")
    es.use_cost_table(free)
    try:
        layer.to(torch.float64)
        other.to(torch.float64)
        assert layer._plan.costs == other._plan.costs == free
        assert layer.dense_rows == 3
        assert other._plan.chain.layout.cost == 0 and other.dense_rows == 16
    finally:
        es.use_cost_table(None)


@pytest.mark.parametrize("name", ["btt1", "monarch4", "theta_a", "tt2"])
def test_flops_reports_the_path_that_runs(name):
    layer = StructuredLinear(256, 256, FAST[name]())
    st = layer.structure
    assert layer.dense_rows == 16
    dense_row = 2 * 256 * 256
    cache = es.inference_cache(layer)
    with torch.no_grad(), cache:  # the first call in the scope materialises: st.flops per input column
        assert counted(lambda: layer(torch.randn(2, 256))) == st.flops * 256 + dense_row * 2
    for rows in (1, 16, 17, 64):
        x = torch.randn(rows, 256)
        with torch.no_grad(), es.inference_cache(layer):
            layer(x)  # built on first use
            expected = dense_row * rows if rows <= 16 else st.flops * rows
            assert layer.flops(rows) == counted(lambda x=x: layer(x)) == expected
        with torch.no_grad():  # outside a scope: the chain on the live cores
            assert layer.flops(rows) == counted(lambda x=x: layer(x)) == st.flops * rows
        # Grad mode on: always the factored chain, whatever the batch.
        assert layer.flops(rows) == counted(lambda x=x: layer(x)) == st.flops * rows
    layer.dense_rows = 0  # the user can turn the dense path off
    with torch.no_grad(), es.inference_cache(layer):
        assert layer.flops(4) == counted(lambda: layer(torch.randn(4, 256))) == st.flops * 4


@pytest.mark.parametrize("dense_rows", [16, 0])
@pytest.mark.parametrize("normalize", [False, True])
def test_inference_caches_follow_versioned_changes_inside_a_scope(dense_rows, normalize):
    # Inside es.inference_cache the caches are also keyed by versions: ordinary in-place changes (a
    # foreach/for-loop optimizer step, load_state_dict, .to()) are seen even there (best effort; fused
    # steps and .data edits are not, which is why nothing is cached outside a scope).
    scope = contextlib.ExitStack()
    layer = StructuredLinear(256, 256, P.btt(rank=2), normalize=normalize)
    scope.enter_context(es.inference_cache(layer))
    layer.dense_rows = dense_rows
    x, target = torch.randn(8, 256), torch.randn(8, 256)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    with torch.no_grad():
        y0 = layer(x)
    for _ in range(2):
        ((layer(x) - target) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            y = layer(x)
        assert not torch.allclose(y, y0)
        torch.testing.assert_close(y, reference(layer, x), atol=1e-5, rtol=1e-5)
        y0 = y
    if normalize:  # a gain changed in place is seen too
        with torch.no_grad():
            layer.gains[layer.core_names[0]].mul_(2.0)
            torch.testing.assert_close(layer(x), reference(layer, x), atol=1e-5, rtol=1e-5)
    # load_state_dict copies in place: the cache follows; state_dict carries no cache.
    other = StructuredLinear(256, 256, P.btt(rank=2), normalize=normalize)
    other.dense_rows = dense_rows
    scope.enter_context(es.inference_cache(other))
    with torch.no_grad():
        other(x)  # fill its cache with its own weights first
        assert other._cache
    sd = layer.state_dict()
    expected = {"bias", *layer.core_names} | ({f"gains.{n}" for n in layer.core_names} if normalize else set())
    assert set(sd) == expected
    other.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(other(x), layer(x), atol=0, rtol=0)
    # A dtype change gives new tensors: the cache is rebuilt.
    other.double()
    with torch.no_grad():
        torch.testing.assert_close(other(x.double()), reference(other, x.double()), atol=1e-10, rtol=0)
    scope.close()
    assert layer._cache == other._cache == {}


def test_dense_path_needs_no_grad_mode_and_keeps_shapes():
    layer = StructuredLinear(128, 64, P.kron())
    assert layer.dense_rows == ANY_BATCH  # 8192 weights, a chain that copies
    x = torch.randn(2, 3, 128)
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (2, 3, 64)
    # With grad mode on the chain runs and gradients flow, whatever the batch.
    x.requires_grad_(True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.A.grad is not None
    # Frozen weights under grad mode still run the chain (the rule is grad mode only).
    for p in layer.parameters():
        p.requires_grad_(False)
    assert layer.flops(6) == layer.structure.flops * 6 == counted(lambda: layer(torch.randn(6, 128)))


def test_compiled_inference_runs_the_chain():
    layer = StructuredLinear(256, 256, P.btt(rank=2))
    x = torch.randn(4, 256)
    compiled = torch.compile(layer, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(FAST))
def test_torch_func_vmap_and_grad_equal_the_eager_layer(name):
    # Under torch.func the strided out= paths (writing into y, permute + bias in one pass) step aside.
    layer = StructuredLinear(144, 36, FAST[name](), dtype=torch.float64)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(3, 5, 144, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(layer)(x), x @ layer.to_dense().detach().T + layer.bias.detach())
    per_example = torch.func.vmap(torch.func.grad(lambda xi: layer(xi).square().sum()))(x)
    xg = x.clone().requires_grad_(True)
    layer(xg).square().sum().backward()
    torch.testing.assert_close(per_example, xg.grad)


def graph_nodes(y) -> set[str]:
    """Names of the autograd nodes behind ``y`` (custom Functions of einstruct start with '_')."""
    seen, todo, names = set(), [y.grad_fn], set()
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        names.add(type(f).__name__)
        todo.extend(g for g, _ in f.next_functions)
    return names


def test_builtin_rows_rule_and_both_training_paths_agree():
    # Training batches that materialise fewer than 2^22 elements run the plain-form layout.
    layer = StructuredLinear(1024, 1024, FAST["btt3"](), dtype=torch.float64)
    assert layer.builtin_rows == ((1 << 22) - 1) // layer._row_elems
    assert 0 < layer.builtin_rows < 1024
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(40, 1024, dtype=torch.float64)
    c = torch.randn(40, 1024, dtype=torch.float64)
    out = {}
    for rows in (40, 39):  # 40 rows on the plain-form layout, then on the cost-model one
        layer.builtin_rows = rows
        layer.zero_grad()
        xg = x.clone().requires_grad_(True)
        y = layer(xg)
        (y * c).sum().backward()
        out[rows] = [y.detach(), xg.grad] + [p.grad.clone() for p in layer.parameters()]
        assert graph_nodes(y) >= {"_ChainBackward"}  # the whole chain is one custom Function
        assert y.grad_fn.route is (layer._plan.small if rows == 40 else layer._plan.chain)
        assert counted(lambda x=xg: layer(x)) == layer.flops(40)  # the same matmuls either way
    for a, b in zip(out[40], out[39]):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_layers_of_one_structure_share_their_plan_and_meta_layers_draw_nothing():
    a, b = StructuredLinear(64, 64, P.btt(rank=1)), StructuredLinear(64, 64, P.btt(rank=1), device="meta")
    assert a._plan is b._plan  # planned once per (structure, cost table): a frozen value
    b.to_empty(device="cpu")  # a meta-built layer gets its initialisation once it has data
    torch.manual_seed(0)
    b.reset_parameters()
    for name in b.core_names:
        w = getattr(b, name)
        assert abs(float(w.std()) - b.init_stds[name]) < 0.25 * b.init_stds[name]
    assert torch.count_nonzero(b.bias) == 0
