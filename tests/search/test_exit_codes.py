"""Exit codes: bad input and a machine's failures are one line and exit code 2, Ctrl-C is one line and 130.

Numbers whose arithmetic overflows or underflows, step counts below 1, seeds out of range, the meta device,
plans of more trials than a study can run, CIFAR pickles of the wrong types, a damaged study.db and a full
disk used to end as "internal error" (exit 1), some of them only after a dry run had passed.
"""

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from search import report, train
from search import run as search_run
from tests.search.conftest import SMALLEST_STUDY as SETTINGS

from ..test_cli_hostile import call
from .conftest import write_cifar

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def assert_one_line(code, err, needle, want=2, prog="search.run"):
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("warning: ")]  # the plan's own warnings
    assert code == want, (code, err[-3000:])
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert needle in lines[0], lines[0]
    if want == 2:
        assert lines[0].startswith(f"{prog}: error: "), lines[0]


RUN_CASES = [
    (["--budget", "5e-324"], "less than one FLOP"),
    (["--levels", "1000"], "more than the 100,000 trials"),
    (["--ratio", "1e308"], "more than the 100,000 trials"),
    (["--top-trials", "100000", "--budget", "1e20"], "more than the 100,000 trials"),
    (["--seed", "99999999999999999999999"], "--seed must be an integer from 0 to 4294967295"),
    (["--seed", "-1"], "--seed must be"),
    (["--device", "meta"], "shapes only"),
    (["--target-steps", "0"], "--target-steps must be a whole number of steps, 1 or more"),
    (["--target-steps", "-1"], "--target-steps must be"),
    (["--min-steps", "-5"], "--min-steps must be a whole number of steps, 1 or more"),
    (["--min-steps", "0"], "--min-steps must be"),
]


@pytest.mark.parametrize("dry", [True, False], ids=["dry-run", "run"])
@pytest.mark.parametrize("argv, needle", RUN_CASES, ids=[" ".join(a) for a, _ in RUN_CASES])
def test_settings_that_cannot_make_sense(argv, needle, dry, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EINSTRUCT_STORAGE", raising=False)
    t0 = time.perf_counter()
    code, _, err = call(search_run.main, ["--no-progress", *argv, *(["--dry-run"] if dry else [])], capsys)
    assert_one_line(code, err, needle)
    assert time.perf_counter() - t0 < 10 and not (tmp_path / "runs").exists()  # refused before anything


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--device", "meta"], "shapes only"),
        (["--seed", "99999999999999999999999"], "--seed must be"),
        (["--seed", "-1"], "--seed must be"),
        (["--task-settings", "[1]"], "must be a JSON object"),
        (["--checkpoint-every", "-1"], "--checkpoint-every"),
    ],
)
def test_search_train_bad_input(argv, needle, capsys):
    assert_one_line(*call(train.main, argv, capsys)[::2], needle, prog="search.train")


