"""The verdict's calibration through the whole loop (issue 17 part 6b): exploration, the confirmation phase's
choice of structures and widths, frontier extraction and the verdict's reading, on a task whose answer is known
(tests/search/_powerlaw_task.py: held-out loss a known power law of the compute spent, with a known multiplier
per structure and log-normal noise drawn from each run's seed, structure and width).

Each study runs the real loop (search.loop.run_search, one worker) at the default protocol: 3 fresh confirmation
seeds, 3 bracketing widths, the top 2 structures, the best named one and dense. Only the budget's split differs:
--confirm-share 0.82 instead of 0.72, because on this small space the confirmation plan (3 structures x 3 widths
x 3 seeds at every level: 189 bottom-level allowances) needs that share of the budget to run whole
(``test_every_planned_confirmation_run_trained`` holds it to that). The verdict is read the way report.md reads
it (search.report.load, verdict_of). Each study gives three comparisons with a known truth: double vs dense (2),
double vs even (2) and even vs dense (1).

Cost and power: a study costs about 6 s of CPU (about 130 trials; the storage's per-trial work outweighs the tiny
models' training), so the suite runs STUDIES = 8 studies (53 s for this file on a quiet 2-core machine), 24
intervals, and the coverage test passes when at least 20 of them cover the truth (83%). With independent
intervals, one that covers 95% passes with probability P(Bin(24, 0.95) >= 20) = 0.994, one that covers 90% with
0.915, 80% with 0.46 and 70% with 0.11. The three comparisons of a study share frontiers, so they are not
independent; resampling 8 of the 60 studies measured below (with that dependence) the loop as measured passes
with 0.95, and its intervals narrowed to cover 72% (66%) pass with 0.21 (0.09).

Measured (``python -m tests.search.test_calibration 60``: study seeds 0, 10, ..., 590; the suite's 8 are the
first): 166 of 180 intervals cover the truth (92.2%): double vs dense 53/60 (88.3%), double vs even 54/60
(90.0%), even vs dense 59/60 (98.3%). The 2x multiplier is underestimated by about 1% (mean log error -0.011
+- 0.005) and every one of the 120 2x comparisons is called better (lowest lower bound 1.39). On the pure power
law (k = 0, no width effect; 40 studies) 115 of 120 cover (95.8%: 40/40, 40/40, 35/40) and the 2x multiplier's
mean log error is -0.004. The 2x comparisons that miss are narrow intervals (the three seeds agree) 5-10%
off: an error that a study's seeds share (most likely through what they have in common: the widths exploration
picked, the loss the multiplier is read at), which an interval over seeds cannot see. Sweeping a grid thinned to
a factor 2 between widths instead of neighbouring widths did not change it (92.7% against 92.1% over the same 60
studies, on an earlier version of this task), so search/ is left as it is.

The 2x call: with sigma = 0.02 (run-level noise in log loss) and b = 0.3, a factor 2 in compute is ln 2 x 0.3 =
0.21 in log loss, about 10 run-level standard deviations: every double vs dense and double vs even comparison
must be called better (one that is not, at this noise, is a defect, not bad luck).
"""

import math
import os

import pytest

from search import report
from search.loop import run_search
from tests.search._powerlaw_task import TRUTH, PowerLaw, register

STUDIES = 8  # in the suite; python -m tests.search.test_calibration 60 runs more and prints the figures
STUDY = dict(
    task="powerlaw",
    space="tests.search._powerlaw_task:SPACE",
    budget=3.6e8,
    levels=3,
    ratio=2.0,
    top_trials=3,
    min_steps=4,
    target_steps=8,
    device="cpu",
    confirm_share=0.82,  # the other confirm_* settings are the defaults: 3 seeds, 3 widths, top 2
)
COVERAGE_BAR = 20 / 24  # at least 20 of the 24 intervals (83%; see the module docstring)


def run_studies(n: int, root: str) -> list:
    """(study.json, trials.csv rows, verdict) of ``n`` studies at seeds 0, 10, 20, ... (confirmation seeds
    seed+1..seed+3: no two studies share one), each read back as the report reads it."""
    out = []
    with pytest.MonkeyPatch.context() as mp:
        register(mp)
        for seed in (10 * i for i in range(n)):
            folder = os.path.join(root, f"powerlaw{seed}")
            run_search("powerlaw", out=folder, estimate=False, seed=seed, **STUDY)
            study = report.load(folder, "powerlaw")
            out.append((study.meta, study.rows, report.verdict_of(study)))
    return out


