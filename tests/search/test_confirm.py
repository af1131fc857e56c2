"""The confirmation phase (search.confirm): which structures, widths and seeds are confirmed, the budget and
resume across both phases, and the verdict's null test through the real pipeline (issue 17 parts 1, 2, 6a, 7)."""

import csv
import json
import os
import subprocess
import sys

import pytest

from search import confirm, report
from search.families.base import Candidate
from search.families.registry import lookup
from search.loop import run_search
from tests.search.conftest import TINY_TASK as TINY

NULL = dict(
    budget=6e8,
    levels=3,
    ratio=2.0,
    top_trials=3,
    min_steps=8,
    target_steps=30,
    task_settings=TINY,
    device="cpu",
    space="tests.search._twin_space:SPACE",
    confirm_share=0.8,
    confirm_top=1,
)  # the default protocol otherwise: 3 fresh seeds, 3 widths
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bracket_surrounds_the_best_width_or_says_it_is_at_the_edge():
    grid = [16, 32, 64, 128, 256]
    assert confirm.bracket(grid, 64, 3) == ([32, 64, 128], False)
    assert confirm.bracket(grid, 16, 3) == ([16, 32, 64], True)
    assert confirm.bracket(grid, 256, 3) == ([64, 128, 256], True)
    assert confirm.bracket(grid, 64, 4) == ([32, 64, 128, 256], False)
    assert confirm.bracket([16, 32], 16, 3) == ([16, 32], True)  # the grid has fewer: all of it


def test_confirmation_seeds_are_fresh_and_deterministic():
    assert confirm.seeds(0, 3) == [1, 2, 3] == confirm.seeds(0, 3)
    assert 2**32 - 1 not in confirm.seeds(2**32 - 1, 3) and confirm.seeds(2**32 - 1, 2) == [0, 1]


def _row(family, level, loss, width=32, **args):
    c = Candidate.of(lookup(family), width, args)
    return {**c.columns(), "level": level, "loss": loss, "state": "COMPLETE", "train_flops": 1, "phase": "explore"}


THETA = dict(alpha=0.8, beta=0.0, gamma=0.2, delta=0.1, epsilon=0.7, phi=0.2, rho=0.1)  # an unnamed theta point


def test_select_ranks_the_others_by_upper_level_regret_then_adds_the_best_named_and_dense():
    rows = [
        _row("dense", 0, 0.1),
        _row("dense", 1, 0.5),
        _row("dense", 2, 0.4),
        _row("btt", 0, 0.9, rank=1),
        _row("btt", 1, 0.3, rank=1),
        _row("btt", 2, 0.2, rank=1),
        _row("monarch", 1, 0.45, blocks=4),
        _row("monarch", 2, 0.25, blocks=4),  # better than dense at the top, worse than btt(r=1) at both levels
        _row("theta", 1, 0.2, **THETA),  # found by the sampler at one upper level only, the best there
        _row("theta", 0, 0.001, **{**THETA, "rho": 0.3}),  # the lowest level only: no upper-level score
        _row("btt", 2, 0.01, rank=2),  # the best named one: the lowest top-level loss of a named structure
        {**_row("btt", 2, 0.001, rank=4), "phase": "confirm"},  # a confirmation row: not exploration
    ]

    def chosen(top):
        return [(role, c.label, named) for role, c, named in confirm.select(rows, None, [0, 1, 2], top)]

    theta = "theta(0.8,0,0.2,0.1,0.7,0.2,0.1)"
    tail = [("named", "btt(r=2)", True), ("dense", "dense", False)]  # confirmed whatever top is
    # mean regret over levels 1 and 2 (log of loss / the level's best): theta 0; btt(r=1) (log 1.5 + log 20) / 2;
    # monarch (log 2.25 + log 25) / 2
    assert chosen(1) == [("top", theta, False), *tail]
    assert chosen(2) == [("top", theta, False), ("top", "btt(r=1)", False), *tail]
    assert chosen(3) == [("top", theta, False), ("top", "btt(r=1)", False), ("top", "monarch(b=4)", False), *tail]
    assert chosen(0) == tail


def _rows(folder):
    with open(os.path.join(folder, "trials.csv")) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def null_study(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("null"))
    result = run_search("null", out=out, estimate=False, **NULL)
    report.write_report(out, "null")
    return out, result


