"""init='project' for specs without a closed form: the least-squares fit (einstruct.layers.fit) and the
relative projection error that from_dense records and es.summary reports."""

import pytest
import torch
from torch import nn

import einstruct as es
from einstruct.layers.linear import StructuredLinear

THREE_KRON = es.Spec("abc,A:ad,B:be,C:cf->def", a=4, b=4, c=4, d=4, e=4, f=4)
THREE_TT = es.Spec("abc,A:adr,B:besr,C:cfs->def", a=4, b=4, c=4, d=4, e=4, f=4, r=3, s=2)
CHAIN = es.Spec("i,A:ir,B:rs,C:so->o", i="d_in", o="d_out", r=8, s=4)
ONE_SIDED = es.Spec("gab,R:gafr,L:fgbre->fe", g=4, a=4, b=4, f=8, e=8, r=2)  # b only in L: no closed form
FITTED = [THREE_KRON, THREE_TT, CHAIN, ONE_SIDED]


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("spec", FITTED, ids=lambda s: s.einsum)
def test_fit_recovers_an_already_structured_matrix(spec):
    torch.manual_seed(0)
    W = StructuredLinear(64, 64, spec, dtype=torch.float64).to_dense().detach()
    p = es.from_dense(W, spec)
    assert rel(p.to_dense().detach(), W) < 1e-8
    assert p.projection_error == pytest.approx(rel(p.to_dense().detach(), W), abs=1e-12)


@pytest.mark.parametrize("spec", FITTED, ids=lambda s: s.einsum)
def test_fit_of_a_random_matrix_is_a_least_squares_optimum_in_each_core(spec):
    torch.manual_seed(1)
    W = torch.randn(64, 64, dtype=torch.float64)
    p = es.from_dense(W, spec)
    err = float((p.to_dense().detach() - W).norm() ** 2)
    assert err < float(W.norm() ** 2)  # better than the zero matrix
    assert p.projection_error == pytest.approx(err**0.5 / float(W.norm()), rel=1e-9)
    # ALS stops near a point where no small move of any one core lowers the error (to 1e-6 of it)
    for name in p.core_names:
        for _ in range(2):
            q = es.from_dense(W, spec)
            with torch.no_grad():
                c = getattr(q, name)
                c.add_(1e-4 * c.abs().mean() * torch.randn_like(c))
            assert float((q.to_dense().detach() - W).norm() ** 2) >= err * (1 - 1e-6)


def test_fit_is_deterministic_and_balances_the_cores():
    W = torch.randn(64, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a, b = es.from_dense(W, THREE_TT), es.from_dense(W, THREE_TT)
    for name in a.core_names:
        assert torch.equal(getattr(a, name), getattr(b, name))
    ratios = [float(getattr(a, n).detach().pow(2).mean().sqrt()) / a.init_stds[n] for n in a.core_names]
    assert max(ratios) / min(ratios) == pytest.approx(1.0, rel=1e-9)


def test_closed_form_error_is_recorded_too():
    torch.manual_seed(2)
    W = torch.randn(80, 48, dtype=torch.float64)
    s = torch.linalg.svdvals(W)
    p = es.from_dense(W, es.presets.low_rank(rank=5))
    assert p.projection_error == pytest.approx(float(s[5:].norm() / s.norm()), rel=1e-9)  # Eckart-Young


def test_structure_init_project_reports_per_layer_errors_in_the_summary():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    # layer 0 already has the 3-core structure: its projection is exact; layer 2 is a random matrix
    with torch.no_grad():
        model[0].weight.copy_(StructuredLinear(64, 64, THREE_TT).to_dense())
    dense = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    es.structure(model, THREE_TT, init="project")
    rows = {r.name: r for r in es.summary(model).rows}
    assert rows["0"].projection_error < 1e-5
    assert rows["2"].projection_error == pytest.approx(rel(model[2].to_dense().detach(), dense[1]), rel=1e-6)
    assert rows["4"].projection_error is None  # the dense head was not projected
    assert "proj err" in str(es.summary(model))
    fresh = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    assert all(r.projection_error is None for r in es.summary(es.structure(fresh, THREE_TT)).rows)


def test_copy_weights_is_init_project():
    torch.manual_seed(5)
    make = lambda: nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    a, b = make(), make()
    b.load_state_dict(a.state_dict())
    es.structure(a, "btt", init="project")
    es.structure(b, "btt", copy_weights=True)
    assert torch.equal(a[0].R, b[0].R) and torch.equal(a[0].L, b[0].L)
    with pytest.raises(es.SpecError, match=r"init must be 'mup'.*or 'project'"):
        es.structure(make(), "btt", init="svd")
    with pytest.raises(es.SpecError, match="copy_weights=True is init='project'"):
        es.structure(make(), "btt", init="mup", copy_weights=True)


def test_a_model_whose_weights_are_already_structured_projects_with_zero_error():
    torch.manual_seed(6)
    specs = {"0": es.presets.btt(rank=2), "2": THREE_TT, "4": es.presets.monarch(blocks=4)}
    pick = lambda name, m: specs.get(name)
    model = nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 8)
    )
    es.structure(model, None, select=pick, normalize=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # gains and biases off their init too
    x = torch.randn(5, 64)
    want = model(x).detach()
    es.merge(model)  # the same model with its structured matrices held densely
    es.structure(model, None, select=pick, init="project")
    errors = {r.name: r.projection_error for r in es.summary(model).rows}
    assert all(errors[n] < 1e-5 for n in specs), errors
    torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-5)