def test_search_train_bug_is_one_line_and_debug_shows_it(capsys, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(train, "run", broken)
    code, _, err = call(train.main, [], capsys)
    assert_one_line(code, err, "internal error: RuntimeError: boom", want=1)
    with pytest.raises(RuntimeError):
        train.main(["--debug"])


# ---- CIFAR pickles of the wrong types ------------------------------------------------------------


@pytest.mark.parametrize(
    "entry, needle",
    [
        ({b"data": ["x" * 3072] * 8, b"labels": [0] * 8}, "row 0 is a str"),
        ({b"data": [b"x" * 10] * 8, b"labels": [0] * 8}, "row 0 is a bytes of length 10"),
        ({b"data": [None] * 8, b"labels": [0] * 8}, "row 0 is None"),
        ({b"data": "pixels", b"labels": [0] * 8}, "b'data' that is a str"),
        ({b"data": b"\x00" * 3072 * 8, b"labels": [0] * 8}, "b'data' that is a bytes"),
        ({b"data": None, b"labels": [0] * 8}, "b'data' that is None"),
        ({b"data": np.zeros((8, 3072), np.uint8), b"labels": {0: 1}}, "b'labels' that is a dict"),
        ({b"data": np.zeros((8, 3072), np.uint8), b"labels": ["a"] * 8}, "not an integer"),
        ({b"data": np.zeros((8, 3072), np.uint8)}, "no b'labels' entry"),
    ],
)
def test_cifar_pickles_of_the_wrong_types(entry, needle, tmp_path, capsys, monkeypatch):
    write_cifar(tmp_path / "c", n_train=64, n_test=16)
    with open(tmp_path / "c" / "data_batch_2", "wb") as f:
        pickle.dump(entry, f)
    monkeypatch.chdir(tmp_path)
    for main, argv, prog in (
        (search_run.main, ["--no-progress", "--dry-run"], "search.run"),
        (train.main, [], "search.train"),
    ):
        code, _, err = call(main, [*argv, "--task", "cifar", "--data", str(tmp_path / "c")], capsys)
        assert_one_line(code, err, needle, prog=prog)


# ---- the machine: a damaged database, a full disk ------------------------------------------------


def _tiny_study(folder, name="s", **more):
    from search.loop import run_search

    return run_search(name, out=str(folder), estimate=False, **{**SETTINGS, **more})  # no throughput probe


def test_a_damaged_study_db_is_one_line(tmp_path, capsys, monkeypatch):
    """The last page of a finished study's database garbled: it opens, and fails when the resumed search reads
    or commits (Optuna's StorageInternalError, or a DatabaseError: 'database disk image is malformed')."""
    import sqlite3

    folder = tmp_path / "study"
    _tiny_study(folder)
    db = folder / "study.db"
    with sqlite3.connect(db) as conn:  # everything into the main file, so that the damage is not in the WAL
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = os.path.getsize(db)
    with open(db, "r+b") as f:
        f.seek(size - 4096)
        f.write(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    monkeypatch.chdir(tmp_path)
    code, _, err = call(search_run.main, ["--no-progress", "--study", "s", "--out", str(folder)], capsys)
    assert_one_line(code, err, "malformed")


def test_a_full_disk_is_named(tmp_path, capsys, monkeypatch):
    """SQLite's max_page_count fills the database for real ("database or disk is full"), which Optuna reports
    as StorageInternalError "... e.g. exceeding max length"; search.run names the disk's folder instead."""
    from sqlalchemy import event

    import search.loop
    from search import storage

    real = storage.open_storage
    cap = []  # the database's size limit in pages: what it holds when first opened, and 12 pages more

    def small(url, **kw):
        st = real(url, **kw)

        @event.listens_for(st.engine, "connect")
        def _limit(conn, _record):
            cur = conn.cursor()
            if not cap:
                cur.execute("PRAGMA page_count")
                cap.append(cur.fetchone()[0] + 12)
            cur.execute(f"PRAGMA max_page_count = {cap[0]}")
            cur.close()

        st.engine.dispose()
        return st

    folder = tmp_path / "full"
    monkeypatch.setattr(search.loop, "open_storage", small)
    with pytest.raises(Exception) as info:  # the search itself, as search.run would run it
        _tiny_study(folder, name="default")
    assert "database or disk is full" in repr(info.value) + repr(info.value.__cause__) + repr(info.value.__context__)

    def failing(*a, **k):
        raise info.value

    monkeypatch.setattr(search.loop, "run_search", failing)
    monkeypatch.chdir(tmp_path)
    code, _, err = call(search_run.main, ["--no-progress", "--out", str(folder)], capsys)
    assert_one_line(code, err, f"the disk holding {folder} is full (database or disk is full)")
    assert "exceeding max length" not in err


def test_enospc_is_named(tmp_path, capsys, monkeypatch):
    import errno

    import search.loop

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "full" / "trials.csv.tmp"))

    monkeypatch.setattr(search.loop, "run_search", full)
    monkeypatch.chdir(tmp_path)
    code, _, err = call(search_run.main, ["--no-progress", "--out", str(tmp_path / "full")], capsys)
    assert_one_line(code, err, f"the disk holding {tmp_path / 'full'} is full (No space left on device)")


# ---- Ctrl-C ----------------------------------------------------------------------------------------


def test_ctrl_c_during_the_report(tmp_path):
    """A real SIGINT, delivered while the report is being written: one line, exit code 130."""
    folder = tmp_path / "study"
    _tiny_study(folder)
    code = textwrap.dedent(f"""
        import os, signal, sys
        from search import report
        real = report.render
        def render(*a, **k):
            os.kill(os.getpid(), signal.SIGINT)
            return real(*a, **k)
        report.render = render
        sys.exit(report.main(["--study", "s", "--out", {str(folder)!r}]))
    """)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert p.returncode == 128 + signal.SIGINT, p.stderr[-3000:]
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "interrupted" in p.stderr


def test_ctrl_c_after_a_search_is_one_line(tmp_path, capsys, monkeypatch):
    import search.loop

    result = _tiny_study(tmp_path / "s", name="default")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(search.loop, "run_search", lambda *a, **k: result)  # the search is done; then Ctrl-C
    monkeypatch.setattr(report, "write_report", interrupted)
    monkeypatch.chdir(tmp_path)
    try:
        code, _, err = call(search_run.main, ["--no-progress", "--out", str(tmp_path / "s")], capsys)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped search.run's main: python -m search.run prints its traceback")
    assert code == 130 and len(err.strip().splitlines()) == 1, err
    assert f"python -m search.report --study default --out {tmp_path / 's'}" in err
