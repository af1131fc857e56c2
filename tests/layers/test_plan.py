"""The frozen layer plan: torch-free stride decisions equal what meta tensors give; the plan modules stay torch-free."""

import math
import random
import subprocess
import sys

import pytest
import torch

import einstruct as es
from einstruct.layers import layerplan, strides
from einstruct.layers.layout import fill, inverse

from .test_linear import PRESETS

SHAPES = [(256, 256), (1024, 512), (144, 36), (1000, 500)]


def meta_strides(shape, perm, new, base_strides=None):
    """Strides of ``t.permute(perm).view(new)`` on a meta tensor, or None where view raises."""
    t = torch.empty(shape, device="meta")
    if base_strides is not None:
        t = torch.empty_strided(shape, base_strides, device="meta")
    if perm is not None:
        t = t.permute(perm)
    try:
        return t.view(new).stride()
    except RuntimeError:
        return None


def test_view_strides_equal_torch_on_random_shapes():
    rng = random.Random(0)
    for _ in range(3000):
        shape = [rng.choice([1, 2, 3, 4, 6]) for _ in range(rng.randint(1, 5))]
        perm = list(range(len(shape)))
        rng.shuffle(perm)
        rest, new = math.prod(shape), []
        while rest > 1 and len(new) < 5:
            d = rng.choice([k for k in range(1, rest + 1) if rest % k == 0])
            new.append(d)
            rest //= d
        new += [rest] if rest > 1 else []
        if rng.random() < 0.3:
            new.insert(rng.randint(0, len(new)), 1)
        assert strides.permuted_view(shape, perm, new) == meta_strides(shape, perm, new), (shape, perm, new)


def blas(st) -> bool:
    return st is not None and (st[-1] == 1 or st[-2] == 1)


@pytest.mark.parametrize("d_in, d_out", SHAPES)
@pytest.mark.parametrize("name", list(PRESETS))
def test_plan_decisions_equal_meta_tensors(name, d_in, d_out):
    st = es.compile(PRESETS[name](), d_in, d_out)
    plan = layerplan.build(st)
    shapes = {i: tuple(c.shape) for i, c in enumerate(st.cores)}
    n = 3
    for route in (plan.chain, plan.small):
        src, prev, rows = route.in_shape, (None, st.d_in_padded), 1
        for s in route.steps:
            if s.act_perm is not None:
                assert s.act_view == blas(meta_strides(fill(src, n), s.act_perm, fill(s.act_shape, n * s.rows)))
                back = meta_strides(fill(s.act_dims, n), inverse(s.act_perm), fill(prev, n * rows))
                assert s.grad_view == blas(back)
            else:
                assert not s.act_view and not s.grad_view
            core = meta_strides(shapes[s.core], s.core_perm, s.core_shape)
            assert s.core_view == (s.core_perm is not None and blas(core))
            assert s.core_as_is == (s.core_perm is None and s.core_shape == shapes[s.core])
            src, prev, rows = s.out_shape, s.out_matrix, s.rows
        if route.final_perm is None:
            assert route.into_rows == 0
        else:
            last = route.steps[-1]
            matrix = fill(last.out_matrix, n * last.rows)
            into = blas(meta_strides(fill(route.final_shape, n), route.final_inverse, matrix))
            assert (route.into_rows > 0) == into
            if into:
                assert route.into_rows == max(2, math.ceil(layerplan.INTO_MIN_ELEMS / st.d_out_padded))


def test_plan_is_a_frozen_value_built_once():
    layer = es.StructuredLinear(256, 256, es.presets.btt(rank=2))
    plan = layer._plan
    assert plan == layerplan.build(layer.structure)
    with pytest.raises(AttributeError):
        plan.builtin_rows = 3
    assert layer._chain is plan.chain.layout
    assert plan.core_names == layer.core_names
    assert layer._row_elems == plan.row_elems and layer.builtin_rows == plan.builtin_rows


def test_plan_and_moe_config_import_without_torch():
    code = (
        "import sys; import einstruct.layers.layerplan, einstruct.layers.layout, einstruct.layers.strides; "
        "from einstruct.layers.moe import MoEConfig, is_btt_expert_spec; "
        "MoEConfig(experts=4, active=1); assert is_btt_expert_spec('btt'); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
