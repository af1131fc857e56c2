"""muP rules beside microsoft's mup (issue #14, defect 6): input layers at the base width, delta=, weight decay
(lr x wd constant, no_weight_decay()), SGD biases, Conv1D and attention weights, and mup_init.

mup's closed forms used here (mup 1.0, width multiplier wm = width / base width): MuAdamW divides a hidden
matrix's lr by wm and multiplies its weight decay by wm; MuSGD multiplies the lr of a tensor with one
growing dim (input weights, hidden biases, norm gains) by wm and divides its weight decay by wm.
"""

import math
import re
import warnings

import pytest
import torch
from torch import nn

import einstruct as es

LR, WD, D0 = 3e-3, 0.1, 64


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)


class ResMLP(nn.Module):
    """The CIFAR task's shape: data (d_in) -> inp -> residual blocks (w -> 4w -> w) -> norm -> head."""

    def __init__(self, width, d_in=48, classes=10, depth=2):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)


def meta(cls, *args, **kw):
    with torch.device("meta"):
        return cls(*args, **kw)


def rates(groups):
    """name -> (lr, weight_decay or None)."""
    return {n: (g["lr"], g.get("weight_decay")) for g in groups for n in g["name"]}


def lr_of(groups):
    return {n: g["lr"] for g in groups for n in g["name"]}


# ---- input layers ----------------------------------------------------------------------------------


def test_at_the_base_width_only_the_data_fed_layer_gets_input_lr_mult():
    """The CIFAR task at width 64 (its base width): before, every layer looked like an input layer."""
    model = ResMLP(D0)
    lr = lr_of(es.param_groups(model, LR, base=meta(ResMLP, D0), input_lr_mult=0.1))
    assert lr["inp.weight"] == pytest.approx(0.1 * LR)
    for name in ("blocks.0.fc1.weight", "blocks.1.fc2.weight", "head.weight"):
        assert lr[name] == pytest.approx(LR), name
    # the same with the hidden layers structured (the task's select="intermediate"): cores get kappa only
    es.structure(model, es.presets.btt(rank=1), "intermediate")
    lr = lr_of(es.param_groups(model, LR, base=meta(ResMLP, D0), input_lr_mult=0.1))
    assert lr["inp.weight"] == pytest.approx(0.1 * LR) and lr["head.weight"] == pytest.approx(LR)
    kappa_r = math.sqrt(D0) / 2  # first BTT core of a d -> 4d layer reads sqrt(d); k = 2 cores
    assert lr["blocks.0.fc1.R"] == pytest.approx(LR * kappa_r)
    # a wider model gives input_lr_mult to the same layer, and base=None is the model's own base width
    wide = lr_of(es.param_groups(ResMLP(256), LR, base=meta(ResMLP, D0), input_lr_mult=0.1))
    assert wide["inp.weight"] == pytest.approx(0.1 * LR) and wide["blocks.0.fc1.weight"] == pytest.approx(LR / 4)
    own = lr_of(es.param_groups(ResMLP(D0), LR, input_lr_mult=0.1))
    assert own["inp.weight"] == pytest.approx(0.1 * LR) and own["head.weight"] == pytest.approx(LR)


def autoencoder(width, d=32):
    return nn.Sequential(nn.Linear(d, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, d))


