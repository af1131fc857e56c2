"""A user's own families in a real (tiny) search: one from a space file, one from a Python module.

Each is trained (trials.csv: its family name, its arguments as JSON, real FLOPs), grouped in report.md (its own
frontier row, its winners' table rebuilt from the space), and drawn in the taxonomy plot at the omega and psi of
its compiled structure.
"""

import csv
import json
import os
import textwrap
from pathlib import Path

import pytest

import einstruct as es
from search import report
from search.families import Candidate
from search.loop import run_search
from search.space import make_space

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(
    budget=1e8,
    levels=3,
    ratio=2.0,
    top_trials=3,
    min_steps=8,
    target_steps=30,
    device="cpu",
    estimate=False,
    confirm_share=0.0,  # the exploration groups are what these tests read
    task_settings=dict(pool=2048, eval_size=256, batch=32, teacher_width=16, teacher_depth=2, widths=[16, 32, 64]),
)
MODULE = '''
import einstruct as es
from search.families import Family


class Kron3(Family):
    """Kronecker with three factors of sizes d^(1/3), plus an integer bond rank: a family written in Python."""

    name, label, group, keys = "kron3", "Kron-3", "Kronecker-3", ("rank",)

    def suggest(self, trial):
        return {"rank": trial.suggest_categorical("kron3.rank", [1, 2])}

    def params_for(self, args):
        return {"kron3.rank": args["rank"]}

    def random_params(self, rng):
        return {"kron3.rank": rng.choice([1, 2])}

    def build(self, args):
        third_in, third_out = "d_in^1/3", "d_out^1/3"
        return es.Spec("abc,adr,ber,cf->def", a=third_in, b=third_in, c=third_in, d=third_out, e=third_out,
                       f=third_out, r=args["rank"])

    def references(self):
        return ({"rank": 1},)


SPACE = ["dense", Kron3()]
'''


def _run(tmp_path_factory, name, space):
    out = tmp_path_factory.mktemp(name)
    run_search(name, out=str(out), space=space, **TINY)
    report.write_report(str(out), name)
    rows = list(csv.DictReader(open(out / "trials.csv")))
    return str(out), rows


@pytest.fixture(scope="module")
def from_file(tmp_path_factory):
    return _run(tmp_path_factory, "file", str(ROOT / "examples" / "spaces" / "my_space.toml"))


@pytest.fixture(scope="module")
def from_module(tmp_path_factory):
    mod = tmp_path_factory.mktemp("mod")
    (mod / "my_families.py").write_text(textwrap.dedent(MODULE))
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(mod))
    try:
        yield _run(tmp_path_factory, "module", "my_families:SPACE")
    finally:
        mp.undo()


def _trained(rows, family):
    return [r for r in rows if r["family"] == family and r["state"] == "COMPLETE" and int(r["train_flops"]) > 0]


def _check(folder, rows, space, family, group, choices):
    sp = make_space(space, (16, 32, 64))
    trained = _trained(rows, family)
    assert trained, f"no trained {family} trial"
    for r in trained:
        args = json.loads(r["family_params"])
        assert set(args) == set(sp.family(family).keys) and all(args[k] in choices[k] for k in choices)
        assert r["group"] == group and r["structure"] == Candidate.from_row(r, sp.by_name()).label
    text = open(os.path.join(folder, "report.md")).read()
    frontier = text[text.index("## Frontiers") : text.index("## Compute multipliers")]
    assert f"\n| {group} | {len(trained)} |" in frontier  # its own group, with its runs
    study = report.load(folder)
    drawn = report.plot_taxonomy(study, os.path.join(folder, "taxonomy_check.png"))
    mine = [p for p in drawn["points"] if p["family"] == family]
    assert mine and all(p["group"] == group for p in mine) and group in drawn["annotations"]
    for p in mine:  # drawn where its compiled structure sits
        row = next(r for r in trained if r["structure"] == p["structure"])
        st = es.compile(Candidate.from_row(row, sp.by_name()).structure_spec(), int(row["width"]))
        assert (p["omega"], p["psi"]) == pytest.approx((st.omega, st.psi))
    return text


def test_a_space_file_family_is_trained_grouped_and_drawn(from_file):
    folder, rows = from_file
    space = str(ROOT / "examples" / "spaces" / "my_space.toml")
    text = _check(folder, rows, space, "tt3", "TT-3", {"rank": (1, 2, 4)})
    assert "(cannot rebuild" not in text
    skewed = _trained(rows, "skewed")
    assert skewed and all(0.25 <= json.loads(r["family_params"])["x"] <= 0.75 for r in skewed)
    assert "\n| skewed |" in text
    first = [r for r in rows if r["level"] == "0"][:3]  # the file's references, queued first
    assert [r["structure"] for r in first] == ["dense", "btt(r=1)", "tt3(rank=2)"]


def test_a_python_module_family_is_trained_grouped_and_drawn(from_module):
    folder, rows = from_module
    _check(folder, rows, "my_families:SPACE", "kron3", "Kronecker-3", {"rank": (1, 2)})
    assert {r["family"] for r in rows} == {"dense", "kron3"}


def test_the_command_line_takes_a_space_file(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = lambda *a: subprocess.run(
        [sys.executable, "-m", "search.run", *a], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    tiny = json.dumps(TINY["task_settings"])
    ok = run(
        "--space", str(ROOT / "examples/spaces/my_space.toml"), "--dry-run", "--budget", "1e9", "--task-settings", tiny
    )
    assert ok.returncode == 0, ok.stderr
    assert "references at every level: dense, btt(r=1), tt3(rank=2)" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[families.tt3]\nspec = "ga,gaf,fge->fe"\nsizes = { g = "{rnk}", a = "d_in", f = "d_out", e = 1 }\n')
    err = run("--space", str(bad), "--dry-run")
    assert err.returncode == 2 and err.stdout == ""
    assert err.stderr == (
        f"search.run: error: space file {bad}: family tt3, key sizes.g: {{rnk}} names no parameter "
        "(declared: none); add it to params\n"
    )
