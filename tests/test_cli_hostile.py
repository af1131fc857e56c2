"""Hostile command lines: every bad argument, file and URL gets one line on stderr, exit code 2, no traceback.

`python -m einstruct`, `python -m search.run` and `python -m search.report` are run in-process through
their main(argv) (what `python -m` runs, minus interpreter start-up), and a few for real in a subprocess.
A password in a storage URL must never show: not in errors, progress output, logs, study.json or report.md.
"""

import json
import os
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from einstruct import cli
from search import report
from search import run as search_run
from tests.search.conftest import SMALLEST_STUDY as SETTINGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = "s3cret-Pa55"
PG = f"postgresql://user:{SECRET}@127.0.0.1:1/db"  # port 1: nothing listens, the connection is refused at once


def call(main, argv, capsys):
    """(exit code, stdout, stderr) of main(argv); argparse's own exits count as return codes."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def postgres_test_url(password: str) -> str:
    """EINSTRUCT_TEST_POSTGRES (a trust-auth server from .ci/postgres.sh) with ``password`` in it; skips
    the calling test when the variable is not set."""
    base = os.environ.get("EINSTRUCT_TEST_POSTGRES")
    if not base:
        pytest.skip("EINSTRUCT_TEST_POSTGRES is not set: start a server with `bash .ci/postgres.sh` and export it")
    scheme, rest = base.split("://", 1)
    user, host = rest.split("@", 1)
    return f"{scheme}://{user.split(':')[0]}:{password}@{host}"


def assert_one_line_error(code, out, err, needle="", prog=""):
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and SECRET not in err + out
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert needle in lines[0], lines[0]


# ---- python -m einstruct -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, needle",
    [
        ([], "required: command"),
        (["show"], "required: spec"),
        (["list", "extra"], "unrecognized arguments"),
        (["show", "btt", "--rank", "abc"], "'abc' is not a size"),
        (["show", "btt", "--rank", "\u00b2"], "is not a size"),  # '²'.isdigit() is True, int('²') a ValueError
        (["show", "btt", "--blocks", "0"], "takes rank"),
        (["show", "monarch", "--blocks", "x"], "invalid int"),
        (["show", "btt", "--pad-tolerance", "nan"], "pad_tolerance"),
        (["show", "btt", "--d", "99999999999"], "out of range"),
        (["show", "theta", "--theta", "1e-1000000000,0,1,0,1,0,0"], "not a number"),
        (["show", "theta", "--theta", ".5,0,.5,0,.5,.5,0", "--rank", "4"], "apply to presets, not to theta"),
        (["show", "btt", "--theta", ".5,0,.5,0,.5,.5,0"], "--theta applies to the spec 'theta'"),
        (["show", "i,io->o", "--size", "i=d_in", "--size", "o=d_out", "--rank", "4"], "not to an einsum"),
        (["show", "i,io->o", "--size", "i=d_in", "--size", "o=d_out", "--name", "bias"], "not allowed"),
        (["show", "i,io->o", "--size", "=", "--size", "o=d_out"], "not in 'i,io->o'"),
        (["show", "i,io->o", "--size", "i=__import__('os').system('x')", "--size", "o=d_out"], "is not a size"),
        (["show", "dense", "--name", "W"], "--name applies to an einsum"),
        (["show", "butterfly"], "unknown preset"),
    ],
)
def test_einstruct_bad_input(argv, needle, capsys):
    assert_one_line_error(*call(cli.main, argv, capsys), needle, "einstruct")


TOKENS = st.sampled_from(
    [
        "show",
        "list",
        "btt",
        "dense",
        "theta",
        "monarch",
        "i,io->o",
        "ga,gae->ge",
        "--rank",
        "--blocks",
        "--theta",
        "--size",
        "--name",
        "--d",
        "--d-in",
        "--d-out",
        "--json",
        "--pad-tolerance",
        "i=d_in",
        "o=d_out",
        "g=4",
        "a=d_in/4",
        "e=d_out/4",
        "4",
        "0",
        "-1",
        "64",
        "nan",
        "1e9",
        "x",
        ".5,0,.5,0,.5,.5,0",
        "1,2,3",
        "",
        "=",
        "d^1/2",
        "R",
        "bias",
    ]
)


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(argv=st.lists(TOKENS, max_size=7))
def test_einstruct_random_command_lines(argv, capsys):
    code, out, err = call(cli.main, argv, capsys)
    if code == 0:
        assert out and not err.strip()
    else:
        assert_one_line_error(code, out, err, prog="einstruct")


def test_einstruct_internal_errors_are_one_line_too(capsys, monkeypatch):
    monkeypatch.setattr(cli, "compile", lambda *a, **k: 1 / 0)
    code, _, err = call(cli.main, ["show", "btt"], capsys)
    assert code == 1 and err.count("\n") == 1 and "internal error: ZeroDivisionError" in err and "--debug" in err
    with pytest.raises(ZeroDivisionError):
        cli.main(["--debug", "show", "btt"])


# ---- python -m search.run ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    (d / "empty.txt").write_text("")
    (d / "short.txt").write_text("hello world\n")
    (d / "binary.txt").write_bytes(b"\x00\x01\x02" * 200)
    (d / "odd.bin").write_bytes(b"abc")
    (d / "folder").mkdir()
    (d / "notpickle").mkdir()
    (d / "notpickle" / "data_batch_1").write_text("not a pickle")
    (d / "notpickle" / "test_batch").write_text("not a pickle")
    small = d / "small-cifar"
    small.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("data_batch_1", 6), ("test_batch", 4)):
        with open(small / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), b"labels": [0] * n}, f)
    (d / "study.json").write_text("{not json")
    return d


RUN_CASES = [
    (["--budget", "abc"], "invalid float"),
    (["--sampler", "bogus"], "invalid choice"),
    (["--task", "nope"], "invalid choice"),
    (["--space", "nope"], "invalid choice"),
    (["--levels", "x"], "invalid int"),
    (["--budget", "nan", "--dry-run"], "--budget must be a positive"),
    (["--budget=-1e9", "--dry-run"], "--budget must be a positive"),
    (["--levels", "2", "--dry-run"], "--levels must be"),
    (["--ratio", "nan", "--dry-run"], "--ratio must be"),
    (["--workers", "0"], "--workers must be 1 or more"),
    (["--heartbeat", "-5"], "--heartbeat must be"),
    (["--device", "tpu", "--dry-run"], "unknown device"),
    (["--study", "../etc", "--dry-run"], "not allowed"),
    (["--study", "a/b"], "no path characters"),
    (["--study", ""], "not allowed"),
    (["--study", "x" * 300], "not allowed"),
    (["--task", "lm", "--dry-run"], "needs data=PATH"),
    (["--task", "lm", "--data", "{d}/missing.txt", "--dry-run"], "does not exist"),
    (["--task", "lm", "--data", "{d}/empty.txt", "--dry-run"], "is empty"),
    (["--task", "lm", "--data", "{d}/short.txt", "--dry-run"], "shorter than one sequence"),
    (["--task", "lm", "--data", "{d}/binary.txt", "--dry-run"], "looks binary"),
    (["--task", "lm", "--data", "{d}/odd.bin", "--dry-run"], "odd number of bytes"),
    (["--task", "lm", "--data", "{d}/folder", "--dry-run"], "is a folder"),
    (["--task", "cifar", "--data", "{d}/empty.txt", "--dry-run"], "does not exist"),
    (["--task", "cifar", "--data", "{d}/folder", "--dry-run"], "holds no CIFAR batches"),
    (["--task", "cifar", "--data", "{d}/notpickle", "--dry-run"], "not a CIFAR python pickle"),
    (["--task", "cifar", "--data", "{d}/small-cifar", "--dry-run"], "fewer than one batch"),
    (["--storage", "nonsense"], "is not a URL"),
    (["--storage", f"user:{SECRET}@host/db"], "is not a URL"),
    (["--storage", PG], "Connection refused"),
    (["--storage", f"postgresql://user:p@{SECRET}@127.0.0.1:1/db"], "percent-encode it as %40"),
    (["--storage", f"postgresql://user:{SECRET}@127.0.0.1:notaport/db"], "cannot open storage"),
    (["--storage", f"postgresql://user:{SECRET}@127.0.0.1:1/db?password={SECRET}"], "cannot open storage"),
    (["--storage", f"mysql://user:{SECRET}@127.0.0.1:1/db"], "no database driver"),
    (["--storage", f"foo://user:{SECRET}@x/db"], "cannot open storage"),
    (["--storage", "sqlite:////nonexistent/dir/study.db"], "does not exist"),
    (["--out", "{d}/empty.txt/sub"], "cannot create the study folder"),
    (["--out", "{d}"], "cannot be read as this study's settings"),  # {d}/study.json is not JSON
]


@pytest.mark.parametrize("argv, needle", RUN_CASES, ids=[" ".join(a)[:60] for a, _ in RUN_CASES])
def test_search_run_bad_input(argv, needle, files, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # runs/<study> of a case that gets far would land here
    monkeypatch.delenv("EINSTRUCT_STORAGE", raising=False)
    argv = [a.replace("{d}", str(files)) for a in argv]
    t0 = time.perf_counter()
    code, out, err = call(search_run.main, ["--no-progress", "--budget", "1e8", *argv], capsys)
    assert_one_line_error(code, out, err, needle, "search.run")
    assert time.perf_counter() - t0 < 30  # refused before any training
    assert not (tmp_path / "runs").exists() or "--out" in argv


def test_storage_url_from_the_environment_keeps_the_password_off_the_command_line(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EINSTRUCT_STORAGE", PG)
    code, out, err = call(search_run.main, ["--no-progress", "--budget", "1e8"], capsys)
    assert_one_line_error(code, out, err, "postgresql://user:***@127.0.0.1:1/db", "search.run")


def test_search_run_internal_errors_are_one_line_and_redacted(capsys, monkeypatch, tmp_path):
    import search.loop

    def broken(*a, **k):
        raise RuntimeError(f"boom at {PG}\nsecond line")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(search.loop, "run_search", broken)
    code, out, err = call(search_run.main, ["--no-progress", "--storage", PG], capsys)
    assert code == 1 and err.count("\n") == 1 and SECRET not in err + out and "internal error: RuntimeError" in err
    with pytest.raises(RuntimeError):
        search_run.main(["--no-progress", "--storage", PG, "--debug"])


# ---- python -m search.report -------------------------------------------------------------------------


def test_search_report_bad_input(files, capsys, tmp_path):
    cases = [
        (["--study", "../x"], "not allowed"),
        (["--study", "a/b", "--out", str(tmp_path)], "not allowed"),
        (["--bogus"], "unrecognized arguments"),
        (["--study", "x", "--out", str(tmp_path / "missing")], "no study folder"),
        (["--study", "x", "--out", str(files / "folder")], "has no trials.csv"),
        (["--study", "x", "--out", str(files / "empty.txt")], ""),
    ]
    (tmp_path / "trials.csv").write_text("\x00\x01 not a csv")
    cases.append((["--study", "x", "--out", str(tmp_path)], "not a trials.csv"))
    for argv, needle in cases:
        assert_one_line_error(*call(report.main, argv, capsys), needle, "search.report")


# ---- secrets: nowhere in what a study writes or prints ---------------------------------------------


def _check_no_secret(folder, *texts):
    for text in texts:
        assert SECRET not in text
    for root, _, names in os.walk(folder):
        for n in names:
            with open(os.path.join(root, n), "rb") as f:
                assert SECRET.encode() not in f.read(), n


def _run_with_password(url, folder, capsys, caplog, name="secret"):
    import logging

    from search.loop import run_search

    caplog.set_level(logging.INFO)
    result = run_search(name, storage=url, out=str(folder), reporter=search_run.TqdmReporter(enabled=True), **SETTINGS)
    path = report.write_report(str(folder), name)
    out, err = capsys.readouterr()
    meta = json.load(open(folder / "study.json"))
    assert "***" in meta["storage"] and SECRET not in meta["storage"]
    assert result.spent > 0 and os.path.exists(path)
    _check_no_secret(folder, out, err, caplog.text)
    return meta


def test_password_never_written_or_printed(tmp_path, capsys, caplog, monkeypatch):
    """A study on a password-protected database (stood in for by SQLite behind the URL): no trace of the password."""
    import search.loop
    from search import storage

    real_open = storage.open_storage
    db = "sqlite:///" + str(tmp_path / "stand-in.db")
    url = f"postgresql://user:{SECRET}@db-host:5432/einstruct"
    monkeypatch.setattr(search.loop, "check_storage", lambda u: u)
    monkeypatch.setattr(search.loop, "open_storage", lambda u, **kw: real_open(db if u == url else u, **kw))
    _run_with_password(url, tmp_path / "study", capsys, caplog)


def test_password_never_written_or_printed_on_a_real_postgres(tmp_path, capsys, caplog):
    """With EINSTRUCT_TEST_POSTGRES (a trust-auth server from .ci/postgres.sh, which accepts any password)."""
    url = postgres_test_url(SECRET)
    _run_with_password(url, tmp_path / "study", capsys, caplog, name=f"secret-{os.getpid()}-{time.time_ns()}")


# ---- real processes ----------------------------------------------------------------------------------


def _proc(*argv, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    env.pop("EINSTRUCT_STORAGE", None)
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-m", *argv], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, check=False
    )
    return p, time.perf_counter() - t0


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["einstruct", "show", "butterfly"], "unknown preset"),
        (["search.run", "--no-progress", "--storage", PG, "--study", "hostile-pg"], "Connection refused"),
        (["search.report", "--study", "../x"], "no path characters"),
    ],
)
def test_real_processes_fail_with_one_line(argv, needle):
    p, seconds = _proc(*argv)
    assert p.returncode == 2, p.stderr
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and needle in err
    assert SECRET not in p.stdout + p.stderr
    assert seconds < 60  # an unreachable database fails fast: nothing is trained first


def test_debug_shows_the_traceback():
    p, _ = _proc("einstruct", "--debug", "show", "butterfly")
    assert p.returncode != 0 and "Traceback" in p.stderr and "SpecError: unknown preset" in p.stderr
    import einstruct as es

    with pytest.raises(es.SpecError):  # --debug after the subcommand works too
        cli.main(["show", "butterfly", "--debug"])


@pytest.mark.parametrize(
    "text, want",
    [
        (f"postgresql://user:{SECRET}@host:5432/db", "postgresql://user:***@host:5432/db"),
        (f"postgresql+psycopg://user:a/b@{SECRET}@host/db", "postgresql+psycopg://user:***@host/db"),
        (f"cannot open 'mysql://u:{SECRET}@h/db': refused", "cannot open 'mysql://u:***@h/db': refused"),
        (f"user:{SECRET}@host", "user:***@host"),
        (f"postgresql://u@h/db?password={SECRET}&x=1", "postgresql://u@h/db?password=***&x=1"),
        (f"host=h password={SECRET} dbname=d", "host=h password=*** dbname=d"),
        ("sqlite:///runs/s/study.db", "sqlite:///runs/s/study.db"),
        ("postgresql://user@host/db", "postgresql://user@host/db"),
        ("error at 12:30: a:b", "error at 12:30: a:b"),
    ],
)
def test_redact(text, want):
    from search.storage import redact

    assert redact(text) == want


def test_redact_hides_the_pieces_of_a_password_a_driver_split():
    from search.storage import password_of, redact

    url = f"postgresql://user:p@{SECRET}@127.0.0.1:1/db"
    assert password_of(url) == f"p@{SECRET}"
    assert SECRET not in redact(f"failed to resolve host '{SECRET}@127.0.0.1'", url)