def test_null_identical_structures_are_not_distinguishable(null_study):
    out, _ = null_study
    verdict = json.load(open(os.path.join(out, "verdict.json")))
    assert [(v["structure"], v["vs"]) for v in verdict] == [("twin", "dense")]
    v = verdict[0]
    assert set(v) >= {"structure", "vs", "loss", "multiplier", "low", "high", "call", "seeds"}
    assert v["call"] == "not distinguishable" and v["seeds"] == 3 and v["low"] <= 1 <= v["high"]
    text = open(os.path.join(out, "report.md")).read()
    assert text.index("## Verdict") < text.index("## Settings") and "| twin | dense |" in text


def test_confirmation_runs_fresh_seeds_at_bracketing_widths_within_the_budget(null_study):
    out, result = null_study
    rows = _rows(out)
    assert sum(int(r["train_flops"]) for r in rows) == result.spent <= NULL["budget"]
    explore = [r for r in rows if r["phase"] == "explore" and int(r["train_flops"]) > 0]
    conf = [r for r in rows if r["phase"] == "confirm" and r["state"] == "COMPLETE"]
    assert explore and {r["seed"] for r in explore} == {"0"}
    assert {r["seed"] for r in conf} == {"1", "2", "3"}
    meta = json.load(open(os.path.join(out, "study.json")))
    plan = meta["confirmation"]
    assert [s["structure"] for s in plan["structures"]] == ["twin", "dense"]  # the others first, dense last
    assert meta["settings"]["confirm_seeds"] == 3 and meta["settings"]["confirm_share"] == 0.8
    for s in plan["structures"]:
        for lv, p in s["levels"].items():
            assert len(p["widths"]) == 3 and p["edge"] == (p["best_width"] in (16, 64))
            mine = [r for r in rows if r["phase"] == "confirm" and r["level"] == lv]
            runs = {r["width"] for r in mine if r["structure"] == s["structure"]}
            assert runs <= {str(w) for w in p["widths"]}
    # a trained confirmation run of each structure at the top level, on every seed
    top = str(NULL["levels"] - 1)
    for s in ("dense", "twin"):
        assert {r["seed"] for r in conf if r["structure"] == s and r["level"] == top} == {"1", "2", "3"}


def test_a_study_killed_in_confirmation_resumes_without_retraining(null_study, tmp_path):
    full, _ = null_study
    trained = [r for r in _rows(full) if int(r["train_flops"]) > 0]
    n_explore = sum(1 for r in trained if r["phase"] == "explore")
    out = str(tmp_path / "killed")
    code = (
        "import sys; from search.loop import run_search; from tests.search.test_confirm import NULL; "
        "run_search('null', out=sys.argv[1], estimate=False, **NULL)"
    )
    env = {**os.environ, "PYTHONPATH": ROOT, "EINSTRUCT_FAULT": f"kill:after_settle#{n_explore + 2}"}
    p = subprocess.run([sys.executable, "-c", code, out], env=env, cwd=ROOT, capture_output=True)
    assert p.returncode == -9, p.stderr.decode()[-2000:]
    before = [r for r in _rows(out) if int(r["train_flops"]) > 0 and r["phase"] == "confirm"]
    assert 1 <= len(before) <= 2  # killed in the confirmation phase
    result = run_search("null", out=out, estimate=False, **NULL)
    rows = result.rows()
    key = lambda r: (r["phase"], str(r["level"]), r["structure"], str(r["width"]), str(r["seed"]))
    assert sorted(map(key, (r for r in rows if int(r["train_flops"]) > 0))) == sorted(map(key, trained))
    assert result.spent <= NULL["budget"]


def _confirmation_rows(truth: dict[str, float]):
    """Confirmation rows and curves of structures with known multipliers over dense (a power law, seed noise)."""
    import numpy as np

    from search.outputs import CONFIRM

    rng = np.random.default_rng(0)
    rows, curves, trial = [], {}, 0
    for seed in (1, 2, 3):
        for s, m in truth.items():
            for level, allowance in enumerate((1e6, 2e6, 4e6)):
                pts = [
                    (c, (m * c) ** -0.3 * float(np.exp(0.01 * rng.standard_normal())))
                    for c in allowance * np.r_[0.25:1.01:0.25]
                ]
                rows.append(
                    {
                        "phase": "confirm",
                        "state": "COMPLETE",
                        "structure": s,
                        "level": level,
                        "trial": trial,
                        "seed": seed,
                        "loss": pts[-1][1],
                        "train_flops": allowance,
                    }
                )
                curves[(CONFIRM + level, trial)] = tuple(pts)
                trial += 1
    return rows, curves


