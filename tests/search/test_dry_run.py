"""The plan a search prints: a level that cannot train any candidate (even the cheapest candidate of the space, at
the smallest width, gets fewer than --min-steps steps from its allowance) is named with the budget that would fix
it, and a plan in which no level can train anything is refused (one line, exit 2) in a dry run and in a real run,
before anything is trained. Dry runs only, with the throughput probe stubbed: nothing here trains."""

import os
import random
import re
import subprocess
import sys

import pytest

import search.loop
from search import budget, run, train
from search.errors import SearchError
from search.loop import DEFAULTS, run_search
from search.space import make_space, references
from search.tasks import get as get_task

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def no_probe(monkeypatch):
    monkeypatch.setattr(
        search.loop,
        "probe",
        lambda task, widths, device, threads=None: {
            "flops_per_second": 1e9,
            "seconds_per_trial": 0.01,
            "probe_width": min(widths),
        },
    )


@pytest.fixture(scope="module")
def default():
    """The default search's task, space, references and level settings, as run_search plans them."""
    task = get_task(DEFAULTS["task"])
    space = make_space(DEFAULTS["space"], task.widths)
    refs = references(space)
    top = max(DEFAULTS["top_trials"], len(refs) + 1)
    return task, space, refs, dict(levels=DEFAULTS["levels"], ratio=DEFAULTS["ratio"], top_trials=top)


EXPLORE = 1 - DEFAULTS["confirm_share"]  # the exploration share of the budget; the budgets named are total ones


def check(default, b):
    task, space, refs, lv = default
    return budget.check_plan(task, space, refs, b, DEFAULTS["min_steps"], **lv, explore=EXPLORE)


def steps_of_cheapest(default, b, level) -> int:
    """Steps the cheapest candidate gets at ``level`` of the plan for budget ``b``, by the trainer's own count."""
    task, space, refs, lv = default
    allowance = budget.plan_levels(b * EXPLORE, **lv)[level].allowance
    cheapest = min(
        budget.candidates(space, refs, min(task.widths)), key=lambda c: train.plan(task, c.spec(), c.width, 1.0)[1]
    )
    return train.plan(task, cheapest.spec(), cheapest.width, allowance)[0]


def call(argv, capsys):
    try:
        code = run.main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_the_cheapest_candidate_is_no_dearer_than_any_the_space_proposes(default):
    task, space, refs, _ = default
    low = budget.cheapest(task, budget.candidates(space, refs, min(task.widths)))
    rng = random.Random(0)
    for _ in range(150):
        params = space.random_params(rng)
        cand = space.suggest(budget._Replay(params))
        assert train.plan(task, cand.spec(), cand.width, 1.0)[1] >= low.flops_per_step, cand.label


def test_a_budget_that_trains_nothing_is_refused_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "search.run", "--budget", "1e8", "--dry-run", "--no-progress"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and proc.stdout == "", proc.stderr
    assert lines[0].startswith("search.run: error: budget 1e+08 can train no candidate at any level")
    assert "Traceback" not in proc.stderr


