"""param_groups: the muP learning rates of THEORY 4, checked against its closed forms (not the code's kappa)."""

import math

import pytest
import torch
from torch import nn

import einstruct as es
from einstruct.layers.linear import StructuredLinear

LR, D, D0 = 3e-3, 256, 64


class Custom(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.mix = nn.Parameter(torch.randn(4, width))  # raw 2-d parameter: multiplier 1, decayed
        self.scale = nn.Parameter(torch.ones(()))  # raw scalar: multiplier 1, no decay


class Net(nn.Module):
    """input Linear(16 -> w), hidden w -> w (dense or structured), LayerNorm, head Linear(w -> 10)."""

    def __init__(self, width, spec=None, normalize=False, device=None):
        super().__init__()
        self.inp = nn.Linear(16, width, device=device)
        if spec is None:
            self.hidden = nn.Linear(width, width, device=device)
        else:
            self.hidden = StructuredLinear(width, width, spec, normalize=normalize, device=device)
        self.norm = nn.LayerNorm(width, device=device)
        self.custom = Custom(width)
        self.head = nn.Linear(width, 10, device=device)

    def forward(self, x):
        h = self.norm(torch.relu(self.hidden(torch.relu(self.inp(x)))))
        return self.head(h) + self.custom.scale * (self.custom.mix.sum())


def meta_base(spec=None):
    return Net(D0, spec, device="meta")


def rates(groups):
    """name -> (lr, weight_decay or None)."""
    out = {}
    for g in groups:
        for n in g["name"]:
            assert n not in out, f"{n} in two groups"
            out[n] = (g["lr"], g.get("weight_decay"))
    return out


# THEORY 4 closed forms for a d x d layer, Adam (execution order: BTT/TT first core R, second L)
ADAM_KAPPA = {
    "btt1": (es.presets.btt(rank=1), {"R": math.sqrt(D) / 2, "L": math.sqrt(D) / 2}),
    "btt4": (es.presets.btt(rank=4), {"R": math.sqrt(D) / 2, "L": math.sqrt(D) / (2 * 4)}),
    "kron": (es.presets.kron(), {"A": math.sqrt(D) / 2, "B": math.sqrt(D) / 2}),
    "low_rank8": (es.presets.low_rank(rank=8), {"V": 1 / 2, "U": D / (2 * 8)}),
    "monarch4": (es.presets.monarch(blocks=4), {"R": 4 / 2, "L": 4 / 2}),
}


@pytest.mark.parametrize("key", list(ADAM_KAPPA))
def test_adam_core_rates_are_dense_rate_times_closed_form_kappa(key):
    spec, kappa = ADAM_KAPPA[key]
    torch.manual_seed(0)
    model = Net(D, spec)
    r = rates(es.param_groups(model, LR, base=meta_base(), weight_decay=0.1, input_lr_mult=0.1))
    # weight decay is divided by the muP multiplier (scale_weight_decay=True): lr x wd = LR x 0.1 everywhere
    for core, k in kappa.items():
        mult = D0 / D * k
        assert r[f"hidden.{core}"] == (pytest.approx(LR * mult, rel=1e-12), pytest.approx(0.1 / mult, rel=1e-12))
    assert r["inp.weight"] == (pytest.approx(LR * 0.1), 0.1)  # input layer: fan-in fixed, times input_lr_mult
    assert r["head.weight"] == (pytest.approx(LR * D0 / D), pytest.approx(0.1 * D / D0))  # base_fan_in / fan_in
    for name in ("inp.bias", "hidden.bias", "head.bias", "norm.weight", "norm.bias", "custom.scale"):
        assert r[name] == (pytest.approx(LR), 0.0)
    assert r["custom.mix"] == (pytest.approx(LR), 0.1)
    assert set(r) == {n for n, _ in model.named_parameters()}
    plain = rates(es.param_groups(model, LR, base=meta_base(), weight_decay=0.1, scale_weight_decay=False))
    assert {wd for _, wd in plain.values()} == {0.0, 0.1}


def test_dense_hidden_layer_gets_base_fan_in_over_fan_in():
    model = Net(D)
    r = rates(es.param_groups(model, LR, base=meta_base()))
    assert r["hidden.weight"] == (pytest.approx(LR * D0 / D), None)  # weight_decay=None: optimizer default
    assert r["hidden.bias"] == (pytest.approx(LR), 0.0)


def test_rectangular_btt_core_rates():
    """BTT rank r on d_in -> d_out: R reads a = sqrt(d_in), L reads g*r = sqrt(d_in)*r (THEORY 4 rule)."""

    class Up(nn.Module):
        def __init__(self, width, structured):
            super().__init__()
            self.fc = (
                StructuredLinear(width, 4 * width, es.presets.btt(rank=2))
                if structured
                else nn.Linear(width, 4 * width, device="meta")
            )

    r = rates(es.param_groups(Up(D, True), LR, base=Up(D0, False)))
    assert r["fc.R"][0] == pytest.approx(LR * D0 / D * math.sqrt(D) / 2)
    assert r["fc.L"][0] == pytest.approx(LR * D0 / D * math.sqrt(D) / (2 * 2))


def test_sgd_rates():
    """SGD: dense (fan_out/fan_in)/(base ratio); cores times kappa_sgd = (d_out^i/d_in^i)/(d_out/d_in)/k."""
    r_ = 4
    model = Net(D, es.presets.btt(rank=r_))
    r = rates(es.param_groups(model, LR, base=meta_base(), optimizer="sgd", input_lr_mult=0.5))
    assert r["hidden.R"][0] == pytest.approx(LR * r_ / 2)  # R: sqrt(d) -> r sqrt(d)
    assert r["hidden.L"][0] == pytest.approx(LR / (2 * r_))  # L: r sqrt(d) -> sqrt(d)
    assert r["inp.weight"][0] == pytest.approx(LR * (D / 16) / (D0 / 16) * 0.5)
    assert r["head.weight"][0] == pytest.approx(LR * (10 / D) / (10 / D0))
    r = rates(es.param_groups(Net(D, es.presets.low_rank(rank=8)), LR, base=meta_base(), optimizer="sgd"))
    assert r["hidden.V"][0] == pytest.approx(LR * (8 / D) / 2)
    assert r["hidden.U"][0] == pytest.approx(LR * (D / 8) / 2)


def test_base_none_gives_dense_one_and_cores_kappa():
    model = Net(D, es.presets.kron())
    r = rates(es.param_groups(model, LR))
    assert r["hidden.A"][0] == pytest.approx(LR * math.sqrt(D) / 2)
    assert r["head.weight"][0] == pytest.approx(LR) and r["inp.weight"][0] == pytest.approx(LR)


def test_structured_base_gives_the_same_rates_as_a_dense_base():
    spec = es.presets.btt(rank=2)
    model = Net(D, spec)
    assert rates(es.param_groups(model, LR, base=Net(D0, spec, device="meta"))) == rates(
        es.param_groups(model, LR, base=meta_base())
    )


def test_gains_of_weight_norm_get_multiplier_one_and_no_decay():
    model = Net(D, es.presets.btt(rank=1), normalize=True)
    r = rates(es.param_groups(model, LR, base=meta_base(), weight_decay=0.1))
    assert r["hidden.gains.R"] == (pytest.approx(LR), 0.0) and r["hidden.gains.L"] == (pytest.approx(LR), 0.0)


def test_embedding_keeps_multiplier_one_and_tied_weights_appear_once():
    class LM(nn.Module):
        def __init__(self, width, device=None):
            super().__init__()
            self.emb = nn.Embedding(50, width, device=device)
            self.head = nn.Linear(width, 50, bias=False, device=device)
            self.head.weight = self.emb.weight

    r = rates(es.param_groups(LM(D), LR, base=LM(D0, device="meta")))
    assert r == {"emb.weight": (pytest.approx(LR), None)}


def test_groups_are_merged_and_accepted_by_torch_optimizers():
    torch.manual_seed(1)
    model = Net(D, es.presets.btt(rank=1))
    groups = es.param_groups(model, LR, base=meta_base(), weight_decay=0.1)
    keys = [(g["lr"], g.get("weight_decay")) for g in groups]
    assert len(keys) == len(set(keys))
    # inp (1), cores (kappa 8 at 64/256 -> 2), head (1/4) decayed with wd / multiplier; the no-decay group at lr
    assert sorted(keys) == sorted([(LR, 0.1), (LR * 2, 0.05), (LR / 4, 0.4), (LR, 0.0)])
    x = torch.randn(8, 16)
    for opt in (torch.optim.AdamW(groups), torch.optim.SGD(es.param_groups(model, LR, optimizer="sgd"))):
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_groups_survive_torch_compile_and_load_state_dict():
    torch.manual_seed(2)
    spec = es.presets.btt(rank=2)
    model = Net(D, spec)
    want = rates(es.param_groups(model, LR, base=meta_base(), weight_decay=0.1))
    compiled = torch.compile(model, backend="eager")
    assert any(n.startswith("_orig_mod.") for n, _ in compiled.named_parameters())
    groups = es.param_groups(compiled, LR, base=meta_base(), weight_decay=0.1)
    assert rates(groups) == want
    ids = {id(p) for g in groups for p in g["params"]}
    assert ids == {id(p) for p in model.parameters()}
    opt = torch.optim.AdamW(groups)
    compiled(torch.randn(4, 16)).sum().backward()
    opt.step()

    fresh = Net(D, spec)
    fresh.load_state_dict(model.state_dict())
    assert rates(es.param_groups(fresh, LR, base=meta_base(), weight_decay=0.1)) == want
    assert rates(es.param_groups(model, LR, base=torch.compile(meta_base(), backend="eager"), weight_decay=0.1)) == want


def test_frozen_parameters_are_left_out():
    model = Net(D, es.presets.kron())
    model.inp.requires_grad_(False)
    r = rates(es.param_groups(model, LR, base=meta_base()))
    assert "inp.weight" not in r and "inp.bias" not in r and "hidden.A" in r


def test_user_mistakes_raise_mup_error():
    model = Net(D, es.presets.kron())

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(16, D0)

    with pytest.raises(es.MupError, match="'hidden'"):
        es.param_groups(model, LR, base=Other())
    wrong = meta_base()
    wrong.hidden = nn.Embedding(D0, D0, device="meta")
    with pytest.raises(es.MupError, match="'hidden' is a StructuredLinear in the model but a Embedding in base"):
        es.param_groups(model, LR, base=wrong)
    with pytest.raises(es.MupError, match="module 'hidden' of the model is not in delta"):
        es.param_groups(model, LR, base=meta_base(), delta=Other(), input_lr_mult=0.1)
    with pytest.raises(es.MupError, match=r"delta must be an nn\.Module"):
        es.param_groups(model, LR, delta="wide")
    with pytest.raises(es.MupError, match="scale_weight_decay must be True or False"):
        es.param_groups(model, LR, scale_weight_decay="yes")
    with pytest.raises(es.MupError, match="optimizer 'lion'"):
        es.param_groups(model, LR, optimizer="lion")
    for bad in (0, -1.0, float("nan"), "3e-3"):
        with pytest.raises(es.MupError, match="lr must be"):
            es.param_groups(model, bad)
    with pytest.raises(es.MupError, match="weight_decay"):
        es.param_groups(model, LR, weight_decay=-0.1)
