"""from_dense: exact recovery of structured matrices and optimal (Eckart-Young) projection of dense ones."""

import pytest
import torch

import einstruct as es
from einstruct.layers.linear import StructuredLinear

CASES = [
    (es.presets.btt(rank=1), 64, 64),
    (es.presets.btt(rank=3), 64, 64),
    (es.presets.btt(rank=2), 64, 256),
    (es.presets.low_rank(rank=4), 48, 80),
    (es.presets.monarch(blocks=4), 64, 64),
    (es.presets.monarch(blocks=4), 64, 128),
    (es.presets.monarch(blocks=2), 32, 32),
    (es.presets.kron(), 64, 36),
    (es.presets.tt(rank=3), 64, 64),
    (es.presets.dense(), 10, 7),
    (es.presets.block_diag(blocks=4), 32, 16),
    (es.theta(0.5, 0.25, 0.25, 0.25, 0.5, 0.25, 0.25), 256, 256),
]


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("spec, d_in, d_out", CASES, ids=lambda v: getattr(v, "label", str(v)))
def test_projection_recovers_a_structured_matrix(spec, d_in, d_out):
    torch.manual_seed(0)
    W = StructuredLinear(d_in, d_out, spec).to_dense().detach()
    p = es.from_dense(W, spec)
    assert isinstance(p, StructuredLinear) and (p.in_features, p.out_features) == (d_in, d_out)
    assert rel(p.to_dense().detach(), W) < 1e-4


@pytest.mark.parametrize("spec, d_in, d_out", CASES, ids=lambda v: getattr(v, "label", str(v)))
def test_projection_of_random_matrix_beats_random_layer_and_is_locally_optimal(spec, d_in, d_out):
    torch.manual_seed(1)
    W = torch.randn(d_out, d_in, dtype=torch.float64)
    p = es.from_dense(W, spec)
    err = float((p.to_dense().detach() - W).norm() ** 2)
    rnd = StructuredLinear(d_in, d_out, spec, dtype=torch.float64).to_dense().detach()
    assert err <= float((rnd - W).norm() ** 2)
    # any small move of the cores makes the fit worse (the projection is a minimum)
    for _ in range(3):
        q = es.from_dense(W, spec)
        with torch.no_grad():
            for name in q.core_names:
                c = getattr(q, name)
                c.add_(1e-3 * c.abs().mean() * torch.randn_like(c))
        assert float((q.to_dense().detach() - W).norm() ** 2) >= err * (1 - 1e-12)


def test_low_rank_error_is_the_eckart_young_optimum():
    torch.manual_seed(2)
    W = torch.randn(80, 48, dtype=torch.float64)
    s = torch.linalg.svdvals(W)
    for r in (1, 5, 20):
        p = es.from_dense(W, es.presets.low_rank(rank=r))
        err = float((p.to_dense().detach() - W).norm() ** 2)
        assert err == pytest.approx(float((s[r:] ** 2).sum()), rel=1e-9)
        # singular values split as sqrt: both cores carry the same spectrum
        V, U = p.V.detach().reshape(48, -1), p.U.detach().reshape(-1, 80)  # rank 1 drops the r axis
        assert torch.allclose(torch.linalg.svdvals(V), torch.linalg.svdvals(U), rtol=1e-9)
        assert torch.allclose(torch.linalg.svdvals(V) ** 2, s[:r], rtol=1e-9)


def test_btt_error_is_the_per_block_svd_optimum():
    """W[(f, e), (g, a)]: block (f, g) is a rank-r matrix; the best error drops the tail of every block."""
    torch.manual_seed(3)
    g = a = f = e = 8
    r = 2
    W = torch.randn(f * e, g * a, dtype=torch.float64)
    p = es.from_dense(W, es.presets.btt(rank=r))
    blocks = W.reshape(f, e, g, a)
    best = 0.0
    for fi in range(f):
        for gi in range(g):
            s = torch.linalg.svdvals(blocks[fi, :, gi, :])
            best += float((s[r:] ** 2).sum())
    assert float((p.to_dense().detach() - W).norm() ** 2) == pytest.approx(best, rel=1e-9)


def test_monarch_error_is_the_per_block_svd_optimum():
    """Monarch 'ga,gafr,fgre->ef' orders y as (e, f): block (f, g) of W[(e, f), (g, a)] has rank r."""
    torch.manual_seed(4)
    b, d = 4, 64
    a = e = d // b
    r = d // b**2
    W = torch.randn(d, d, dtype=torch.float64)
    p = es.from_dense(W, es.presets.monarch(blocks=b))
    blocks = W.reshape(e, b, b, a)
    best = sum(float((torch.linalg.svdvals(blocks[:, fi, gi, :])[r:] ** 2).sum()) for fi in range(b) for gi in range(b))
    assert float((p.to_dense().detach() - W).norm() ** 2) == pytest.approx(best, rel=1e-9)


def test_kron_is_the_nearest_kronecker_product():
    torch.manual_seed(5)
    A, B = torch.randn(6, 4, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    W = torch.kron(A, B)  # (30, 12): y = (c, d), x = (a, b)
    p = es.from_dense(W, es.presets.kron())
    assert (p.structure.sizes["a"], p.structure.sizes["b"]) == (4, 3)
    assert rel(p.to_dense().detach(), W) < 1e-12


def test_dense_copies_and_bias_is_copied():
    torch.manual_seed(6)
    W, b = torch.randn(7, 10), torch.randn(7)
    p = es.from_dense(W, es.presets.dense(), bias=b)
    x = torch.randn(5, 10)
    assert torch.allclose(p(x), x @ W.T + b, atol=1e-6)
    assert p.W.dtype == W.dtype


def test_weight_normalised_layer_reproduces_the_projection():
    torch.manual_seed(7)
    spec = es.presets.btt(rank=2)
    W = StructuredLinear(64, 64, spec, init_scale=0.5).to_dense().detach()  # RMS far above the muP std
    p = es.from_dense(W, spec, normalize=True)
    assert p.gains is not None and all(float(g.detach()) > 1 for g in p.gains.values())
    assert rel(p.to_dense().detach(), W) < 1e-4


def test_padded_layer_projects_into_its_padded_structure():
    torch.manual_seed(8)
    spec = es.presets.btt(rank=1)
    st = es.compile(spec, 62, 62)
    assert st.padded
    W = torch.randn(62, 62, dtype=torch.float64)
    p = es.from_dense(W, spec)
    assert p.to_dense().shape == (62, 62)
    rnd = StructuredLinear(62, 62, spec, dtype=torch.float64).to_dense().detach()
    assert (p.to_dense().detach() - W).norm() < (rnd - W).norm()


def test_unsupported_specs_and_bad_inputs_raise_spec_error():
    shared = es.Spec("ga,A:ab->gb", g=4, a=16, b=16)  # one block reused along g: no core holds axis g
    with pytest.raises(es.SpecError, match=r"axis 'g'.*in no core.*supported"):
        es.from_dense(torch.randn(64, 64), shared)
    with pytest.raises(es.SpecError, match="2-d"):
        es.from_dense(torch.randn(64), es.presets.btt())
    with pytest.raises(es.SpecError, match="bias"):
        es.from_dense(torch.randn(64, 64), es.presets.btt(), bias=torch.randn(3))
    with pytest.raises(es.SpecError, match="meta"):
        es.from_dense(torch.empty(64, 64, device="meta"), es.presets.btt())
