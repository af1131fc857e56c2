"""search.report on a tiny finished study (with and without study.db) and on hand-made trials.csv files."""

import json
import math
import os
import re
import shutil

import numpy as np
import pytest

from search import outputs, report
from search.errors import SearchError
from search.loop import run_search

TINY = dict(
    budget=1e8,
    levels=3,
    ratio=2.0,
    top_trials=3,
    space="btt",
    min_steps=8,
    target_steps=30,
    device="cpu",
    confirm_share=0.0,  # exploration only: the sections read it (tests/search/test_confirm.py has the verdict)
    task_settings=dict(pool=2048, eval_size=256, batch=32, teacher_width=16, teacher_depth=2, widths=[16, 32, 64]),
)
SECTIONS = (
    "# Structure search report: tiny",
    "## Settings",
    "## Budget",
    "## Winning structures",
    "## Frontiers and scaling laws",
    "## Compute multipliers vs dense",
    "## Taxonomy",
    "## Search history",
    "## How this was computed",
)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    result = run_search("tiny", out=str(out), **TINY)
    return result, str(out)


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_report_of_a_finished_study_has_every_section_and_its_plots(study):
    result, folder = study
    path = report.write_report(folder, "tiny")
    assert path == os.path.join(folder, "report.md")
    text = open(path).read()
    pos = [text.index(s) for s in SECTIONS]
    assert pos == sorted(pos)
    for name in report.PLOTS.values():
        assert f"]({name})" in text  # relative links
        assert _is_png(os.path.join(folder, name)) and os.path.getsize(os.path.join(folder, name)) > 5000
    assert "held-out loss curves from study.db" in text
    assert f"Spent **{result.spent:.4g}** of {TINY['budget']:.4g} training FLOPs" in text
    assert "forward MACs × examples" in text
    assert "```text" in text and "taxonomy   omega=" in text  # an einstruct table
    best = result.best()
    assert f"`{best['structure']}`" in text.split("## Winning structures")[1].split("###")[1]
    # fitted exponents with standard errors for the groups this space trains
    table = text.split("## Frontiers and scaling laws")[1].split("## Compute multipliers")[0]
    assert re.search(r"\| BTT \| \d+ \| \d+ \| \d+ \| [\d.]+ ± [\d.e+-]+ \|", table)
    assert "No fitted dense law" in text  # the btt space has no dense reference


def test_points_come_from_the_curves_and_skip_duplicates(study):
    _, folder = study
    s = report.load(folder)
    trained = s.trained()
    assert trained and all(r["train_flops"] > 0 for r in trained)
    dups = [r for r in s.rows if r["state"] == "COMPLETE" and r["train_flops"] == 0]
    assert all(r not in trained for r in dups)
    pts = report.points_of(s)
    assert len(pts) > len(trained)  # several evaluations per trained trial
    for r in trained:  # each curve ends at the trial's final (train_flops, loss)
        last = max((p for p in pts if p[2] is r), key=lambda p: p[0])
        assert last[0] == r["train_flops"] and last[1] == pytest.approx(r["loss"])


def test_report_works_from_trials_csv_alone(study, tmp_path):
    _, folder = study
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    for name in os.listdir(copy):
        if name.startswith("study.db") or name.endswith(".png") or name == "report.md":
            os.remove(copy / name)
    path = report.write_report(str(copy), "tiny")
    text = open(path).read()
    assert all(s in text for s in SECTIONS)
    assert "final losses only (no study.db in the folder)" in text
    s = report.load(str(copy))
    assert len(report.points_of(s)) == len(s.trained())
    for name in report.PLOTS.values():
        assert _is_png(copy / name)


def test_report_works_without_study_json(study, tmp_path):
    _, folder = study
    copy = tmp_path / "bare"
    copy.mkdir()
    shutil.copy(os.path.join(folder, "trials.csv"), copy / "trials.csv")
    text = open(report.write_report(str(copy))).read()
    assert "study.json is missing" in text and "the budget is unknown" in text


