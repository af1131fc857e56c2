"""BTTMoE and MoE (THEORY 6): equivalence with a rank-E BTT, routing, losses, both paths, exact FLOPs, muP."""

import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import einstruct as es

PATHS = ("dense", "sparse", "tiled")


def _route_randomly(layer, std=0.5, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=g) * std)


def _fixed_logits(layer, logits):
    """Every token gets the same router logits (zero weight, the logits as bias)."""
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.bias.copy_(torch.as_tensor(logits, dtype=layer.router.bias.dtype))


# ---- equivalence with a rank-E BTT --------------------------------------------------------------------


@pytest.mark.parametrize("dispatch", PATHS)
def test_equal_gates_give_the_rank_E_btt_with_slices_scaled(dispatch):
    torch.manual_seed(0)
    E = 4
    moe = es.BTTMoE(64, 144, experts=E, active=E, dispatch=dispatch)  # zero router: all gates 1/E
    btt = es.StructuredLinear(64, 144, es.presets.btt(rank=E))
    with torch.no_grad():
        moe.bias.normal_()
        btt.R.copy_(moe.R)
        btt.L.copy_(moe.L / E)
        btt.bias.copy_(moe.bias)
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(moe(x), btt(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(moe.to_dense(torch.full((E,), 1.0 / E)), btt.to_dense(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dispatch", PATHS)
def test_fixed_top_k_gates_scale_the_chosen_slices_and_zero_the_others(dispatch):
    torch.manual_seed(1)
    logits = torch.tensor([0.3, -1.0, 1.2, 0.0, 2.0, -0.5])
    moe = es.BTTMoE(64, 64, experts=6, active=2, dispatch=dispatch, router_bias=True)
    _fixed_logits(moe, logits)
    gates = torch.zeros(6)
    gates[[4, 2]] = torch.softmax(torch.tensor([2.0, 1.2]), 0)  # the top 2, softmax over the chosen logits
    btt = es.StructuredLinear(64, 64, es.presets.btt(rank=6), bias=False)
    with torch.no_grad():
        btt.R.copy_(moe.R)
        btt.L.copy_(moe.L * gates.view(1, 1, 6, 1))
        moe.bias.zero_()
    x = torch.randn(10, 64)
    torch.testing.assert_close(moe(x), btt(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(moe(x), x @ moe.to_dense(gates).T, rtol=1e-5, atol=1e-6)


def test_each_expert_is_a_rank1_btt_slice():
    torch.manual_seed(2)
    moe = es.BTTMoE(64, 64, experts=3, active=1)
    one = es.StructuredLinear(64, 64, es.presets.btt(rank=1), bias=False)
    with torch.no_grad():
        one.R.copy_(moe.R[..., 1])
        one.L.copy_(moe.L[:, :, 1, :])
    torch.testing.assert_close(moe.to_dense(torch.tensor([0.0, 1.0, 0.0])), one.to_dense(), rtol=1e-5, atol=1e-6)


# ---- routing and gradients ----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [es.BTTMoE, es.MoE])
def test_router_starts_uniform(cls):
    torch.manual_seed(3)
    layer = cls(64, 64, experts=8, active=2)
    assert isinstance(layer.router, nn.Linear) and layer.router.weight.shape == (8, 64)
    assert torch.count_nonzero(layer.router.weight) == 0
    layer(torch.randn(16, 64))
    stats = layer.router_stats()
    torch.testing.assert_close(stats["importance"], torch.full((8,), 1 / 8))
    assert stats["entropy"].item() == pytest.approx(math.log(8), rel=1e-6)
    assert not stats["entropy"].requires_grad


@pytest.mark.parametrize("dispatch", PATHS)
@pytest.mark.parametrize("cls", [es.BTTMoE, es.MoE])
def test_gradients_reach_the_router_from_the_output(cls, dispatch):
    torch.manual_seed(4)
    layer = cls(64, 64, experts=4, active=2, dispatch=dispatch)
    x = torch.randn(12, 64)
    layer(x).square().sum().backward()  # the output only, no aux loss
    g = layer.router.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_aux_loss_gives_the_router_gradient_too():
    torch.manual_seed(5)
    layer = es.BTTMoE(64, 64, experts=4, active=1)  # k = 1: the gate is 1, the output gives the router nothing
    _route_randomly(layer)
    x = torch.randn(32, 64)
    layer(x).sum().backward()
    assert layer.router.weight.grad.abs().max() == 0
    layer.router.weight.grad = None
    layer(x)
    layer.aux_loss().backward()
    assert layer.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dispatch", PATHS)
def test_backward_does_not_divide_by_a_zero_gate(dispatch):
    """A gate that underflows to exactly 0 must still give finite gradients everywhere."""
    torch.manual_seed(6)
    layer = es.BTTMoE(64, 64, experts=4, active=2, dispatch=dispatch, router_bias=True)
    _fixed_logits(layer, [0.0, -300.0, -400.0, -500.0])
    x = torch.randn(8, 64, requires_grad=True)
    layer(x).square().sum().backward()
    grads = [x.grad, layer.R.grad, layer.L.grad, layer.router.weight.grad, layer.router.bias.grad]
    assert all(torch.isfinite(g).all() for g in grads)
    assert layer.L.grad[:, :, 1].abs().max() == 0  # the zero-gated expert gets no gradient, and no NaN
    assert layer.L.grad[:, :, 0].abs().max() > 0


@pytest.mark.parametrize("cls", [es.BTTMoE, es.MoE])
def test_aux_loss_matches_a_direct_computation_on_fixed_logits(cls):
    torch.manual_seed(7)
    E, k, n = 6, 2, 40
    layer = cls(64, 64, experts=E, active=k)
    _route_randomly(layer, std=0.8)
    x = torch.randn(n, 64)
    layer(x)
    logits = (x @ layer.router.weight.T).double()
    probs = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
    chosen = logits.topk(k, dim=-1).indices
    f = [sum(int(e in row) for row in chosen.tolist()) / (n * k) for e in range(E)]
    P = probs.mean(0)
    switch = E * sum(P[e].item() * f[e] for e in range(E))
    z = (torch.log(torch.exp(logits).sum(-1)) ** 2).mean().item()
    assert layer.aux_loss().item() == pytest.approx(switch + 0.1 * z, rel=1e-5)
    stats = layer.router_stats()
    assert stats["load"].tolist() == pytest.approx(f)
    assert stats["switch_loss"].item() == pytest.approx(switch, rel=1e-5)
    assert stats["z_loss"].item() == pytest.approx(z, rel=1e-5)
    entropy = -(probs * torch.log(probs)).sum(-1).mean().item()
    assert stats["entropy"].item() == pytest.approx(entropy, rel=1e-5)


def test_z_loss_uses_logsumexp_and_stays_finite_for_large_logits():
    layer = es.BTTMoE(64, 64, experts=4, active=2, router_bias=True)
    _fixed_logits(layer, [100.0, 99.0, 0.0, -5.0])  # exp(100) overflows float32
    layer(torch.randn(4, 64))
    lse = 100.0 + math.log(1 + math.exp(-1) + math.exp(-100) + math.exp(-105))
    assert layer.router_stats()["z_loss"].item() == pytest.approx(lse**2, rel=1e-5)
    assert math.isfinite(layer.aux_loss().item())


def test_moe_aux_loss_sums_the_layers_of_a_model():
    torch.manual_seed(8)
    model = nn.Sequential(es.BTTMoE(64, 64, experts=4, active=2), nn.GELU(), es.MoE(64, 64, experts=4, active=2))
    _route_randomly(model[0])
    model(torch.randn(6, 64))
    total = es.moe_aux_loss(model)
    assert total.item() == pytest.approx(model[0].aux_loss().item() + model[2].aux_loss().item(), rel=1e-6)
    assert es.moe_aux_loss(nn.Linear(3, 3)).item() == 0.0
    assert es.AUX_WEIGHT == 0.01


def test_aux_loss_before_any_forward_is_a_clear_error():
    with pytest.raises(RuntimeError, match="has not run a forward"):
        es.BTTMoE(64, 64, experts=4, active=2).aux_loss()


@pytest.mark.parametrize("dispatch", ["dense", "tiled"])
@pytest.mark.parametrize(
    "make", [lambda d: es.BTTMoE(64, 64, 8, 2, dispatch=d, normalize=True), lambda d: es.MoE(64, 64, 4, 2, dispatch=d)]
)
def test_dense_and_tiled_paths_read_nothing_back_to_the_host(monkeypatch, make, dispatch):
    torch.manual_seed(9)
    layer = make(dispatch)
    _route_randomly(layer)
    x = torch.randn(300, 64)  # tiles of several rows

    def refuse(*_a, **_k):
        raise AssertionError("host read in the hot path")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    y = layer(x)
    y.sum().backward()
    layer.aux_loss()
    layer.router_stats()
    monkeypatch.undo()
    assert torch.isfinite(y).all()


# ---- dense and sparse paths ---------------------------------------------------------------------------


def _pair(make, other="sparse"):
    torch.manual_seed(10)
    a, b = make("dense"), make(other)
    _route_randomly(a)
    with torch.no_grad():
        for p in a.parameters():
            if p.dim() > 1 and torch.count_nonzero(p) == 0:
                p.normal_(0, 0.05)  # zero-initialised last cores would hide differences
    b.load_state_dict(a.state_dict())
    return a, b


MAKERS = {
    "btt_moe": lambda d: es.BTTMoE(64, 96, experts=8, active=2, dispatch=d),
    "btt_moe_normalized": lambda d: es.BTTMoE(64, 64, experts=4, active=3, dispatch=d, normalize=True),
    "moe_dense_experts": lambda d: es.MoE(64, 64, experts=4, active=2, hidden=96, dispatch=d),
    "moe_btt_experts": lambda d: es.MoE(64, 64, experts=4, active=2, hidden=144, spec="btt", dispatch=d),
}


KINDS_PATHS = [(k, d) for k in MAKERS for d in PATHS if (k, d) != ("moe_btt_experts", "tiled")]  # tiled: dense experts


@pytest.mark.parametrize("rows", [18, 500])  # tiles of 1 row; of several rows (with padding)
@pytest.mark.parametrize("kind, other", [(k, d) for k, d in KINDS_PATHS if d != "dense"])
def test_dense_and_sparse_paths_give_equal_outputs_and_gradients(kind, other, rows):
    a, b = (m.double() for m in _pair(MAKERS[kind], other))  # float64: equal up to rounding, not float32's noise
    x = torch.randn(2, rows // 2, a.in_features, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa), b(xb)
    tol = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ya, yb, **tol)
    w = torch.randn_like(ya)
    ((ya * w).sum() + a.aux_loss()).backward()
    ((yb * w).sum() + b.aux_loss()).backward()
    torch.testing.assert_close(xa.grad, xb.grad, **tol)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, **tol, msg=name)


@pytest.mark.parametrize("dispatch", ["sparse", "tiled"])
def test_sparse_path_is_deterministic(dispatch):
    layer = MAKERS["btt_moe"](dispatch)
    _route_randomly(layer)
    x = torch.randn(50, 64)
    assert torch.equal(layer(x), layer(x))


# ---- FLOPs --------------------------------------------------------------------------------------------


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


@pytest.mark.parametrize("rows", [28, 300])
@pytest.mark.parametrize("kind, dispatch", KINDS_PATHS)
def test_flops_match_flop_counter_for_each_path(kind, dispatch, rows):
    layer = MAKERS[kind](dispatch)
    _route_randomly(layer)
    x = torch.randn(4, rows // 4, layer.in_features)
    assert layer.flops(rows) == _counted(lambda: layer(x))
    xg = x.clone().requires_grad_()
    assert layer.train_flops(rows) == _counted(lambda: layer(xg).square().sum().backward())
    assert layer.train_flops(rows, input_needs_grad=False) == _counted(lambda: layer(x).square().sum().backward())


def test_tiles_hold_every_routing_and_pad_by_less_than_a_tile_per_expert():
    """rules.moe_tiles: for every way of splitting the assignments over the experts, whole tiles per expert fit
    in the tile count it gives (exhaustive on small sizes), and the padding stays under experts x tile rows."""
    from itertools import product

    for experts in (1, 2, 3):
        for assignments in range(0, 8 * experts * 3 + 2):
            tile, tiles = es.rules.moe_tiles(assignments, experts)
            assert tile == max(1, math.ceil(assignments / (8 * experts)))
            need = max(
                sum(-(-c // tile) for c in (*cs, assignments - sum(cs)))
                for cs in product(range(assignments + 1), repeat=experts - 1)
                if sum(cs) <= assignments
            )
            assert need <= tiles and tile * tiles - assignments < experts * tile
    assert es.rules.moe_tiles(8192, 8) == (128, 71)  # 9088 rows for 8192 assignments: 1.109x
    assert es.rules.moe_expert_rows(4096, 8, 2, "tiled") == 128 * 71


def test_tiled_path_is_exact_when_every_token_picks_the_same_experts():
    """The most padding-hungry routing (all tokens on the same two experts) still fits the tiles exactly."""
    torch.manual_seed(14)
    a = es.BTTMoE(64, 64, experts=4, active=2, dispatch="dense", router_bias=True)
    b = es.BTTMoE(64, 64, experts=4, active=2, dispatch="tiled", router_bias=True)
    _fixed_logits(a, [0.0, 2.0, -1.0, 1.0])
    with torch.no_grad():
        a.L.normal_(0, 0.05)
    b.load_state_dict(a.state_dict())
    x = torch.randn(301, 64)
    torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-6)
    assert b.flops(301) == _counted(lambda: b(x))


def test_flops_formulas_and_the_sparse_saving():
    E, k = 8, 2
    dense = es.BTTMoE(256, 256, experts=E, active=k, dispatch="dense")
    sparse = es.BTTMoE(256, 256, experts=E, active=k, dispatch="sparse")
    router = 2 * 256 * E
    one = es.compile(es.presets.btt(rank=1), 256).flops  # 2 * (16*16*16 + 16*16*16) = 16384
    assert one == 16384
    assert dense.flops(10) == 10 * (router + E * one) == 10 * (router + es.compile(es.presets.btt(rank=E), 256).flops)
    assert sparse.flops(10) == 10 * (router + k * one)
    assert "<- runs" in sparse.table() and f"{router + k * one:,}" in sparse.table()
    with pytest.raises(es.SpecError, match="non-negative integer"):
        dense.flops(-1)


# ---- init, weight norm, muP ---------------------------------------------------------------------------


def test_init_and_caps_are_those_of_a_rank1_btt():
    torch.manual_seed(11)
    layer = es.BTTMoE(1024, 1024, experts=16, active=2, normalize=True)
    one = es.compile(es.presets.btt(rank=1), 1024)
    for name in ("R", "L"):
        std = one.core(name).init_std
        assert layer.init_stds[name] == std
        assert getattr(layer, name).std().item() == pytest.approx(std, rel=0.02)
    rank16 = es.compile(es.presets.btt(rank=16), 1024).core("L").init_std
    assert rank16 < 0.5 * one.core("L").init_std  # so the rank-1 std is a real choice
    with torch.no_grad():
        layer.L.mul_(50.0)  # weight norm caps the effective core at its init std
    eff = layer.effective_cores()["L"]
    assert eff.pow(2).mean().sqrt().item() == pytest.approx(one.core("L").init_std, rel=1e-3)
    assert set(layer.gains) == {"R", "L"}


def test_zero_init_zeroes_the_last_core_only():
    layer = es.BTTMoE(64, 64, experts=4, active=2, zero_init=True)
    assert torch.count_nonzero(layer.L) == 0 and torch.count_nonzero(layer.R) > 0
    assert torch.count_nonzero(layer(torch.randn(3, 64))) == 0
    moe = es.MoE(64, 64, experts=3, active=2, zero_init=True)
    assert all(torch.count_nonzero(e.proj.weight) == 0 and torch.count_nonzero(e.fc.weight) > 0 for e in moe.experts)


def _mlp(width, layer):
    return nn.Sequential(nn.Linear(16, width), nn.GELU(), layer(width), nn.GELU(), nn.Linear(width, 4))


def test_param_groups_give_rank1_kappa_per_core_and_the_dense_rule_to_the_router():
    model = _mlp(256, lambda w: es.BTTMoE(w, w, experts=8, active=2))
    base = _mlp(64, lambda w: nn.Linear(w, w))
    groups = es.param_groups(model, lr=1e-2, base=base)
    mult = {n: g["lr_mult"] for g in groups for n in g["name"]}
    one = es.compile(es.presets.btt(rank=1), 256)
    dense = 64 / 256
    assert mult["2.R"] == pytest.approx(dense * one.core("R").kappa)
    assert mult["2.L"] == pytest.approx(dense * one.core("L").kappa)
    assert mult["2.router.weight"] == pytest.approx(dense)
    assert mult["2.bias"] == 1.0
    rank8 = es.compile(es.presets.btt(rank=8), 256).core("L").kappa
    assert rank8 != one.core("L").kappa
    # the same model at the base width as base works too
    groups = es.param_groups(model, lr=1e-2, base=_mlp(64, lambda w: es.BTTMoE(w, w, experts=8, active=2)))
    assert {n: g["lr_mult"] for g in groups for n in g["name"]}["2.R"] == pytest.approx(mult["2.R"])


def test_param_groups_of_an_ffn_moe_follow_its_linears():
    model = _mlp(128, lambda w: es.MoE(w, w, experts=2, active=1))
    base = _mlp(64, lambda w: es.MoE(w, w, experts=2, active=1))
    mult = {n: g["lr_mult"] for g in es.param_groups(model, lr=1.0, base=base) for n in g["name"]}
    assert mult["2.experts.0.fc.weight"] == pytest.approx(64 / 128)
    assert mult["2.experts.1.proj.weight"] == pytest.approx(256 / 512)
    assert mult["2.router.weight"] == pytest.approx(64 / 128)


# ---- es.structure and es.summary ----------------------------------------------------------------------


def test_structure_with_moe_replaces_linears_but_not_the_head_or_routers():
    torch.manual_seed(12)
    model = _mlp(64, lambda w: nn.Linear(w, w))
    nn.init.zeros_(model[2].weight)
    es.structure(model, "btt", select="all_but_last", moe=dict(experts=4, active=2, dispatch="sparse"))
    assert isinstance(model[0], es.BTTMoE) and isinstance(model[2], es.BTTMoE) and isinstance(model[4], nn.Linear)
    assert model[2].zero_init and torch.count_nonzero(model[2].L) == 0  # a zero layer stays zero
    assert model[0].dispatch == "sparse" and model[0].num_experts == 4
    again = es.structure(model, es.presets.btt(rank=1), select="all")  # routers and MoE insides are never touched
    assert isinstance(again[0].router, nn.Linear) and isinstance(again[4], es.StructuredLinear)
    s = es.summary(model)
    assert s.row("2").kind == "btt_moe(E=4,k=2,sparse)" and s.row("2").flops == model[2].flops(1)
    assert [r.name for r in s.rows] == ["0", "2", "4"]


def test_structure_with_ffn_moe_structures_the_experts():
    model = _mlp(64, lambda w: nn.Linear(w, w))
    es.structure(model, "btt", select="intermediate", moe=es.MoEConfig(experts=3, active=2, kind="ffn"))
    layer = model[2]
    assert isinstance(layer, es.MoE) and layer.hidden == 256
    assert isinstance(layer.experts[0].fc, es.StructuredLinear) and isinstance(layer.router, nn.Linear)
    assert layer(torch.randn(5, 64)).shape == (5, 64)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: es.BTTMoE(64, 64, experts=4, active=5), "active=5 is more than experts=4"),
        (lambda: es.BTTMoE(64, 64, experts=0, active=1), "experts must be a positive integer"),
        (lambda: es.BTTMoE(64, 64, experts=4, active=0), "active must be a positive integer"),
        (lambda: es.BTTMoE(64, 64, experts=2.5, active=1), "experts must be a positive integer"),
        (lambda: es.BTTMoE(64, 64, dispatch="fast"), "dispatch 'fast' is not known"),
        (lambda: es.MoE(64, 64, experts=4, active=2, hidden=0), "hidden must be a positive integer"),
        (lambda: es.MoE(64, 64, spec=3), "spec must be None"),
        (lambda: es.MoE(64, 64, normalize=True), "only apply to structured experts"),
        (lambda: es.MoE(64, 64, spec="btt", dispatch="tiled"), "dispatch 'tiled' .* needs dense experts"),
        (lambda: es.MoEConfig(kind="big"), "kind 'big' is not known"),
        (lambda: es.structure(nn.Linear(64, 64), "kron", moe=4), "spec must be None, 'btt'"),
        (lambda: es.structure(nn.Linear(64, 64), None, moe={"expert": 4}), "unknown setting 'expert'"),
        (lambda: es.structure(nn.Linear(64, 64), None, moe=4, low_rank_init=True), "unknown layer argument"),
        (lambda: es.structure(nn.Linear(64, 64), None, moe=4, copy_weights=True), "copy_weights"),
        (lambda: es.BTTMoE(64, 64)(torch.randn(3, 32)), r"expects input of shape \(\.\.\., 64\)"),
        (lambda: es.BTTMoE(64, 64).to_dense([1.0, 2.0]), "gates must have shape"),
    ],
)
def test_bad_arguments_are_clear_spec_errors(make, match):
    with pytest.raises(es.SpecError, match=match):
        make()


def test_other_shapes_padding_and_empty_batches():
    torch.manual_seed(13)
    layer = es.BTTMoE(96, 40, experts=3, active=2, dispatch="sparse")
    _route_randomly(layer)
    x = torch.randn(2, 3, 96)
    y = layer(x)
    assert y.shape == (2, 3, 40)
    dense = es.BTTMoE(96, 40, experts=3, active=2, dispatch="dense")
    dense.load_state_dict(layer.state_dict())
    torch.testing.assert_close(dense(x), y, rtol=1e-5, atol=1e-6)
    assert layer(torch.randn(0, 96)).shape == (0, 40)


def test_tiled_path_refuses_experts_structured_after_construction():
    layer = es.MoE(64, 64, experts=4, active=2, hidden=144, dispatch="tiled")
    es.structure(layer.experts, "btt", select="all")
    with pytest.raises(es.SpecError, match="experts were structured, so use dispatch 'sparse'"):
        layer(torch.randn(3, 64))
