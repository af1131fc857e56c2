"""The training chain as one autograd Function: same values and gradients as the chain on torch's own ops."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import einstruct as es
from benchmarks.layers import saved_bytes
from einstruct.layers import execute
from einstruct.layers.linear import StructuredLinear

from .test_linear import PRESETS, einsum_reference
from .test_linear_fast import graph_nodes

SHAPES = [(256, 256), (144, 36), (1000, 500)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def ops_reference(layer, x, route):
    """Output of ``route`` run on torch's autograd ops, its input leaf, the cores it used."""
    xr = x.detach().clone().requires_grad_(True)
    cores = layer._effective()
    pad = layer._plan.chain.d_in - layer.in_features
    x2 = torch.nn.functional.pad(xr, (0, pad)) if pad else xr
    y = execute.run_ops(route, x2, x.shape[0], None, cores)[:, : layer.out_features] + layer.bias
    return y, xr, cores


@pytest.mark.parametrize("d_in, d_out", SHAPES)
@pytest.mark.parametrize("name", list(PRESETS))
def test_chain_function_equals_torch_ops_on_both_layouts(name, d_in, d_out):
    layer = StructuredLinear(d_in, d_out, PRESETS[name](), dtype=torch.float64)
    with torch.no_grad():
        layer.bias.normal_()
    into = layer._plan.chain.into_rows
    for n in sorted({0, 1, 2, 7, max(into - 1, 1), into, into + 1}):
        for builtin_rows in (0, 10**9):  # the cost-model layout, then the plain one
            layer.builtin_rows = builtin_rows
            route = layer._plan.small if n <= builtin_rows else layer._plan.chain
            x = torch.randn(n, d_in, dtype=torch.float64, requires_grad=True)
            c = torch.randn(n, d_out, dtype=torch.float64)
            layer.zero_grad()
            y = layer(x)
            (y * c).sum().backward()
            got = [y.detach(), x.grad] + [p.grad for p in layer.parameters()]
            layer.zero_grad()
            y_ref, xr, _ = ops_reference(layer, x, layer._plan.small)
            (y_ref * c).sum().backward()
            want = [y_ref.detach(), xr.grad] + [p.grad for p in layer.parameters()]
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=f"{name} n={n} {route.layout.cost}")


def test_the_graph_is_one_node_and_frozen_operands_get_no_gradient():
    layer = StructuredLinear(256, 256, es.presets.btt(rank=2))
    x = torch.randn(16, 256, requires_grad=True)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "_ChainBackward"
    assert {n for n in graph_nodes(y) if n.startswith("_")} == {"_ChainBackward"}
    layer.R.requires_grad_(False)
    x2 = torch.randn(16, 256)  # no input gradient either
    layer(x2).square().sum().backward()
    assert layer.R.grad is None and layer.L.grad is not None and layer.bias.grad is not None


def test_weight_norm_gains_get_gradients_through_the_function():
    layer = StructuredLinear(256, 256, es.presets.btt(rank=2), normalize=True, dtype=torch.float64)
    x = torch.randn(5, 256, dtype=torch.float64, requires_grad=True)
    layer(x).square().sum().backward()
    got = [p.grad.clone() for p in layer.parameters()] + [x.grad.clone()]
    layer.zero_grad()
    xr = x.detach().clone().requires_grad_(True)
    (xr @ layer.to_dense().T + layer.bias).square().sum().backward()
    want = [p.grad for p in layer.parameters()] + [xr.grad]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_an_in_place_change_of_the_input_before_backward_is_caught():
    layer = StructuredLinear(256, 256, es.presets.btt(rank=1))
    x = torch.randn(16, 256, requires_grad=True)
    h = x * 1.0
    y = layer(h)
    with torch.no_grad():
        h.mul_(2.0)
    with pytest.raises(RuntimeError, match="inplace"):  # a saved view of h: its version moved on
        y.sum().backward()


@pytest.mark.parametrize("name", ["btt3", "monarch4", "kron", "low_rank3"])
def test_vmap_under_no_grad_runs(name):
    # The no-grad chain writes with out=; under torch.func the layer runs on torch's own ops instead.
    layer = StructuredLinear(256, 256, PRESETS[name](), dtype=torch.float64)
    x = torch.randn(3, 40, 256, dtype=torch.float64)
    with torch.no_grad():
        y = torch.func.vmap(layer)(x)
        torch.testing.assert_close(y, x @ layer.to_dense().T + layer.bias)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch's own forward-AD decomposition
@pytest.mark.parametrize("builtin_rows", [10**9, 0])  # the plain-form layout, then the cost-model one
@pytest.mark.parametrize("name", ["btt3", "monarch4", "kron", "tt2"])
def test_double_backward_and_forward_mode_equal_one_einsum(name, builtin_rows):
    layer = StructuredLinear(144, 64, PRESETS[name](), dtype=torch.float64)
    layer.builtin_rows = builtin_rows
    x = torch.randn(6, 144, dtype=torch.float64, requires_grad=True)
    params = list(layer.parameters())
    out = {}
    for how, f in (("layer", layer), ("einsum", lambda t: einsum_reference(layer, t) + layer.bias)):
        (gx,) = torch.autograd.grad(f(x).square().sum(), x, create_graph=True)  # a gradient penalty
        out[how] = list(torch.autograd.grad(gx.square().sum(), params))
        with fwAD.dual_level():  # forward mode (dual tensors): the layer runs on torch's own ops
            out[how].append(fwAD.unpack_dual(f(fwAD.make_dual(x.detach(), torch.ones_like(x)))).tangent)
    for a, b in zip(out["layer"], out["einsum"]):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("builtin_rows", [10**9, 0])
@pytest.mark.parametrize("name", list(PRESETS))
def test_the_chain_keeps_no_more_for_backward_than_one_einsum(name, builtin_rows):
    # Saving the input for double backward must not add a copy: a first step that permutes x copies it in
    # the graph, so the node keeps that copy only (one x-sized tensor, as the einsum's own bmm does).
    layer = StructuredLinear(1024, 1024, PRESETS[name]())
    layer.builtin_rows = builtin_rows
    x = torch.randn(64, 1024, requires_grad=True)
    ours = saved_bytes(lambda: layer(x), layer)
    theirs = saved_bytes(lambda: einsum_reference(layer, x) + layer.bias, layer)
    assert ours <= theirs
