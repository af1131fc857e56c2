"""structure(): which nn.Linear modules each select mode replaces, and how; summary(): costs per layer.

Conv1D, weight ties, warnings and the default selection: test_dropin.py."""

import re

import pytest
import torch
from torch import nn

import einstruct as es
from einstruct.layers.linear import StructuredLinear

BTT = es.presets.btt(rank=1)
ALL = ["inp", "blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2", "head"]


class Block(nn.Module):
    def __init__(self, width, device=None, dtype=None):
        super().__init__()
        self.norm = nn.LayerNorm(width, device=device, dtype=dtype)
        self.fc1 = nn.Linear(width, 4 * width, device=device, dtype=dtype)
        self.fc2 = nn.Linear(4 * width, width, device=device, dtype=dtype)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class Net(nn.Module):
    def __init__(self, width=64, device=None, dtype=None):
        super().__init__()
        self.inp = nn.Linear(16, width, device=device, dtype=dtype)
        self.blocks = nn.ModuleList([Block(width, device, dtype) for _ in range(2)])
        self.head = nn.Linear(width, 4, device=device, dtype=dtype)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def structured(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, StructuredLinear))


def dense(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))


@pytest.mark.parametrize(
    "select, expected",
    [
        ("all", ALL),
        ("all_but_last", ALL[:-1]),
        ("intermediate", ALL[1:-1]),
        ("blocks.*.fc1", ["blocks.0.fc1", "blocks.1.fc1"]),
        ("blocks.1.*", ["blocks.1.fc1", "blocks.1.fc2"]),
        (re.compile(r"blocks\.\d\.fc2"), ["blocks.0.fc2", "blocks.1.fc2"]),
        (lambda name, m: m.out_features == 64, ["blocks.0.fc2", "blocks.1.fc2", "inp"]),
    ],
)
def test_select_modes_replace_exactly_the_expected_modules(select, expected):
    torch.manual_seed(0)
    model = Net()
    out = es.structure(model, BTT, select)
    assert out is model
    assert structured(model) == sorted(expected)
    assert dense(model) == sorted(set(ALL) - set(expected))
    assert model(torch.randn(3, 16)).shape == (3, 4)
    for name in expected:
        m = model.get_submodule(name)
        assert m.spec == BTT and m.bias is not None


def test_callable_can_give_each_layer_its_own_spec():
    model = Net()
    lr8, kron = es.presets.low_rank(rank=8), es.presets.kron()
    es.structure(model, None, lambda n, m: lr8 if n.endswith("fc1") else kron if n.endswith("fc2") else None)
    assert model.blocks[0].fc1.spec == lr8 and model.blocks[1].fc2.spec == kron
    assert isinstance(model.inp, nn.Linear) and isinstance(model.head, nn.Linear)


def test_zero_weight_linear_is_replaced_with_zero_init():
    torch.manual_seed(1)
    model = Net()
    with torch.no_grad():
        model.blocks[0].fc2.weight.zero_()
        model.blocks[0].fc2.bias.zero_()
    es.structure(model, BTT, "intermediate")
    z, nz = model.blocks[0].fc2, model.blocks[1].fc2
    assert z.zero_init and not nz.zero_init
    x = torch.randn(5, 256)
    assert torch.count_nonzero(z(x)) == 0 and torch.count_nonzero(nz(x)) > 0
    assert torch.count_nonzero(getattr(z, z.core_names[0])) > 0  # only the last core is zero


def test_copy_weights_with_dense_spec_reproduces_outputs():
    torch.manual_seed(2)
    model = Net(dtype=torch.float64)
    x = torch.randn(7, 16, dtype=torch.float64)
    before = model(x)
    es.structure(model, es.presets.dense(), "all", copy_weights=True)
    assert structured(model) == sorted(ALL)
    assert torch.allclose(model(x), before, atol=1e-12)


def test_copy_weights_projects_structured_weights_exactly():
    torch.manual_seed(3)
    src = StructuredLinear(64, 256, BTT)
    model = Net()
    with torch.no_grad():
        model.blocks[0].fc1.weight.copy_(src.to_dense())
    es.structure(model, BTT, "blocks.0.fc1", copy_weights=True)
    new = model.blocks[0].fc1
    assert torch.allclose(new.to_dense(), src.to_dense(), atol=1e-5)


