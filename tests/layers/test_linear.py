"""StructuredLinear against the dense matrix, the numpy reference, exact FLOP counts and THEORY 4-5."""

import math
import random

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import einstruct as es
from einstruct.layers.linear import StructuredLinear, plan_chain
from einstruct.rank import dense_matrix

P = es.presets
PRESETS = {
    "dense": P.dense,
    "low_rank3": lambda: P.low_rank(rank=3),
    "low_rank1": lambda: P.low_rank(rank=1),  # the activation between the cores is a scalar per example
    "kron": P.kron,
    "tt2": lambda: P.tt(rank=2),
    "btt1": lambda: P.btt(rank=1),
    "btt3": lambda: P.btt(rank=3),
    "monarch4": lambda: P.monarch(blocks=4),
    "monarch2": lambda: P.monarch(blocks=2),
    "block_diag4": lambda: P.block_diag(blocks=4),
}
SIZES = [(64, 64), (64, 256), (144, 36)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def sample_theta(rng: random.Random):
    """A valid theta (THEORY 2): simplex sums, not redundant, rho = u * min(alpha, epsilon)."""
    while True:
        al, be = (round(v, 2) for v in sorted((rng.random(), rng.random())))
        al, be = al, round(be - al, 2)
        ga = round(1 - al - be, 2)
        de, ep = (round(v, 2) for v in sorted((rng.random(), rng.random())))
        ep = round(ep - de, 2)
        ph = round(1 - de - ep, 2)
        if min(al, be, ga, de, ep, ph) < 0 or min(al, ep) < min(be, de):
            continue
        rho = math.floor(rng.random() * min(al, ep) * 100) / 100
        return al, be, ga, de, ep, ph, rho


def einsum_reference(layer, x2d):
    """y without bias by one torch.einsum over the whole spec: autograd independent of the layer's plan."""
    st = layer.structure
    spec = st.spec
    xs = torch.nn.functional.pad(x2d, (0, st.d_in_padded - layer.in_features))
    ops = [xs.reshape(-1, *(st.sizes[a] for a in spec.x))]
    for c in spec.cores:  # a core that is a scalar at this size is not a parameter: it is 1
        shape = tuple(st.sizes[a] for a in c.axes)
        ops.append(getattr(layer, c.name) if c.name in layer.core_names else torch.ones(shape, dtype=x2d.dtype))
    if layer.normalize:
        eff = layer.effective_cores()
        ops = [ops[0]] + [eff.get(c.name, o) for c, o in zip(spec.cores, ops[1:])]
    expr = ",".join(["Z" + spec.x] + [c.axes for c in spec.cores]) + "->Z" + spec.y
    y = torch.einsum(expr, *ops).reshape(x2d.shape[0], st.d_out_padded)
    return y[:, : layer.out_features]


def check_against_dense(layer, lead=(3, 5), atol=1e-10):
    """to_dense = numpy reference; layer(x) = x W^T + b; grads of x, bias, cores match independent paths.

    Both training paths: torch's own ops (small batches) and the custom Functions (large batches).
    """
    saved = layer.builtin_rows
    try:
        for rows in (saved, 0):
            layer.builtin_rows = rows
            layer.zero_grad()
            _check_against_dense(layer, lead, atol)
    finally:
        layer.builtin_rows = saved


def _check_against_dense(layer, lead, atol):
    st = layer.structure
    d_in, d_out = layer.in_features, layer.out_features
    with torch.no_grad():
        layer.bias.normal_()
    w = layer.to_dense()
    assert w.shape == (d_out, d_in)
    cores = {n: t.detach().numpy() for n, t in layer.effective_cores().items()}
    cores.update({c.name: np.ones([st.sizes[a] for a in c.axes]) for c in st.spec.cores if c.name not in cores})
    ref = dense_matrix(st, cores=cores)[:d_out, :d_in]
    np.testing.assert_allclose(w.detach().numpy(), ref, atol=atol, rtol=0)
    assert np.abs(ref).max() > 0.01  # a real matrix, not zeros

    x = torch.randn(*lead, d_in, dtype=torch.float64, requires_grad=True)
    c = torch.randn(*lead, d_out, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (*lead, d_out)
    torch.testing.assert_close(y, x @ w.T + layer.bias, atol=atol, rtol=0)
    (y * c).sum().backward()
    params = [layer.bias] + [getattr(layer, n) for n in layer.core_names]
    got = [x.grad.clone()] + [p.grad.clone() for p in params]
    # Dense-matrix gradients: dL/dx = c W, dL/db = sum of c.
    torch.testing.assert_close(got[0], c @ w.detach(), atol=atol, rtol=0)
    torch.testing.assert_close(got[1], c.reshape(-1, d_out).sum(0), atol=atol, rtol=0)
    # Core gradients against autograd through one plain einsum of the spec.
    x.grad = None
    layer.zero_grad()
    y_ref = einsum_reference(layer, x.reshape(-1, d_in)) + layer.bias
    (y_ref.reshape(c.shape) * c).sum().backward()
    for g, p in zip(got[2:], params[1:]):
        torch.testing.assert_close(g, p.grad, atol=atol, rtol=0)
        assert g.abs().max() > 0


@pytest.mark.parametrize("d_in, d_out", SIZES)
@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_equal_their_dense_matrix(name, d_in, d_out):
    layer = StructuredLinear(d_in, d_out, PRESETS[name](), dtype=torch.float64)
    check_against_dense(layer)


def test_fifty_valid_theta_equal_their_dense_matrix():
    rng = random.Random(7)
    dims = [(64, 64), (256, 256), (64, 256), (256, 64)]
    for i in range(50):
        t = sample_theta(rng)
        spec = es.theta(*t)
        d_in, d_out = dims[i % len(dims)]
        layer = StructuredLinear(d_in, d_out, spec, dtype=torch.float64)
        assert not any("redundant" in w or "degenerate" in w for w in layer.structure.warnings), t
        check_against_dense(layer, lead=(4,))


def test_named_theta_points_match_presets_numerically():
    # BTT as theta: same matrix as the btt preset once the cores are copied over (axes permuted).
    btt = StructuredLinear(64, 64, P.btt(rank=1), dtype=torch.float64)
    th = StructuredLinear(64, 64, es.theta(0.5, 0, 0.5, 0, 0.5, 0.5, 0), dtype=torch.float64)
    assert th.structure.flops == btt.structure.flops == 2 * 2 * 64 * 8
    check_against_dense(th, lead=(2,))


@pytest.mark.parametrize("lead", [(7,), (2, 3)])
@pytest.mark.parametrize("name", list(PRESETS))
def test_flop_counter_counts_exactly_structure_flops(name, lead):
    for d_in, d_out in [(64, 64), (144, 36)]:
        layer = StructuredLinear(d_in, d_out, PRESETS[name]())
        x = torch.randn(*lead, d_in)
        with FlopCounterMode(display=False) as fc:
            layer(x)
        n = math.prod(lead)
        assert fc.get_total_flops() == layer.structure.flops * n == layer.flops(n)
        # One mm/bmm per core.
        counts = fc.get_flop_counts()["Global"]
        assert sum(counts.values()) == layer.structure.flops * n


def test_flops_with_normalize_and_padding_count_the_chain_only():
    layer = StructuredLinear(1000, 1000, P.monarch(blocks=3), normalize=True)
    assert layer.structure.padded
    with FlopCounterMode(display=False) as fc:
        layer(torch.randn(5, 1000))
    st = layer.structure
    assert fc.get_total_flops() == st.flops * 5 == layer.flops(5)
    # Padded sizes are what runs: 2 * b * (a * b * r + b * r * e) per example with a = e = 334, r = 111.
    assert st.flops == 2 * (3 * 334 * 3 * 111 + 3 * 3 * 111 * 334)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("name", ["btt3", "low_rank3", "monarch4", "tt2", "kron"])
def test_zero_init_starts_at_zero_and_every_core_trains(name, normalize):
    layer = StructuredLinear(64, 64, PRESETS[name](), zero_init=True, normalize=normalize)
    names = layer.core_names
    assert torch.count_nonzero(getattr(layer, names[-1])) == 0
    assert all(torch.count_nonzero(getattr(layer, n)) > 0 for n in names[:-1])
    x, target = torch.randn(16, 64), torch.randn(16, 64)
    y = layer(x)
    assert torch.equal(y, torch.zeros_like(y))
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    ((layer(x) - target) ** 2).mean().backward()
    grads = {n: getattr(layer, n).grad for n in names}
    assert grads[names[-1]].abs().max() > 0  # the last core learns at once
    assert all(torch.count_nonzero(grads[n]) == 0 for n in names[:-1])  # the others wait for it
    opt.step()
    opt.zero_grad()
    loss = ((layer(x) - target) ** 2).mean()
    loss.backward()
    for p in layer.parameters():
        assert torch.isfinite(p.grad).all() and torch.isfinite(p).all()
    for n in names:
        assert getattr(layer, n).grad.abs().max() > 0, n
    assert torch.isfinite(loss)


def rms(t):
    return t.double().square().mean().sqrt().item()


def test_weight_norm_caps_core_rms_at_init_std_and_gain_is_learnable():
    layer = StructuredLinear(256, 256, P.btt(rank=2), normalize=True)
    assert set(layer.gains.keys()) == set(layer.core_names)
    assert all(g.shape == () and g.item() == 1.0 for g in layer.gains.values())
    first, second = layer.core_names
    sigma = layer.structure.core(first).init_std
    with torch.no_grad():
        getattr(layer, first).mul_(10.0)
    eff = layer.effective_cores()
    assert rms(getattr(layer, first)) > 9 * sigma
    assert rms(eff[first]) == pytest.approx(sigma, rel=1e-4)
    # A core below its cap is untouched.
    with torch.no_grad():
        getattr(layer, second).mul_(0.1)
    eff = layer.effective_cores()
    torch.testing.assert_close(eff[second], getattr(layer, second), rtol=0, atol=0)
    # The capped layer equals the dense matrix of its effective cores.
    layer64 = layer.double()
    check_against_dense(layer64, lead=(3,))
    # The gain gets a gradient and scales the output linearly (bias excluded).
    layer = StructuredLinear(64, 64, P.btt(rank=2), normalize=True, bias=False)
    x = torch.randn(8, 64)
    y0 = layer(x)
    y0.square().sum().backward()
    assert all(g.grad is not None and g.grad.abs() > 0 for g in layer.gains.values())
    with torch.no_grad():
        layer.gains[first].fill_(3.0)
    torch.testing.assert_close(layer(x), 3 * y0, rtol=1e-5, atol=1e-6)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    opt.step()
    assert layer.gains[second].item() != 1.0


def mixed_forms(layer):
    return [s.act_kr != s.core_left for s in layer._chain.steps]


@pytest.mark.parametrize("d_in, d_out", [(256, 256), (256, 1024)])
def test_transposed_matmul_forms_have_exact_gradients(d_in, d_out):
    layer = StructuredLinear(d_in, d_out, P.btt(rank=2), dtype=torch.float64)
    assert any(mixed_forms(layer))  # the custom-backward matmul is in use
    check_against_dense(layer, lead=(6,))


def test_weight_norm_never_syncs_or_reads_tensors():
    # fullgraph compile fails on .item(), Python max on tensors or data-dependent control flow.
    layer = StructuredLinear(256, 256, P.btt(rank=2), normalize=True)
    assert any(mixed_forms(layer))
    x = torch.randn(4, 256, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    y.square().sum().backward()
    gx, gcore = x.grad.clone(), layer.R.grad.clone()
    x.grad = None
    layer.zero_grad()
    y_eager = layer(x)
    y_eager.square().sum().backward()
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gcore, layer.R.grad)


def test_torch_compile_eager_backend_equals_eager_on_padded_layer():
    layer = StructuredLinear(1000, 500, P.monarch(blocks=3))
    x = torch.randn(2, 3, 1000)
    compiled = torch.compile(layer, backend="eager")
    torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)


def test_init_stds_follow_mup_and_overrides():
    layer = StructuredLinear(1024, 1024, P.btt(rank=4))
    for c in layer.structure.cores:
        assert rms(getattr(layer, c.name)) == pytest.approx(c.init_std, rel=0.03)
        assert layer.init_stds[c.name] == c.init_std
    assert torch.count_nonzero(layer.bias) == 0
    # THEORY 4: first core sqrt(min(32, 128)) / 32 at d = 1024 (contracted a = 32, produced f r = 128).
    assert layer.structure.cores[0].init_std == pytest.approx(math.sqrt(32) / 32)

    layer = StructuredLinear(1024, 512, P.btt(rank=4), init_scale=0.05)
    for n in layer.core_names:
        assert rms(getattr(layer, n)) == pytest.approx(0.05, rel=0.03)

    layer = StructuredLinear(4096, 1024, P.low_rank(rank=16), low_rank_init=True, zero_init=True)
    first, last = layer.core_names
    assert rms(getattr(layer, first)) == pytest.approx(1 / 64, rel=0.03)  # 1/sqrt(d_in), not sqrt(r)/d_in
    assert torch.count_nonzero(getattr(layer, last)) == 0

    layer.reset_parameters()
    assert rms(getattr(layer, first)) == pytest.approx(1 / 64, rel=0.03)


def test_state_dict_round_trip_gives_equal_outputs():
    a = StructuredLinear(144, 36, P.tt(rank=2), normalize=True)
    with torch.no_grad():
        a.gains[a.core_names[0]].fill_(0.7)
        a.bias.normal_()
    sd = a.state_dict()
    assert set(sd) == {"bias", *a.core_names, *(f"gains.{n}" for n in a.core_names)}
    for c in a.structure.cores:
        assert sd[c.name].shape == c.shape
    torch.manual_seed(1)
    b = StructuredLinear(144, 36, P.tt(rank=2), normalize=True)
    x = torch.randn(5, 144)
    assert not torch.equal(a(x), b(x))
    b.load_state_dict(sd)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_float64_and_bfloat16_layers():
    x64 = torch.randn(6, 256, dtype=torch.float64)
    layer = StructuredLinear(256, 128, P.monarch(blocks=4), dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    torch.testing.assert_close(layer(x64), x64 @ layer.to_dense().T + layer.bias, rtol=0, atol=1e-12)

    bf = StructuredLinear(256, 128, P.monarch(blocks=4), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf.parameters())
    y = bf(x64.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    ref = x64 @ bf.to_dense().double().T
    err = (y.double() - ref).norm() / ref.norm()
    assert err < 2e-2


@pytest.mark.parametrize("builtin", [True, False])
def test_autocast_bfloat16_on_cpu(builtin):
    layer = StructuredLinear(256, 256, P.btt(rank=2), normalize=True)
    assert any(mixed_forms(layer))
    layer.builtin_rows = 10 if builtin else 0  # torch's own ops, or the custom Functions
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(10, 256)
    y32 = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    err = (y.float() - y32).norm() / y32.norm()
    assert 0 < err < 2e-2
    y.float().sum().backward()
    assert layer.R.grad.dtype == torch.float32 and torch.isfinite(layer.R.grad).all()


def test_padded_layer_equals_its_dense_matrix():
    layer = StructuredLinear(1000, 1000, P.monarch(blocks=3), dtype=torch.float64)
    st = layer.structure
    assert st.padded and (st.d_in_padded, st.d_out_padded) == (1002, 1002)
    w = layer.to_dense()
    assert w.shape == (1000, 1000)
    check_against_dense(layer, lead=(4,))
    assert "padded=(1002, 1002)" in repr(layer)


def test_rectangular_padded_layer():
    layer = StructuredLinear(1000, 300, P.btt(rank=2), dtype=torch.float64)
    check_against_dense(layer, lead=(2,))


def test_extra_repr_reports_structure_sizes_params_and_flops():
    layer = StructuredLinear(1024, 4096, P.btt(rank=4))
    text = repr(layer)
    st = layer.structure
    assert "btt(rank=4)" in text and st.spec.einsum in text
    assert "in_features=1024" in text and "out_features=4096" in text
    assert f"params={st.params}" in text and f"flops_per_example={st.flops}" in text
    assert sum(p.numel() for n, p in layer.named_parameters() if n != "bias") == st.params


def test_core_parameters_keep_spec_axis_order_and_execution_order():
    layer = StructuredLinear(64, 256, "btt")
    assert layer.core_names == tuple(c.name for c in layer.structure.cores) == ("R", "L")
    for c in layer.structure.cores:
        assert isinstance(getattr(layer, c.name), torch.nn.Parameter)
        assert getattr(layer, c.name).shape == c.shape == tuple(layer.structure.sizes[a] for a in c.axes)
    assert layer.gains is None and layer.normalize is False
    assert layer.spec == es.presets.btt(rank=1)


def test_meta_device_builds_without_data():
    layer = StructuredLinear(4096, 4096, P.btt(rank=4), device="meta", normalize=True)
    assert all(p.is_meta for p in layer.parameters())
    assert layer(torch.empty(2, 4096, device="meta")).shape == (2, 4096)


def test_bad_input_raises_spec_error():
    layer = StructuredLinear(64, 32, P.kron())
    with pytest.raises(es.SpecError, match=r"expects input of shape \(\.\.\., 64\), got \(3, 63\)"):
        layer(torch.randn(3, 63))
    with pytest.raises(es.SpecError, match="in_features"):
        StructuredLinear(0, 32, P.kron())
    with pytest.raises(es.SpecError, match="out_features"):
        StructuredLinear(64, 2.5, P.kron())
    with pytest.raises(es.SpecError, match="low_rank_init"):
        StructuredLinear(64, 64, P.btt(), low_rank_init=True)
    with pytest.raises(es.SpecError, match="init_scale"):
        StructuredLinear(64, 64, P.btt(), init_scale=-1.0)
    with pytest.raises(es.SpecError, match="dtype"):
        StructuredLinear(64, 64, P.btt(), dtype=torch.int64)
    with pytest.raises(es.SpecError, match="unknown preset"):
        StructuredLinear(64, 64, "btt2")
    with pytest.raises(es.SpecError, match="clashes"):
        StructuredLinear(64, 64, es.Spec("i,to:io->o", i="d_in", o="d_out"))
    with pytest.raises(es.SpecError, match="flops"):
        layer.flops(-1)


def test_plan_copies_nothing_for_chains_that_need_no_permute():
    for spec in (P.dense(), P.low_rank(rank=8)):
        chain = plan_chain(es.compile(spec, 1024, 512))
        assert chain.cost == 0 and chain.final_perm is None
        assert all(s.act_perm is None for s in chain.steps) and chain.fuse_bias


def test_plan_copies_btt_in_whole_runs_and_kron_within_examples():
    # BTT r=4 at d=1024 (g = a = f = e = 32): its blocks change between the steps, so x, the g f r
    # intermediate and y are each copied once, all as runs of >= 16 contiguous elements (2 per element);
    # both matmuls use a transposed form (1 per input element) rather than a copy that scatters runs of
    # r = 4 elements (5 per element).
    chain = plan_chain(es.compile(P.btt(rank=4), 1024, 1024))
    assert chain.cost == 2 * 1024 + 1 * 1024 + 2 * (32 * 32 * 4) + 1 * (32 * 32 * 4) + 2 * 1024
    assert [s.act_perm is not None for s in chain.steps] == [True, True] and chain.final_perm is not None
    # Kronecker: one transpose within each example per step, plain (rows, K) @ (K, P) matmuls.
    chain = plan_chain(es.compile(P.kron(), 1024, 1024))
    assert chain.cost == 2 * 1024 * 2 and chain.final_perm is None
    assert all(s.act_perm == (0, 2, 1) and not s.act_kr and not s.core_left for s in chain.steps)


@pytest.mark.parametrize("name", list(PRESETS))
def test_plain_plan_uses_only_the_plain_matmul_form_and_costs_no_less(name):
    # The small-batch path's plan: (rows, K) @ (K, P) only, as torch.einsum; the full planner may only
    # find a cheaper layout (it searches a superset).
    st = es.compile(PRESETS[name](), 256, 256)
    plain, full = plan_chain(st, plain=True), plan_chain(st)
    assert all(not s.act_kr and not s.core_left for s in plain.steps)
    assert full.cost <= plain.cost
