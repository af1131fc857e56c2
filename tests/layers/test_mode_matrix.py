"""The mode matrix (issue 14, part 10): every way a StructuredLinear can be run, after every way its weights
can change, against one torch.einsum over the live parameters.

Axes: structure (every preset, two generic theta, random specs from hypothesis) x weight change (a default,
a foreach and a fused optimizer step, an edit through ``.data``, ``load_state_dict``, ``.to()``) x mode
(training, no_grad, inference_mode, no_grad inside ``es.inference_cache``) x precision (float32, float64,
bf16 autocast) x rows (1, a small batch, more than ``builtin_rows``). Each cell checks the output, the
gradients in training, and ``flops(batch)`` against FlopCounterMode. Every weight change comes after a
no-grad and a cached forward, the calls that once cached stale weights. The cells are sampled (seeded) to
keep the suite fast; each structure x change covers every mode, precision and row count at least once.
"""

from __future__ import annotations

import copy
import itertools
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch.utils.flop_counter import FlopCounterMode

import einstruct as es
from einstruct.layers.linear import StructuredLinear

from ..test_hostile import valid_specs
from .test_linear import PRESETS

STRUCTURES = {
    **PRESETS,
    "theta_a": lambda: es.theta(0.5, 0.25, 0.25, 0.25, 0.5, 0.25, 0.25),
    "theta_b": lambda: es.theta(0.75, 0, 0.25, 0, 0.75, 0.25, 0.25),
}
CHANGES = ("adam", "adamw_foreach", "adamw_fused", "sgd_fused", "data_edit", "load_state_dict", "to")
MODES = ("train", "no_grad", "inference_mode", "cached")
PRECISIONS = ("float32", "float64", "bf16_autocast")
ROWS = ("one", "small", "large")
TOL = {"float32": 1e-5, "float64": 1e-12, "bf16_autocast": 2e-2}  # error relative to the absolute-value einsum
CELLS = list(itertools.product(MODES, PRECISIONS, ROWS))
SAMPLED = 14  # of the 36 cells, per structure and change (seeded; covers each mode, precision, rows value)


