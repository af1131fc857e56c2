"""The verdict's statistics (THEORY 10) on synthetic confirmation runs with a known power law and a known
multiplier: the 95% interval covers the truth, identical structures are not told apart, a clear 2x is found."""

import json
import math

import numpy as np
import pytest

from search.errors import SearchError
from search.verdict import Comparison, compare, markdown, write_json

LEVELS = (1e9, 4e9, 1.6e10, 6.4e10)  # compute allowances, a factor of 4 apart
SEEDS = (1000, 1001, 1002)  # the default protocol's 3 fresh confirmation seeds


def synthetic(rng, multiplier, seed_effects, a=0.3, run_noise=0.03):
    """Confirmation points of one structure: loss = e^s K (m C)^-a (1 + 0.1 ln(w / w*)^2) e^eps at each level's
    allowance and 3 widths bracketing the best one (which reaches the law); s is the seed's own effect (the same
    data for every structure trained on that seed), eps each run's noise. ``multiplier`` m: the structure needs m
    times less compute than one with m = 1."""
    runs = {}
    for seed in SEEDS:
        points = []
        for c in LEVELS:
            for off in (-1.0, 0.0, 1.0):  # ln(w / w*) of the three widths
                loss = math.exp(seed_effects[seed]) * 2.0 * (multiplier * c) ** -a * (1 + 0.1 * off**2)
                points.append((c, loss * math.exp(run_noise * rng.standard_normal())))
        runs[seed] = points
    return runs


def pair(rng, m_a, m_b, seed_sd=0.05, **kw):
    effects = {s: seed_sd * rng.standard_normal() for s in SEEDS}
    return synthetic(rng, m_a, effects, **kw), synthetic(rng, m_b, effects, **kw)


def test_the_interval_covers_a_known_multiplier_at_3_seeds():
    rng = np.random.default_rng(0)
    truth = 1.5
    reps, covered = 200, 0
    for _ in range(reps):
        a, b = pair(rng, truth, 1.0)
        c = compare("s", a, "dense", b)
        assert c.seeds == 3 and c.low < c.multiplier < c.high
        covered += c.low <= truth <= c.high
    assert covered / reps >= 0.90  # THEORY 10's bar; nominal 95%


def test_the_interval_is_wider_than_a_naive_one_and_the_naive_one_under_covers():
    """The small-sample correction matters: a normal (z = 1.96) interval on the same seed estimates covers less."""
    rng = np.random.default_rng(1)
    reps, t_cov, z_cov = 200, 0, 0
    for _ in range(reps):
        a, b = pair(rng, 1.5, 1.0)
        c = compare("s", a, "dense", b)
        t_cov += c.low <= 1.5 <= c.high
        mid, half_t = math.log(c.multiplier), math.log(c.high) - math.log(c.multiplier)
        half_z = half_t * 1.96 / 4.302652729911275  # t(0.975, 2 dof)
        z_cov += math.exp(mid - half_z) <= 1.5 <= math.exp(mid + half_z)
    assert z_cov < t_cov and z_cov / reps < 0.90


def test_identical_structures_are_not_distinguishable():
    rng = np.random.default_rng(2)
    reps = 200
    calls = [compare("dense again", *pair(rng, 1.0, 1.0)[::1], vs="dense").call for _ in range(0)]
    calls = []
    for _ in range(reps):
        a, b = pair(rng, 1.0, 1.0)
        calls.append(compare("dense again", a, "dense", b).call)
    assert set(calls) <= {"better", "worse", "not distinguishable"}
    assert calls.count("not distinguishable") / reps >= 0.90


def test_a_clear_2x_is_called_better_and_its_mirror_worse():
    rng = np.random.default_rng(3)
    reps = 100
    better = worse = 0
    for _ in range(reps):
        a, b = pair(rng, 2.0, 1.0)
        better += compare("s", a, "dense", b).call == "better"
        worse += compare("dense", b, "s", a).call == "worse"
    assert better / reps >= 0.90 and worse == better


def test_the_multiplier_is_read_where_every_frontier_reaches_and_equals_the_law_without_noise():
    rng = np.random.default_rng(4)
    a, b = pair(rng, 2.0, 1.0, seed_sd=0.0, run_noise=0.0)
    c = compare("s", a, "dense", b)
    assert c.multiplier == pytest.approx(2.0, rel=1e-9)
    lowest = [min(p[1] for p in pts) for runs in (a, b) for pts in runs.values()]
    assert c.loss == pytest.approx(max(lowest))  # the lowest loss that every frontier reaches


def test_no_common_loss_range_gives_no_number():
    rng = np.random.default_rng(5)
    a, b = pair(rng, 1000.0, 1.0, seed_sd=0.0, run_noise=0.0)  # a's losses all lie below b's
    c = compare("s", a, "dense", b)
    assert (c.multiplier, c.low, c.high, c.loss) == (None, None, None, None)
    assert c.call == "no common loss range" and "extrapolated" in c.note


def test_too_few_seeds_is_not_established():
    rng = np.random.default_rng(6)
    a, b = pair(rng, 2.0, 1.0)
    one = {SEEDS[0]: a[SEEDS[0]]}
    c = compare("s", one, "dense", b)
    assert c.call == "not established" and c.multiplier is None and c.seeds == 1
    flat = {s: [(1e9, 0.5), (1e9, 0.6)] for s in SEEDS}  # one compute per seed: no law
    assert compare("s", flat, "dense", b).call == "not established"


def test_unpaired_seeds_use_welch_and_still_cover():
    rng = np.random.default_rng(7)
    reps, covered = 150, 0
    for _ in range(reps):
        a, b = pair(rng, 1.5, 1.0, seed_sd=0.0)
        b = {s + 100: pts for s, pts in b.items()}  # other seeds: nothing to pair
        c = compare("s", a, "dense", b)
        covered += c.low <= 1.5 <= c.high
    assert covered / reps >= 0.90


def test_json_entry_has_the_verdict_keys_and_bad_input_is_one_line():
    rng = np.random.default_rng(8)
    a, b = pair(rng, 2.0, 1.0)
    c = compare("s", a, "dense", b)
    entry = json.loads(json.dumps(c.as_json()))
    assert {"structure", "vs", "loss", "multiplier", "low", "high", "call", "seeds"} <= set(entry)
    assert isinstance(entry["seeds"], int) and entry["vs"] == "dense"
    assert isinstance(c, Comparison)
    with pytest.raises(SearchError, match="map each seed"):
        compare("s", [(1, 2)], "dense", {})
    with pytest.raises(SearchError, match="level"):
        compare("s", {}, "dense", {}, level=95)


def test_verdict_json_and_section_say_the_same(tmp_path):
    rng = np.random.default_rng(9)
    a, b = pair(rng, 2.0, 1.0)
    far, _ = pair(rng, 1000.0, 1.0, seed_sd=0.0, run_noise=0.0)
    rows = [compare("s", a, "dense", b), compare("far", far, "dense", b)]
    path = write_json(str(tmp_path), rows)
    assert json.load(open(path)) == [r.as_json() for r in rows]
    text = markdown(rows)
    assert text.startswith("## Verdict")
    first, second = (line for line in text.splitlines() if line.startswith("| s |") or line.startswith("| far |"))
    assert f"{rows[0].multiplier:.3g}x" in first and rows[0].call in first
    assert "| - | - | - |" in second and "no common loss range" in second and "extrapolated" in text
