"""One settings object: every option's default and help defined once (search.settings.Settings), read by --help,
README, run_search (with the command line's one-line checks) and study.json, and old studies' settings still read."""

from __future__ import annotations

import inspect
import json
import os
import re
import sqlite3

import pytest

from search import budget, loop, settings
from search import run as search_run
from search.errors import SearchError
from search.settings import Settings

from ..test_cli_hostile import call
from .test_exit_codes import RUN_CASES, SETTINGS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _squash(text: str) -> str:
    return " ".join(text.split())


def test_every_option_is_in_help_with_its_default_and_in_readmes_table():
    shown = _squash(search_run.parser().format_help())
    for name in Settings.names():
        assert f"{settings.flag(name)} " in shown and _squash(settings.help_text(name)) in shown, name
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert settings.markdown_table() in readme  # the generated table, so it cannot drift from the dataclass
    for flag in re.findall(r"(--[a-z][a-z-]+)", shown):  # the process's own options are named there too
        assert f"`{flag}`" in readme, flag


def test_each_default_is_defined_once():
    defaults = Settings().as_dict()
    assert loop.DEFAULTS == defaults and loop.KEYED == settings.KEYED
    for fn in (budget.plan_levels, budget.budget_for, budget.check_plan):
        params = inspect.signature(fn).parameters
        assert {k: params[k].default for k in ("levels", "ratio", "top_trials")} == {
            k: defaults[k] for k in ("levels", "ratio", "top_trials")
        }, fn.__name__
    args = search_run.parser().parse_args([])
    assert all(getattr(args, k) is None for k in Settings.names())  # left out: the stored study's value wins
    # no other module of the search states a number for an option (as a parameter default or a dict entry)
    numeric = [k for k, v in defaults.items() if isinstance(v, (int, float)) and k != "seed"]  # seed=0: train.run's
    pattern = re.compile(r"\b(" + "|".join(numeric) + r")\b\"?\s*(?::\s*[\w.| ]+)?\s*[=:]\s*[-+]?\d")
    found = []
    for folder, _, names in os.walk(os.path.join(ROOT, "search")):
        for n in names:
            path = os.path.join(folder, n)
            if n.endswith(".py") and path != settings.__file__:
                found += [f"{n}: {m.group(0)}" for m in pattern.finditer(open(path).read())]
    assert not found, found


def _given(argv: list[str]) -> dict:
    args = search_run.parser().parse_args(argv)
    return {k: getattr(args, k) for k in Settings.names() if getattr(args, k) is not None}


PY_CASES = [a for a, _ in RUN_CASES] + [
    ["--budget", "nan"],
    ["--levels", "2"],
    ["--heartbeat", "-5"],
    ["--checkpoints", "0"],
    ["--checkpoint-steps", "-1"],
    ["--device", "tpu"],
]


@pytest.mark.parametrize("argv", PY_CASES, ids=[" ".join(a) for a in PY_CASES])
def test_python_callers_get_the_command_lines_one_line_errors(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EINSTRUCT_STORAGE", raising=False)
    code, _, err = call(search_run.main, ["--no-progress", "--dry-run", *argv], capsys)
    assert code == 2
    line = err.strip().splitlines()[-1].removeprefix("search.run: error: ")
    given = _given(argv)
    with pytest.raises(SearchError) as kw:
        loop.run_search("py", out=str(tmp_path / "py"), **given)
    with pytest.raises(SearchError) as obj:
        loop.run_search("py", out=str(tmp_path / "py"), settings=Settings.from_dict(given))
    assert str(kw.value) == str(obj.value) == line and "\n" not in line
    assert not (tmp_path / "py").exists()  # refused before anything was written


def test_python_only_mistakes_are_one_line_errors_too(tmp_path):
    for bad, needle in (
        ({"sampler": "bogus"}, "unknown sampler 'bogus'"),
        ({"task_settings": [1]}, "--task-settings must be a JSON object"),
        ({"budgte": 1e9}, "unknown setting(s) budgte; settings are task, data, budget"),
        ({"seed": True}, "--seed must be an integer"),
        ({"data": 3}, "--data must be a path"),
    ):
        with pytest.raises(SearchError, match=re.escape(needle)):
            loop.run_search("py", out=str(tmp_path / "py"), **bad)
    with pytest.raises(SearchError, match="unknown setting"):
        Settings.from_dict({"budgte": 1e9})
    assert not (tmp_path / "py").exists()


def test_a_path_object_is_stored_as_its_string(tmp_path):
    assert Settings.from_dict({"data": tmp_path / "corpus.txt"}).data == str(tmp_path / "corpus.txt")
    with pytest.raises(SearchError, match="does not exist"):  # the task reads it; study.json could not hold a Path
        loop.run_search("py", out=str(tmp_path / "py"), task="lm", data=tmp_path / "corpus.txt", dry_run=True)


def test_settings_pass_to_worker_processes_unchanged():
    given = {"budget": 1e-3 + 6e10, "task_settings": {"batch": 8, "widths": [16, 32]}, "seed": 7, "data": None}
    assert _given(settings.to_argv(given)) == {k: v for k, v in given.items() if v is not None}


def test_old_settings_are_read_and_new_ones_default(tmp_path):
    """study.json and the database of a study from another version: unknown names are skipped, missing ones
    take their defaults, and a given setting is still compared with the stored one."""
    stored = {k: v for k, v in Settings(budget=3e9, seed=4).keyed().items() if k != "target_steps"}
    stored["schedule"] = "constant"  # a name this version does not know
    cfg = settings.for_study("old", str(tmp_path), {}, stored)
    assert cfg == Settings(budget=3e9, seed=4).as_dict()
    with pytest.raises(SearchError, match=re.escape("already exists with budget=3000000000.0, not 1000.0")):
        settings.for_study("old", str(tmp_path), {"budget": 1e3}, stored)
    rows = settings.described({**stored, "heartbeat": 2})
    assert [r[0] for r in rows] == [*(n for n in Settings.names() if n in stored or n == "heartbeat"), "schedule"]


def test_a_study_from_before_the_settings_table_resumes_from_its_study_json(tmp_path):
    """Its database has no stored settings, its study.json lacks the newer process options and has an old name:
    the study resumes with its own settings and trains nothing more."""
    folder = tmp_path / "old"
    first = loop.run_search("old", out=str(folder), estimate=False, **SETTINGS)
    rows = first.rows()
    with sqlite3.connect(folder / "study.db") as c:
        c.execute("DELETE FROM einstruct_study")
    meta = json.load(open(folder / "study.json"))
    assert meta["settings"] == Settings.from_dict(SETTINGS).as_dict()  # study.json records every option
    for k in ("heartbeat", "checkpoints", "checkpoint_steps", "device"):
        meta["settings"].pop(k)
    meta["settings"]["schedule"] = "constant"
    json.dump(meta, open(folder / "study.json", "w"))
    again = loop.run_search("old", out=str(folder), estimate=False, device="cpu")
    assert again.settings == {**first.settings, "device": "cpu"}
    assert len(again.rows()) == len(rows) and again.spent == first.spent
    assert again.ledger.settings() == Settings.from_dict(first.settings).keyed()  # stored again