def test_the_refusal_names_a_budget_that_trains_something(default, no_probe, tmp_path, capsys):
    code, out, err = call(["--budget", "1e8", "--dry-run", "--no-progress", "--out", str(tmp_path / "s")], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    fix = float(re.search(r"give --budget (\S+) or more", err).group(1))
    f = check(default, fix)  # does not raise: the top level can train the cheapest candidate
    top = DEFAULTS["levels"] - 1
    assert top not in {s.level for s in f.infeasible}
    assert steps_of_cheapest(default, fix, top) >= DEFAULTS["min_steps"] > steps_of_cheapest(default, 1e8, top)


def test_a_real_run_is_refused_before_anything_is_trained(no_probe, tmp_path, capsys, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("trained")

    monkeypatch.setattr(train, "run", no_training)
    code, out, err = call(["--budget", "1e8", "--no-progress", "--out", str(tmp_path / "s")], capsys)
    assert code == 2 and err.startswith("search.run: error: budget 1e+08 can train no candidate") and out == ""
    assert not (tmp_path / "s" / "study.db").exists() and not (tmp_path / "s" / "trials.csv").exists()
    with pytest.raises(SearchError, match="can train no candidate at any level"):
        run_search("lib", out=str(tmp_path / "lib"), budget=1e8)  # the library refuses as well


def test_a_plan_with_level_0_infeasible_warns_with_the_budget_that_fixes_it(default, no_probe, tmp_path, capsys):
    task, space, refs, lv = default
    need = budget.cheapest(task, budget.candidates(space, refs, min(task.widths))).need(DEFAULTS["min_steps"])
    # level 1 just feasible, so level 0 (a factor `ratio` lower) is not
    b = budget.total_for(budget.budget_for(1, need, **lv), EXPLORE)
    assert [s.level for s in check(default, b).infeasible] == [0]
    code, out, err = call(["--budget", repr(b), "--dry-run", "--no-progress", "--out", str(tmp_path / "s")], capsys)
    assert code == 0 and "dry run: nothing trained" in out
    warning = [line for line in err.splitlines() if "cannot train any candidate" in line]
    assert len(warning) == 1 and warning[0].startswith("warning: level 0 (") and "level 1" not in warning[0]
    fix = float(re.search(r"--budget (\S+) or more makes it feasible", warning[0]).group(1))
    assert check(default, fix).infeasible == ()  # that budget makes level 0 feasible, through the same planning
    assert steps_of_cheapest(default, fix, 0) >= DEFAULTS["min_steps"] > steps_of_cheapest(default, b, 0)
    # and it is the smallest such budget, rounded up to 3 digits
    exact = budget.total_for(budget.budget_for(0, need, **lv), EXPLORE)
    assert exact <= fix <= budget.round_up(exact) and check(default, exact).infeasible == ()
    assert [s.level for s in check(default, float(f"{exact * (1 - 1e-9):.17g}")).infeasible] == [0]


def test_a_feasible_plan_prints_no_warning(no_probe, tmp_path, capsys):
    code, out, err = call(["--dry-run", "--no-progress", "--out", str(tmp_path / "s")], capsys)
    assert code == 0 and "warning" not in err and "cannot train" not in out + err


def test_budget_for_gives_the_smallest_budget_that_reaches_an_allowance():
    for level, allowance in ((0, 1.2e7), (1, 3.3e9), (2, 7.77e5)):
        b = budget.budget_for(level, allowance, levels=4, ratio=3.0, top_trials=8)
        assert budget.plan_levels(b, 4, 3.0, 8)[level].allowance >= allowance
        assert budget.plan_levels(b * (1 - 1e-12), 4, 3.0, 8)[level].allowance < allowance
    assert budget.round_up(2291466240.0) == 2.3e9 and budget.round_up(2.3e9) == 2.3e9
    rng = random.Random(0)
    for x in (10 ** rng.uniform(3, 20) for _ in range(2000)):
        y = budget.round_up(x)
        assert y >= x and float(f"{y:.3g}") == y  # what is printed is enough


def test_the_reported_3e9_plan_warns_that_level_0_trains_no_reference(default, no_probe, tmp_path, capsys):
    """`--budget 3e9` pruned all 321 level-0 trials: the cheapest theta point (rank-1 low rank) would get its 20
    steps there, but no reference does, and the sampler did not find a point that cheap."""
    b = budget.total_for(3e9, EXPLORE)  # the study's 3e9 were all exploration: today's total with that share
    f = check(default, b)
    assert f.infeasible == () and [s.level for s in f.no_references] == [0]
    code, out, err = call(["--budget", repr(b), "--dry-run", "--no-progress", "--out", str(tmp_path / "s")], capsys)
    warning = [line for line in err.splitlines() if "no reference structure" in line]
    assert code == 0 and "dry run: nothing trained" in out
    assert len(warning) == 1 and warning[0].startswith("warning: at level 0 (")
    fix = float(re.search(r"--budget (\S+) or more lets the references train", warning[0]).group(1))
    assert check(default, fix).no_references == ()