def test_delta_decides_where_the_base_width_guess_cannot():
    """An autoencoder's data size is also its output size, so at the base width the guess calls its first
    layer hidden; a delta model (another width) tells exactly, as at any other width."""
    guess = lr_of(es.param_groups(autoencoder(D0), LR, base=meta(autoencoder, D0), input_lr_mult=0.1))
    assert guess["0.weight"] == pytest.approx(LR)  # the documented limit of the guess
    exact = lr_of(
        es.param_groups(
            autoencoder(D0), LR, base=meta(autoencoder, D0), delta=meta(autoencoder, 128), input_lr_mult=0.1
        )
    )
    wide = lr_of(es.param_groups(autoencoder(256), LR, base=meta(autoencoder, D0), input_lr_mult=0.1))
    assert exact["0.weight"] == pytest.approx(0.1 * LR) and wide["0.weight"] == pytest.approx(0.1 * LR)
    assert exact["2.weight"] == exact["4.weight"] == pytest.approx(LR)
    assert wide["2.weight"] == wide["4.weight"] == pytest.approx(LR * D0 / 256)
    # data as wide as the model: Linear(64, 64) first at width 64 is hidden by the guess, input with delta
    square = lambda w: nn.Sequential(nn.Linear(64, w), nn.ReLU(), nn.Linear(w, 10))
    assert lr_of(es.param_groups(square(64), LR, base=meta(square, 64), input_lr_mult=0.5))["0.weight"] == LR
    got = es.param_groups(square(64), LR, base=meta(square, 64), delta=meta(square, 96), input_lr_mult=0.5)
    assert lr_of(got)["0.weight"] == pytest.approx(0.5 * LR) and lr_of(got)["2.weight"] == pytest.approx(LR)


# ---- weight decay ----------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [64, 256, 1024])
def test_lr_times_weight_decay_is_constant_across_widths_as_in_mup(width):
    wm = width / D0
    model = ResMLP(width, depth=1)
    r = rates(es.param_groups(model, LR, base=meta(ResMLP, D0, depth=1), weight_decay=WD))
    # MuAdamW closed forms: hidden and output matrices lr / wm, wd x wm; input layer lr, wd
    for name in ("blocks.0.fc1.weight", "blocks.0.fc2.weight", "head.weight"):
        lr, wd = r[name]
        assert lr * wd == pytest.approx(LR * WD), name
    assert r["blocks.0.fc1.weight"] == (pytest.approx(LR / wm), pytest.approx(WD * wm))
    assert r["inp.weight"] == (pytest.approx(LR), pytest.approx(WD))
    assert r["blocks.0.norm.weight"] == (pytest.approx(LR), 0.0) and r["head.bias"] == (pytest.approx(LR), 0.0)
    # structured cores too: their lr carries kappa, their weight decay divides it out
    es.structure(model, es.presets.kron(), "intermediate")
    r = rates(es.param_groups(model, LR, base=meta(ResMLP, D0, depth=1), weight_decay=WD))
    for core in ("A", "B"):
        lr, wd = r[f"blocks.0.fc1.{core}"]
        assert lr * wd == pytest.approx(LR * WD) and lr != pytest.approx(LR / wm)
    # plain torch convention on request: one weight decay for every decayed tensor
    plain = rates(es.param_groups(model, LR, base=meta(ResMLP, D0, depth=1), weight_decay=WD, scale_weight_decay=False))
    assert {wd for _, wd in plain.values()} == {0.0, WD}


def test_input_lr_mult_does_not_scale_weight_decay():
    r = rates(es.param_groups(ResMLP(256), LR, base=meta(ResMLP, D0), weight_decay=WD, input_lr_mult=0.1))
    assert r["inp.weight"] == (pytest.approx(0.1 * LR), pytest.approx(WD))  # a tuned rate, not a width rule


class Blk(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(7, 4))  # listed by the block itself
        self.relative_position_bias = nn.Parameter(torch.zeros(7, 4))  # matched by the model's keyword
        self.fc = nn.Linear(width, width)

    def no_weight_decay(self):
        return {"table"}


class ViT(nn.Module):
    """timm's conventions: no_weight_decay() lists parameter names, no_weight_decay_keywords() substrings."""

    def __init__(self, width=64):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, width))
        self.patch = nn.Linear(48, width)
        self.blocks = nn.ModuleList(Blk(width) for _ in range(2))
        self.head = nn.Linear(width, 10)

    def no_weight_decay(self):
        return {"cls_token", "pos_embed", "blocks.1.fc.*"}

    def no_weight_decay_keywords(self):
        return {"relative_position"}

    def forward(self, x):
        h = self.patch(x) + self.pos_embed[:, : x.shape[1]] + self.cls_token
        for b in self.blocks:
            h = h + b.fc(h) + b.table.sum() + b.relative_position_bias.sum()
        return self.head(h)