def counted(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def change(layer: StructuredLinear, how: str, d_in: int) -> None:
    """One weight change of the kind ``how``, after the forwards that would fill a stale cache."""
    x = torch.randn(3, d_in, dtype=layer.bias.dtype)
    with torch.no_grad():
        layer(x)  # an evaluation
        with es.inference_cache(layer):
            layer(x)
    params = list(layer.parameters())
    opts = {
        "adam": lambda: torch.optim.Adam(params, lr=3e-2, foreach=False),
        "adamw_foreach": lambda: torch.optim.AdamW(params, lr=3e-2, foreach=True),
        "adamw_fused": lambda: torch.optim.AdamW(params, lr=3e-2, fused=True),
        "sgd_fused": lambda: torch.optim.SGD(params, lr=3e-1, fused=True),
    }
    if how in opts:
        opt = opts[how]()
        (layer(x) - 1).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    elif how == "data_edit":
        for p in params:
            p.data.mul_(1.5).add_(0.01)
    elif how == "load_state_dict":
        other = copy.deepcopy(layer)
        with torch.no_grad():
            for p in other.parameters():
                p.normal_(0, float(p.detach().std()) + 0.1)
        layer.load_state_dict(other.state_dict())
    elif how == "to":
        layer.double()
        with torch.no_grad():
            for p in layer.parameters():
                p.mul_(-1)
        layer.float()
    else:  # pragma: no cover
        raise AssertionError(how)
    with torch.no_grad():
        layer.bias.normal_()


def rows_of(layer: StructuredLinear, which: str) -> int:
    return {"one": 1, "small": 5, "large": layer.builtin_rows + 1}[which]


def check_cell(layer32: StructuredLinear, mode: str, precision: str, rows: str) -> None:
    layer = copy.deepcopy(layer32).double() if precision == "float64" else layer32
    dtype = torch.float64 if precision == "float64" else torch.float32
    n = rows_of(layer, rows)
    x = torch.randn(n, layer.in_features, dtype=dtype, requires_grad=mode == "train")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16_autocast")
    grad_mode = {
        "train": torch.enable_grad(),
        "no_grad": torch.no_grad(),
        "inference_mode": torch.inference_mode(),
        "cached": torch.no_grad(),
    }[mode]
    scope = es.inference_cache(layer) if mode == "cached" else torch.autocast("cpu", enabled=False)
    where = f"{mode}, {precision}, {n} rows"
    with scope:
        with grad_mode, autocast:
            layer(x.detach())  # a first call (builds what the scope caches)
            y = layer(x)
            flops = counted(lambda: layer(x.detach()))
            assert flops == layer.flops(n), f"{where}: flops({n}) = {layer.flops(n)}, counted {flops}"
    # The reference: one einsum over the live parameters; errors are measured against the same einsum of
    # absolute values (what rounding errors scale with), so a sum that cancels is not a false alarm.
    train = mode == "train"
    ref_x = x.detach().requires_grad_(train)
    cores = {c: getattr(layer, c) for c in layer.core_names}
    abs_x = x.detach().abs().requires_grad_(train)
    abs_cores = {c: w.detach().abs().requires_grad_(train) for c, w in cores.items()}
    with torch.enable_grad() if train else torch.no_grad():
        ref = einsum(layer, ref_x, cores) + layer.bias
        ref_abs = einsum(layer, abs_x, abs_cores) + layer.bias.abs()
    err = gap(y, ref, ref_abs)
    assert err < TOL[precision], f"{where}: output off by {err:.3g}"
    if train:
        g = torch.randn_like(ref)
        names = ["x", *cores, "bias"]
        got = torch.autograd.grad((y.to(g.dtype) * g).sum(), [x, *cores.values(), layer.bias])
        want = torch.autograd.grad((ref * g).sum(), [ref_x, *cores.values(), layer.bias])
        scale = torch.autograd.grad((ref_abs * g.abs()).sum(), [abs_x, *abs_cores.values()]) + (g.abs().sum(0),)
        for name, a, b, c in zip(names, got, want, scale):
            e = gap(a, b, c)
            assert e < TOL[precision], f"{where}: gradient of {name} off by {e:.3g}"


def einsum(layer: StructuredLinear, x2d: torch.Tensor, cores: dict) -> torch.Tensor:
    """y without bias by one torch.einsum over the spec with the given cores (independent of the plan)."""
    st = layer.structure
    spec = st.spec
    xs = torch.nn.functional.pad(x2d, (0, st.d_in_padded - layer.in_features))
    ops = [xs.reshape(-1, *(st.sizes[a] for a in spec.x))]
    for c in spec.cores:  # a core that is a scalar at this size is not a parameter: it is 1
        ops.append(cores[c.name] if c.name in cores else torch.ones([st.sizes[a] for a in c.axes], dtype=x2d.dtype))
    expr = ",".join(["Z" + spec.x] + [c.axes for c in spec.cores]) + "->Z" + spec.y
    y = torch.einsum(expr, *ops).reshape(x2d.shape[0], st.d_out_padded)
    return y[:, : layer.out_features]


def gap(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> float:
    """||a - b|| relative to the norm of ``scale`` (the computation in absolute values)."""
    a, b, scale = (t.detach().double() for t in (a, b, scale))
    return float((a - b).norm() / scale.norm().clamp_min(1e-30))


def sampled_cells(key: str) -> list[tuple]:
    rng = random.Random(key)
    while True:  # a sample that covers every value of every axis
        cells = rng.sample(CELLS, SAMPLED)
        if all({c[i] for c in cells} == set(axis) for i, axis in enumerate((MODES, PRECISIONS, ROWS))):
            return cells


def run_matrix(make, d_in: int, d_out: int, key: str) -> None:
    for how in CHANGES:
        torch.manual_seed(hash((key, how)) % 2**31)
        layer = StructuredLinear(d_in, d_out, make())
        change(layer, how, d_in)
        for mode, precision, rows in sampled_cells(f"{key}/{how}"):
            check_cell(layer, mode, precision, rows)


@pytest.mark.parametrize("d_in, d_out", [(64, 64), (144, 36)])
@pytest.mark.parametrize("name", list(STRUCTURES))
def test_mode_matrix_presets(name, d_in, d_out):
    run_matrix(STRUCTURES[name], d_in, d_out, f"{name}/{d_in}x{d_out}")


@settings(max_examples=5, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(valid_specs)
def test_mode_matrix_random_specs(case):
    spec, d_in, d_out = case
    run_matrix(lambda: spec, d_in, d_out, spec.einsum)