def _synthetic_study(folder, k=2.0, a=0.25):
    """A hand-written trials.csv: dense on L = e^1 C^-a, BTT reaching each loss with k times less compute."""
    rows, n = [], 0
    rng = np.random.default_rng(0)
    for family, shift in (("dense", 1.0), ("btt", k)):
        for level, c in enumerate(np.geomspace(1e6, 1e9, 7)):
            loss = math.exp(1.0) * (c * shift) ** -a * math.exp(rng.normal(0, 0.002))
            rows.append(
                {
                    "number": n,
                    "level": level,
                    "trial": n,
                    "state": "COMPLETE",
                    "train_flops": int(c),
                    "allowance": int(c),
                    "family": family,
                    "structure": "btt(r=1)" if shift != 1 else "dense",
                    "rank": 1 if family == "btt" else "",
                    "width": 64,
                    "steps": 100,
                    "params": 1000,
                    "omega": 0.0,
                    "psi": 1.0,
                    "nu": 0.5 if family == "btt" else 1.0,
                    "loss": loss,
                    "seconds": 1.0,
                    "reason": "",
                }
            )
            n += 1
    rows.append({**rows[-1], "number": n, "trial": n, "train_flops": 0, "reason": "same as trial 13: not retrained"})
    rows.append(
        {
            **rows[-1],
            "number": n + 1,
            "trial": n + 1,
            "state": "PRUNED",
            "loss": "",
            "reason": "width 64 gets only 3 steps",
        }
    )
    os.makedirs(folder, exist_ok=True)
    outputs.write_trials_csv(os.path.join(folder, "trials.csv"), rows)
    outputs.write_json(
        os.path.join(folder, "study.json"),
        {
            "settings": {"budget": 1e10, "task": "regression"},
            "storage": "default (study.db in this folder)",
            "levels": [{"index": i, "allowance": 1e6, "trials": 2} for i in range(7)],
        },
    )


def test_multiplier_table_recovers_a_known_compute_factor(tmp_path):
    _synthetic_study(str(tmp_path), k=2.0)
    s = report.load(str(tmp_path))
    gs = {g.name: g for g in report.groups(s)}
    assert set(gs) == {"dense", "BTT"}
    assert gs["dense"].fit.a == pytest.approx(0.25, abs=3 * gs["dense"].fit.a_se + 1e-3)
    text = open(report.write_report(str(tmp_path), "synthetic")).read()
    table = text.split("## Compute multipliers vs dense")[1].split("##")[0]
    row = next(line for line in table.splitlines() if line.startswith("| BTT |"))
    values = [float(v.strip().rstrip("*")) for v in row.strip("|").split("|")[2:]]
    assert len(values) == 3 and all(v == pytest.approx(2.0, rel=0.03) for v in values)


def test_command_line_errors_are_one_line_with_exit_2(tmp_path, capsys):
    assert report.main(["--study", "nope", "--out", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("search.report: error: no study folder") and err.count("\n") == 1
    assert report.main(["--study", "empty", "--out", str(tmp_path)]) == 2
    assert "has no trials.csv" in capsys.readouterr().err
    (tmp_path / "trials.csv").write_text("number,level,state\n0,0,COMPLETE\n")
    assert report.main(["--study", "bad", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "column(s) trial, train_flops" in err and err.count("\n") == 1
    _synthetic_study(str(tmp_path))
    rows = outputs.read_trials_csv(str(tmp_path / "trials.csv"))
    rows[2]["train_flops"] = "lots"
    outputs.write_trials_csv(str(tmp_path / "trials.csv"), rows)
    with pytest.raises(SearchError, match="line 4: column"):
        report.load(str(tmp_path))
    (tmp_path / "study.json").write_text("{not json")
    assert report.main(["--study", "bad", "--out", str(tmp_path)]) == 2
    assert "study.json is not valid JSON" in capsys.readouterr().err


def test_command_line_writes_the_report(tmp_path, capsys):
    _synthetic_study(str(tmp_path))
    assert report.main(["--study", "s", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {tmp_path / 'report.md'}"
    assert json.load(open(tmp_path / "study.json"))["settings"]["budget"] == 1e10  # inputs untouched


def test_search_run_writes_the_report_and_survives_a_report_failure(study, monkeypatch, capsys):
    import search.loop
    import search.report
    from search import run

    result, folder = study
    monkeypatch.setattr(search.loop, "run_search", lambda *a, **k: result)
    assert run.main(["--study", "tiny", "--out", folder, "--no-progress"]) == 0
    assert f"report: {os.path.join(folder, 'report.md')}" in capsys.readouterr().out

    def broken(*a, **k):
        raise RuntimeError("disk full\nsecond line")

    monkeypatch.setattr(search.report, "write_report", broken)
    assert run.main(["--study", "tiny", "--out", folder, "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: no report (RuntimeError: disk full)") and err.count("\n") == 1