def summary(studies) -> list[str]:
    """Per comparison: intervals that cover the truth, the mean log error of the multiplier, the calls."""
    lines, by = [], {}
    for *_, verdict in studies:
        for c in verdict:
            by.setdefault((c.structure, c.vs), []).append(c)
    every = [c for cs in by.values() for c in cs]
    for (s, vs), cs in [*by.items(), (("all", ""), every)]:
        ok = [c.low is not None and c.low <= TRUTH[c.structure] / TRUTH[c.vs] <= c.high for c in cs]
        err = [math.log(c.multiplier * TRUTH[c.vs] / TRUTH[c.structure]) for c in cs if c.multiplier]
        calls = {k: [c.call for c in cs].count(k) for k in sorted({c.call for c in cs})}
        lines.append(
            f"{s} vs {vs or '*'}: {sum(ok)}/{len(ok)} intervals cover the truth ({sum(ok) / len(ok):.1%}), mean log "
            f"error {sum(err) / len(err):+.4f}, calls {calls}"
        )
    return lines


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    return run_studies(STUDIES, str(tmp_path_factory.mktemp("calibration")))


def test_the_task_knows_its_multiplier():
    """The truth the calibration measures against: double at compute C is dense at 2C, at every width, and a
    run's held-out curve is the law at the FLOPs it has spent."""
    from search import train
    from tests.search._powerlaw_task import DOUBLE

    quiet = PowerLaw(sigma=0.0, seed_sd=0.0, eval_sd=0.0)
    for w in quiet.widths:
        for c in (1e5, 3e6, 5e7):
            assert quiet.law(c, w, 2.0, 0, "double") == pytest.approx(quiet.law(2 * c, w, 1.0, 0, "dense"), rel=1e-12)
    task = PowerLaw()
    _, per_step = train.plan(task, DOUBLE, 32, 1.0)
    r = train.run(task, DOUBLE, 32, 16 * per_step, seed=5, device="cpu", evals=4)
    assert [c for c, _ in r.curve] == [4 * per_step, 8 * per_step, 12 * per_step, 16 * per_step]
    assert [v for _, v in r.curve] == pytest.approx([task.law(c, 32, 2.0, 5, "double") for c, _ in r.curve])


def test_every_planned_confirmation_run_trained(studies):
    """The protocol ran whole: the three structures confirmed, every planned run of every seed trained within the
    budget, every comparison over 3 seeds."""
    for meta, rows, verdict in studies:
        plan = meta["confirmation"]
        assert sorted(s["structure"] for s in plan["structures"]) == ["dense", "double", "even"]
        assert plan["seeds"] == [meta["settings"]["seed"] + k for k in (1, 2, 3)]
        planned = {
            (lv, s["structure"], w, seed)
            for s in plan["structures"]
            for lv, p in s["levels"].items()
            for w in p["widths"]
            for seed in plan["seeds"]
        }
        ran = {
            (str(r["level"]), r["structure"], r["width"], r["seed"])
            for r in rows
            if r["phase"] == "confirm" and r["state"] == "COMPLETE"
        }
        refused = [r["reason"] for r in rows if r["phase"] == "confirm" and r["state"] != "COMPLETE"]
        assert planned - ran == set() or all("steps" in why for why in refused), refused  # only too few steps
        assert all("budget" not in why for why in refused)
        assert sum(r["train_flops"] for r in rows) <= STUDY["budget"]
        assert [(c.structure, c.vs) for c in verdict] == [("double", "dense"), ("double", "even"), ("even", "dense")]
        assert all(c.seeds == 3 for c in verdict)


def test_the_interval_covers_the_known_multiplier(studies):
    intervals = [(c, TRUTH[c.structure] / TRUTH[c.vs]) for *_, verdict in studies for c in verdict]
    assert all(c.low is not None for c, _ in intervals), [c.note for c, _ in intervals if c.low is None]
    covered = [c.low <= truth <= c.high for c, truth in intervals]
    missed = [(c.structure, c.vs, c.low, c.high) for (c, _), ok in zip(intervals, covered) if not ok]
    assert sum(covered) >= math.ceil(COVERAGE_BAR * len(intervals)), missed
    # and the point estimate is unbiased on average (log scale): a loop that leaks selection bias fails here
    bias = [math.log(c.multiplier / truth) for c, truth in intervals]
    assert abs(sum(bias) / len(bias)) < 0.1


def test_a_clear_2x_is_called_better_and_equal_structures_are_not_called_different(studies):
    calls = {}
    for *_, verdict in studies:
        for c in verdict:
            calls.setdefault((c.structure, c.vs), []).append(c.call)
    assert set(calls["double", "dense"]) == {"better"} and set(calls["double", "even"]) == {"better"}
    same = calls["even", "dense"]
    assert same.count("not distinguishable") >= math.ceil(COVERAGE_BAR * len(same))


if __name__ == "__main__":  # python -m tests.search.test_calibration [studies]: the measured figures
    import sys
    import tempfile

    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        done = run_studies(int(sys.argv[1]) if len(sys.argv) > 1 else STUDIES, root)
    for meta, _, verdict in done:
        print(
            meta["settings"]["seed"],
            *(f"{c.structure}/{c.vs} {c.multiplier} {c.low} {c.high} {c.call}" for c in verdict),
        )
    print("\n".join(summary(done)))