def _plan(structure: str, edges: tuple[int, ...], best_named: bool = False) -> dict:
    levels = {
        str(lv): {"best_width": 16 if lv in edges else 32, "widths": [16, 32, 64], "edge": lv in edges}
        for lv in range(3)
    }
    return {"structure": structure, "best_named": best_named, "levels": levels}


def test_the_verdict_says_when_either_side_is_edge_limited(tmp_path):
    from search import verdict as verdict_mod

    rows, curves = _confirmation_rows({"btt(r=1)": 2.0, "monarch(b=4)": 1.5, "dense": 1.0})
    plan = {
        "structures": [
            _plan("btt(r=1)", ()),  # not edge-limited itself
            _plan("monarch(b=4)", (2,), best_named=True),
            _plan("dense", (0, 1)),  # the reference, edge-limited at two levels
        ]
    }
    got = {(c.structure, c.vs): c for c in confirm.verdict(rows, curves, plan)}
    assert set(got) == {("btt(r=1)", "dense"), ("btt(r=1)", "monarch(b=4)"), ("monarch(b=4)", "dense")}
    assert got["btt(r=1)", "dense"].edge_limited == ("dense",)
    assert "dense's best width is at the width grid's edge at level(s) 0, 1" in got["btt(r=1)", "dense"].note
    assert got["btt(r=1)", "monarch(b=4)"].edge_limited == ("monarch(b=4)",)
    assert got["monarch(b=4)", "dense"].edge_limited == ("monarch(b=4)", "dense")
    assert got["btt(r=1)", "dense"].call == "better"  # the flag informs, it does not change the reading
    entries = json.load(open(verdict_mod.write_json(str(tmp_path), list(got.values()))))
    assert [e["edge_limited"] for e in entries] == [["dense"], ["monarch(b=4)"], ["monarch(b=4)", "dense"]]
    assert {"structure", "vs", "loss", "multiplier", "low", "high", "call", "seeds"} <= set(entries[0])
    text = verdict_mod.markdown(list(got.values()))
    assert "- btt(r=1) vs dense: dense's best width is at the width grid's edge at level(s) 0, 1: edge-limited" in text
    assert "may not be compute-optimal" in text
    # no side at an edge: no flag, no note
    plan = {"structures": [_plan("btt(r=1)", ()), _plan("monarch(b=4)", (), best_named=True), _plan("dense", ())]}
    for c in confirm.verdict(rows, curves, plan):
        assert c.edge_limited == () and c.note == "" and c.as_json()["edge_limited"] == []
    assert "edge-limited" not in verdict_mod.markdown(confirm.verdict(rows, curves, plan))


def test_a_sweep_that_does_best_at_the_grids_edge_is_edge_limited_too():
    """Exploration put dense's best width inside the grid, but its confirmation sweep does best at the grid's
    smallest width at level 2 (on the mean log loss over seeds): that frontier is edge-limited there too."""
    rows, curves = _confirmation_rows({"btt(r=1)": 2.0, "dense": 1.0})
    for r in rows:  # widths: each run of the synthetic rows at 32, then copies at 16 and 64 with known losses
        r["width"] = 32
    extra = []
    for r in rows:
        better = r["structure"] == "dense" and r["level"] == 2
        extra.append({**r, "width": 16, "loss": r["loss"] * (0.9 if better else 1.1)})
        extra.append({**r, "width": 64, "loss": r["loss"] * 1.2})
    rows = rows + extra
    plan = {"structures": [_plan("btt(r=1)", ()), _plan("dense", ())], "grid": [16, 32, 64]}
    assert confirm.sweep_edges(rows, plan["grid"]) == {"dense": {"2"}}
    (c,) = confirm.verdict(rows, curves, plan)
    assert c.edge_limited == ("dense",) and "dense's best width is at the width grid's edge at level(s) 2" in c.note
    assert confirm.sweep_edges(rows, None) == {}  # a plan from before the grid was recorded: exploration's flags
    plan.pop("grid")
    assert confirm.verdict(rows, curves, plan)[0].edge_limited == ()