def test_no_weight_decay_and_keywords_of_the_model_and_its_submodules_are_honoured():
    model = ViT()
    want_off = {
        "cls_token",
        "pos_embed",
        "blocks.0.table",
        "blocks.1.table",
        "blocks.0.relative_position_bias",
        "blocks.1.relative_position_bias",
        "blocks.1.fc.weight",
    }
    for m in (model, torch.compile(model, backend="eager")):
        r = rates(es.param_groups(m, LR, base=meta(ViT), weight_decay=WD))
        matrices = {n for n, p in model.named_parameters() if p.dim() >= 2}
        assert {n for n in matrices if r[n][1] == 0.0} == want_off
        assert r["blocks.0.fc.weight"][1] == WD and r["head.weight"][1] == WD and r["patch.weight"][1] == WD
    model(torch.randn(2, 5, 48)).sum().backward()

    class Bad(nn.Module):
        def no_weight_decay(self):
            return "pos_embed"

    with pytest.raises(es.MupError, match=r"Bad\.no_weight_decay\(\) of module '<root>' must return a set"):
        es.param_groups(Bad(), LR)


# ---- SGD, Conv1D, attention ----------------------------------------------------------------------


def test_sgd_scales_hidden_biases_and_norm_gains_with_width_as_mup():
    wm = 4
    lr = lr_of(es.param_groups(ResMLP(D0 * wm), LR, base=meta(ResMLP, D0), optimizer="sgd"))
    for name in ("inp.bias", "blocks.0.fc1.bias", "blocks.0.fc2.bias", "blocks.0.norm.weight", "norm.bias"):
        assert lr[name] == pytest.approx(LR * wm), name  # MuSGD: one growing dim -> lr x wm
    assert lr["head.bias"] == pytest.approx(LR)  # fixed size
    assert lr["inp.weight"] == pytest.approx(LR * wm)  # input weights: the dense SGD rule, the same as mup
    assert lr["blocks.0.fc1.weight"] == pytest.approx(LR)  # hidden: (fan_out / fan_in) / base ratio = 1
    assert lr["head.weight"] == pytest.approx(LR / wm)
    adam = lr_of(es.param_groups(ResMLP(D0 * wm), LR, base=meta(ResMLP, D0)))
    assert adam["blocks.0.fc1.bias"] == adam["blocks.0.norm.weight"] == pytest.approx(LR)  # Adam: 1


class Conv1D(nn.Module):
    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))


class GPTish(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.wte = nn.Embedding(50, width)
        self.attn = nn.MultiheadAttention(width, 4)
        self.c_fc = Conv1D(4 * width, width)
        self.c_proj = Conv1D(width, 4 * width)
        self.lm_head = nn.Linear(width, 50, bias=False)


def test_conv1d_and_attention_weights_get_the_dense_rule():
    lr = lr_of(es.param_groups(GPTish(256), LR, base=meta(GPTish, D0)))
    assert lr["c_fc.weight"] == pytest.approx(LR * D0 / 256)  # fan-in is the weight's first dim (nx)
    assert lr["c_proj.weight"] == pytest.approx(LR * D0 / 256)  # 4 * 64 / (4 * 256)
    assert lr["attn.in_proj_weight"] == pytest.approx(LR * D0 / 256)
    assert lr["attn.out_proj.weight"] == pytest.approx(LR * D0 / 256)
    assert lr["wte.weight"] == pytest.approx(LR) and lr["lm_head.weight"] == pytest.approx(LR * D0 / 256)


# ---- mup_init ------------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, width, d_in=16):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.hidden = nn.Linear(width, width)
        self.up = Conv1D(4 * width, width)
        self.down = nn.Linear(4 * width, width)
        self.head = nn.Linear(width, 10)


def test_mup_init_gives_the_spectral_std_and_a_zero_head():
    torch.manual_seed(0)
    w = 512
    model = es.mup_init(MLP(w))
    assert model.hidden.weight.std().item() == pytest.approx(1 / math.sqrt(w), rel=0.02)
    assert model.inp.weight.std().item() == pytest.approx(math.sqrt(16) / 16, rel=0.05)  # width-independent
    assert model.up.weight.std().item() == pytest.approx(math.sqrt(w) / w, rel=0.02)  # Conv1D: fan-in nx = w
    assert model.down.weight.std().item() == pytest.approx(math.sqrt(w) / (4 * w), rel=0.02)
    assert torch.count_nonzero(model.head.weight) == 0  # THEORY 4: the output head starts at zero
    for m in (model.inp, model.hidden, model.up, model.down, model.head):
        assert torch.count_nonzero(m.bias) == 0
    stds = [es.mup_init(MLP(v), zero_head=False).head.weight.std().item() for v in (256, 1024)]
    assert stds[0] == pytest.approx(math.sqrt(10) / 256, rel=0.05)  # sqrt(fan_out) / fan_in: muP's 1/width head
    assert stds[1] == pytest.approx(math.sqrt(10) / 1024, rel=0.05)
    g = lambda: torch.Generator().manual_seed(3)
    assert torch.equal(
        es.mup_init(MLP(64), generator=g()).hidden.weight, es.mup_init(MLP(64), generator=g()).hidden.weight
    )


def test_mup_init_keeps_zero_weights_structured_layers_embeddings_and_tied_heads():
    torch.manual_seed(1)
    model = MLP(64)
    nn.init.zeros_(model.down.weight)
    es.structure(model, es.presets.btt(rank=1), "hidden")
    cores = {n: getattr(model.hidden, n).detach().clone() for n in model.hidden.core_names}
    es.mup_init(model, zero=re.compile(r"hid.*"))
    assert torch.count_nonzero(model.down.weight) == 0  # the model's own zero init stays
    first, last = model.hidden.core_names
    assert torch.equal(getattr(model.hidden, first), cores[first])  # StructuredLinear keeps its per-core init
    assert torch.count_nonzero(getattr(model.hidden, last)) == 0 and model.hidden.zero_init  # zero=: last core

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 64)
            self.fc = nn.Linear(64, 64)
            self.head = nn.Linear(64, 50, bias=False)
            self.head.weight = self.emb.weight

    lm = LM()
    emb = lm.emb.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"left 1 weight-tied layer\(s\).*'head' \(shared with 'emb'\)"):
        es.mup_init(lm)
    assert torch.equal(lm.emb.weight, emb)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        es.mup_init(MLP(64), zero=["down"], zero_head=False)
    with pytest.raises(es.MupError, match="zero names 'nope'"):
        es.mup_init(MLP(64), zero=["nope"])
    with pytest.raises(es.MupError, match="zero must be"):
        es.mup_init(MLP(64), zero=3)


def test_mup_init_then_param_groups_give_a_readout_that_shrinks_at_init_and_moves_by_o1():
    """At init the head's output shrinks as 1/sqrt(width) (features O(1), head entries ~ 1/width), as mup's
    readout does; after one Adam step the output moves by the same amount at every width (seeds 0-2:
    init ratio 0.34-0.47, move ratio 1.05-1.07 from width 128 to 1024)."""
    x = torch.randn(512, 16, generator=torch.Generator().manual_seed(0))
    rms = lambda t: t.pow(2).mean().sqrt().item()
    init, move = [], []
    for seed in range(3):
        outs, moves = [], []
        for w in (128, 1024):
            torch.manual_seed(seed)
            model = es.mup_init(MLP(w), zero_head=False)
            fwd = lambda m: m.head(torch.relu(m.hidden(torch.relu(m.inp(x)))))
            y0 = fwd(model).detach()
            opt = torch.optim.Adam(es.param_groups(model, 1e-2, base=meta(MLP, D0)))
            fwd(model).square().mean().backward()
            opt.step()
            outs.append(rms(y0))
            moves.append(rms(fwd(model) - y0))
        init.append(outs[1] / outs[0])
        move.append(moves[1] / moves[0])
    assert sum(init) / 3 == pytest.approx(1 / math.sqrt(8), rel=0.25)
    assert all(0.8 < m < 1.25 for m in move), move
