"""Frontiers, power-law fits and compute multipliers on synthetic points with known answers (seeded)."""

import math

import numpy as np
import pytest

from search.errors import SearchError
from search.frontier import (
    compute_multiplier,
    fit_power_law,
    frontier_indices,
    group_of,
    lower_hull,
    multipliers,
    pareto_frontier,
    theta_group,
)

A, B = 0.2, 1.5  # L = e^B C^-A


def law_points(seed, n=40, a=A, b=B, noise=0.005, lo=1e6, hi=1e10, floor=0.0):
    rng = np.random.default_rng(seed)
    c = np.geomspace(lo, hi, n)
    loss = floor + np.exp(b) * c**-a * np.exp(rng.normal(0.0, noise, n))
    return c, loss


@pytest.mark.parametrize("seed", range(5))
def test_frontier_of_a_noisy_law_recovers_the_exponent_and_excludes_points_above(seed):
    c, loss = law_points(seed)
    rng = np.random.default_rng(100 + seed)
    on = [(ci, li, "on") for ci, li in zip(c, loss)]
    above = [(ci * rng.uniform(1.0, 1.25), li * rng.uniform(1.06, 3.0), "above") for ci, li in zip(c, loss)]
    front = pareto_frontier(above + on)
    assert {p[2] for p in front} == {"on"}  # 6% or more above the law at more compute: out
    assert len(front) >= 0.8 * len(on)  # 0.5% noise stays within the 2% tolerance
    assert [p[0] for p in front] == sorted(p[0] for p in front)
    fit = fit_power_law(front)
    assert abs(fit.a - A) < 3 * fit.a_se and abs(fit.b - B) < 3 * fit.b_se
    assert fit.a_se < 0.01 and fit.rms < 0.01 and fit.r2 > 0.99
    assert fit.n == len(front) and fit.dof == fit.n - 2


def test_frontier_stops_at_the_lowest_loss_and_keeps_near_points():
    pts = [(1, 10.0), (10, 4.0), (100, 2.0), (1000, 3.0), (10, 4.06), (10, 4.2), (100, 2.0), (1, 11.0)]
    idx = frontier_indices(pts)
    # (1000, 3) costs more and loses more than (100, 2); (10, 4.2) is 5% above the hull; (1, 11) 10%
    assert sorted(idx) == [0, 1, 2, 4, 6]
    assert pareto_frontier([]) == []
    assert pareto_frontier([(5, 1.0)]) == [(5, 1.0)]


def test_lower_hull_skips_collinear_and_higher_points_at_the_same_x():
    xs, ys = [0, 1, 2, 1, 3], [3, 2, 1, 5, 0.5]
    assert lower_hull(xs, ys) == [0, 2, 4]  # (1, 2) is collinear with (0, 3) and (2, 1)


def test_bad_points_are_refused_with_a_reason():
    with pytest.raises(SearchError, match="finite and > 0"):
        pareto_frontier([(1, 1), (0, 2)])
    with pytest.raises(SearchError, match="two numbers"):
        pareto_frontier([(1,)])
    with pytest.raises(SearchError, match="at least 2 points"):
        fit_power_law([(1, 1), (1, 0.5)])
    with pytest.raises(SearchError, match="tol"):
        pareto_frontier([(1, 1)], tol=-1)


def test_two_points_fit_exactly_without_standard_errors():
    fit = fit_power_law([(1e6, 1.0), (1e8, 0.5)])
    assert math.isclose(fit.a, math.log(2) / math.log(100)) and math.isnan(fit.a_se)
    assert math.isclose(fit.predict(1e7), 2**-0.5)
    assert math.isclose(fit.compute_at(fit.predict(3e7)), 3e7)


@pytest.mark.parametrize("k", [0.5, 2.0, 3.7])
def test_multiplier_of_a_family_shifted_by_a_known_compute_factor(k):
    c, loss = law_points(7, noise=0.003)
    dense = fit_power_law(pareto_frontier(zip(c, loss)))
    c2, loss2 = law_points(8, noise=0.003)
    struct = fit_power_law(pareto_frontier(zip(c2 / k, loss2)))  # reaches each loss with k times less compute
    for L in (0.3, 0.1, 0.05):
        assert compute_multiplier(struct, dense, L) == pytest.approx(k, rel=0.03)
    ms = multipliers(struct, dense, n=4)
    assert len(ms) == 4 and all(m.value == pytest.approx(k, rel=0.03) and not m.extrapolated for m in ms)
    assert multipliers(struct, dense, [1e-6])[0].extrapolated


def test_multiplier_of_different_exponents_depends_on_the_loss():
    dense = fit_power_law(list(zip(*law_points(1, a=0.2))))
    struct = fit_power_law(list(zip(*law_points(2, a=0.25))))
    m_hi, m_lo = compute_multiplier(struct, dense, 0.5), compute_multiplier(struct, dense, 0.1)
    assert m_lo > m_hi  # the steeper law gains more at low loss
    expect = dense.compute_at(0.1) / struct.compute_at(0.1)
    assert m_lo == pytest.approx(expect)


@pytest.mark.parametrize("seed", range(3))
def test_floor_fit_recovers_the_irreducible_loss(seed):
    c, loss = law_points(seed, a=0.3, b=1.0, floor=0.3, noise=0.003)
    fit = fit_power_law(list(zip(c, loss)), floor=True)
    assert fit.floor and fit.dof == len(c) - 3
    assert fit.L0 == pytest.approx(0.3, abs=max(0.01, 3 * fit.L0_se))
    assert abs(fit.a - 0.3) < max(0.01, 3 * fit.a_se)
    assert math.isinf(fit.compute_at(fit.L0 * 0.99))  # below the floor: out of reach
    plain = fit_power_law(list(zip(c, loss)))
    assert plain.rms > fit.rms  # a law without a floor fits a floored curve worse


def test_shifting_to_forward_macs_changes_only_b():
    fit = fit_power_law(list(zip(*law_points(3))))
    macs = fit.shifted(6)
    assert macs.a == fit.a and macs.predict(1e8 / 6) == pytest.approx(fit.predict(1e8))


def test_theta_points_group_by_their_named_equivalents():
    assert theta_group((1, 0, 0, 1, 0, 0, 0)) == "dense"
    assert theta_group((1, 0, 0, 0, 1, 0, 1)) == "dense"
    assert theta_group((1, 0, 0, 0, 1, 0, 0.5)) == "low rank"
    assert theta_group((0.5, 0.5, 0, 0.5, 0.5, 0, 0)) == "Kronecker"
    assert theta_group((0.5, 0.5, 0, 0.5, 0.5, 0, 0.25)) == "Tensor-Train"
    assert theta_group((0.5, 0, 0.5, 0, 0.5, 0.5, 0)) == "BTT"
    assert theta_group((0.5, 0, 0.5, 0, 0.5, 0.5, 0.3)) == "BTT"
    assert theta_group((0.33, 0, 0.67, 0, 0.67, 0.33, 0)) == "theta"
    assert theta_group((0.5, 0.25, 0.25, 0.25, 0.5, 0.25, 0)) == "theta"
    assert group_of({"family": "btt"}) == "BTT" and group_of({"family": "monarch"}) == "Monarch"
    assert group_of({"family": "dense"}) == "dense"
    row = {
        "family": "theta",
        **dict(
            zip(
                ("alpha", "beta", "gamma", "delta", "epsilon", "phi", "rho"),
                ("0.5", "0.5", "0.0", "0.5", "0.5", "0.0", "0.0"),
            )
        ),
    }
    assert group_of(row) == "Kronecker"
