"""A closed stdout is not a bug: `python -m einstruct list | head -1` (and the same for search.run and
search.report) ends quietly, with no message and exit code 141 (128 + SIGPIPE, what a shell reports for
`yes | head -1`), whether the write that fails is a print inside main (unbuffered stdout, or more output
than the buffer) or the flush at exit (block-buffered stdout, the default for a pipe)."""

import io
import os
import subprocess
import sys

import pytest

from einstruct import cli
from einstruct.cli import PIPE_CLOSED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(unbuffered: bool) -> dict:
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)  # this checkout's code
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1" if unbuffered else ""}


def run_into_closed_pipe(args, cwd, unbuffered: bool) -> tuple[int, str]:
    """(exit code, stderr) of ``python ARGS`` whose stdout is a pipe with no reader left (closed before it writes)."""
    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run(
            [sys.executable, *args],
            stdout=w,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
            env=_env(unbuffered),
            timeout=300,
            check=False,
        )
    finally:
        os.close(w)
    return proc.returncode, proc.stderr


class ClosedStdout(io.StringIO):
    """A stdout whose reader has gone: every write fails as on a closed pipe."""

    def write(self, s):
        raise BrokenPipeError(32, "Broken pipe")


@pytest.mark.parametrize("unbuffered", [True, False], ids=["unbuffered", "buffered"])
@pytest.mark.parametrize("argv", [["list"], ["show", "btt", "--d", "64", "--symbolic"], ["show", "tt", "--json"]])
def test_einstruct_into_a_closed_pipe_is_quiet(argv, unbuffered, tmp_path):
    code, err = run_into_closed_pipe(["-m", "einstruct", *argv], tmp_path, unbuffered)
    assert (code, err) == (PIPE_CLOSED, "")


def test_einstruct_list_into_head_1_is_quiet(tmp_path):
    """The reported case: the reader takes one line and closes the pipe; whether the writer had finished by
    then is a race, and either way there is no message."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "einstruct", "list"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env=_env(True),
    )
    first = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(timeout=60) in (0, PIPE_CLOSED)
    assert first.split()[0] == b"dense" and err == b""


def test_einstruct_main_returns_141_when_a_print_breaks(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdout", ClosedStdout())
    assert cli.main(["list"]) == PIPE_CLOSED
    assert capsys.readouterr().err == ""


def test_run_command_catches_the_flush_at_exit(monkeypatch, capsys):
    class FailsOnFlush(io.StringIO):
        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", FailsOnFlush())
    with pytest.raises(SystemExit) as e:
        cli.run_command(lambda: 0)
    assert e.value.code == PIPE_CLOSED and capsys.readouterr().err == ""


STUB_PROBE = (
    "import runpy, sys, search.loop as loop; loop.probe = lambda task, widths, device, threads=None: "
    "{'flops_per_second': 1e9, 'seconds_per_trial': 0.01, 'probe_width': min(widths)}; "
    "sys.argv = ['search.run'] + sys.argv[1:]; runpy.run_module('search.run', run_name='__main__')"
)


def test_search_run_dry_run_into_a_closed_pipe_is_quiet(tmp_path):
    """`python -m search.run --dry-run` as it runs (its __main__), with the throughput probe stubbed for speed."""
    code, err = run_into_closed_pipe(
        ["-c", STUB_PROBE, "--dry-run", "--no-progress", "--out", str(tmp_path / "study")], tmp_path, unbuffered=False
    )
    assert (code, err) == (PIPE_CLOSED, "")


def test_search_run_main_returns_141_when_the_plan_print_breaks(monkeypatch, capsys, tmp_path):
    import search.loop
    from search import run

    monkeypatch.setattr(
        search.loop,
        "probe",
        lambda task, widths, device, threads=None: {  # the plan, not the probe, is tested
            "flops_per_second": 1e9,
            "seconds_per_trial": 0.01,
            "probe_width": min(widths),
        },
    )
    monkeypatch.setattr(sys, "stdout", ClosedStdout())
    assert run.main(["--dry-run", "--no-progress", "--out", str(tmp_path / "study")]) == PIPE_CLOSED
    assert capsys.readouterr().err == ""


@pytest.fixture
def study(tmp_path):
    from tests.search.test_report import _synthetic_study

    _synthetic_study(str(tmp_path / "s"))
    return tmp_path / "s"


def test_search_report_into_a_closed_pipe_is_quiet_and_still_writes(study, tmp_path):
    code, err = run_into_closed_pipe(
        ["-m", "search.report", "--study", "s", "--out", str(study)], tmp_path, unbuffered=False
    )
    assert (code, err) == (PIPE_CLOSED, "")
    assert (study / "report.md").exists()


def test_search_report_main_returns_141_when_its_print_breaks(study, monkeypatch, capsys):
    from search import report

    monkeypatch.setattr(sys, "stdout", ClosedStdout())
    assert report.main(["--study", "s", "--out", str(study)]) == PIPE_CLOSED
    assert capsys.readouterr().err == "" and (study / "report.md").exists()