def test_device_dtype_training_mode_and_frozen_flags_are_kept():
    model = Net(dtype=torch.float64).eval()
    model.inp.requires_grad_(False)
    es.structure(model, BTT, "all")
    for name in ALL:
        m = model.get_submodule(name)
        assert not m.training
        assert all(p.dtype == torch.float64 for p in m.parameters())
    assert not any(p.requires_grad for p in model.inp.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    meta = es.structure(Net(device="meta"), BTT, "all_but_last")
    assert all(p.is_meta for p in meta.parameters()) and len(structured(meta)) == 5


def test_shared_module_is_replaced_everywhere_by_one_layer():
    model = Net()
    model.blocks[1].fc1 = model.blocks[0].fc1
    es.structure(model, BTT, "blocks.0.fc1")
    assert isinstance(model.blocks[0].fc1, StructuredLinear) and model.blocks[1].fc1 is model.blocks[0].fc1


def test_multihead_attention_projections_stay_dense():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(64, 4, batch_first=True)
            self.proj = nn.Linear(64, 64)

    with pytest.warns(UserWarning, match=r"'mha' \(nn\.MultiheadAttention"):  # matched, but left dense
        model = es.structure(Attn(), BTT, "all")
    assert isinstance(model.proj, StructuredLinear)
    assert isinstance(model.mha.out_proj, nn.Linear)


def test_root_linear_is_returned_replaced():
    new = es.structure(nn.Linear(64, 64), BTT)
    assert isinstance(new, StructuredLinear) and (new.in_features, new.out_features) == (64, 64)


def test_mistakes_raise_spec_error_and_leave_the_model_unchanged():
    model = Net()
    with pytest.raises(es.SpecError, match=r"matches no nn\.Linear"):
        es.structure(model, BTT, "blocks.*.attn")
    with pytest.raises(es.SpecError, match="select must be"):
        es.structure(model, BTT, 3)
    with pytest.raises(es.SpecError, match=r"es\.Spec or a preset name"):
        es.structure(model, 42)
    with pytest.raises(es.SpecError, match="spec is None"):
        es.structure(model, None, "all")
    with pytest.raises(es.SpecError, match="unknown layer argument 'zero'"):
        es.structure(model, BTT, zero=True)
    with pytest.raises(es.SpecError, match="returned int"):
        es.structure(model, BTT, lambda n, m: 1)
    with pytest.raises(es.SpecError, match="unknown preset"):
        es.structure(model, "bttt")
    # 3 blocks cannot split the head (64 -> 4) within the padding tolerance: the error names the module
    with pytest.raises(es.SpecError, match="module 'head' \\(Linear 64 -> 4\\)"):
        es.structure(model, es.presets.block_diag(blocks=3), "all")
    assert structured(model) == []  # nothing was swapped in before the error


def test_summary_totals_and_baseline_ratios():
    torch.manual_seed(4)
    model = Net()
    before = es.summary(model)
    assert before.flops == sum(
        2 * m.in_features * m.out_features for _, m in model.named_modules() if isinstance(m, nn.Linear)
    )
    es.structure(model, BTT, "all_but_last")
    after = es.summary(model, baseline=before)
    layers = [m for _, m in model.named_modules() if isinstance(m, StructuredLinear)]
    assert [r.name for r in after.rows] == ALL
    assert after.params == sum(m.structure.params for m in layers) + 64 * 4
    assert after.flops == sum(m.structure.flops for m in layers) + 2 * 64 * 4
    assert after.row("blocks.0.fc1").kind == "btt(rank=1)" and after.row("head").kind == "dense"
    assert after.model_params == sum(p.numel() for p in model.parameters())
    text = str(after)
    assert "blocks.1.fc2" in text and "total" in text
    ratio = after.flops / before.flops
    assert f"{ratio:.3g}x" in text
    with pytest.raises(dataclasses_frozen_error()):
        after.rows = ()


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError
