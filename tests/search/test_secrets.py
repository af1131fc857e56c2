"""Secrets of a storage URL never show: hostile passwords and secret parameters, in every form a message may take.

Passwords with quotes of both kinds, spaces, '@', ':', '/', '%', '+', backslashes and non-ASCII characters are
put into URLs the ways a user writes them (percent-encoded, or raw where the URL grammar allows it) and as
secret query parameters (password=, sslpassword=, sslkey=). None of them may appear, in any of the forms a
driver or Python prints (escaped quotes, repr, JSON, percent-encoded), in redacted text, on the stderr of a
failed connection (a closed local port, so it fails at once), or in study.json, trials.csv, report.md and logs.
"""

import json
import logging
import os
import re
import socket
import subprocess
import sys
from urllib.parse import quote, quote_plus

import pytest

from search import run as search_run
from search.storage import password_of, redact
from tests.search.conftest import SMALLEST_STUDY as SETTINGS

from ..test_cli_hostile import postgres_test_url

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HOSTILE = [  # each has a run of 4+ word characters, so that a partial leak shows too
    "Zz'W\"rong9",  # both kinds of quote: repr() shows it as Zz\'W"rong9
    "o'neilQ7x-kw",  # one kind: repr() switches to double quotes and escapes nothing
    "has a spaceX9 k",
    "p@ssQ:w/rdZ9",  # '@' (percent-encoded in a URL), ':' and '/'
    "100%sure%41xQ",  # '%': raw, '%41' would be decoded to 'A' by the driver
    "a+b plusQ8",  # '+' is a space in a query value, a '+' in the user part
    "bakQ\\slashQ\\\\",
    "\u00fcn\u00ef\u00e7\u00f8d\u00e9\u20ac\U0001f511",  # non-ASCII, and an emoji outside the BMP
    "\"'\\ @:/%20?&=#Kq9z",  # everything at once
]
IDS = [f"pw{i}" for i in range(len(HOSTILE))]


def leaked_forms(pw: str) -> set[str]:
    """What a leak of ``pw`` may look like (written independently of search.secrets.forms)."""
    both = pw.replace("\\", "\\\\").replace("'", "\\'").replace('"', '\\"')
    out = {
        pw,
        repr(pw)[1:-1],
        ascii(pw)[1:-1],
        both,
        json.dumps(pw)[1:-1],
        quote(pw, safe=""),
        quote_plus(pw),
        quote(pw, safe=" +"),
        repr(pw.encode())[2:-1],
        *re.findall(r"\w{4,}", pw),
    }
    return {f for f in out if len(f) >= 3}


def assert_clean(text: str, pw: str) -> None:
    found = [f for f in leaked_forms(pw) if f in text]
    assert not found, (found, text)


def user_part_urls(pw: str, host: str = "127.0.0.1", port: int = 5432) -> list[str]:
    """The password in the user part: fully percent-encoded, and as a user may write it (only '@' and '%'
    must be encoded; quotes, spaces, ':', '/' and backslashes connect as they are)."""
    raw = pw.replace("%", "%25").replace("@", "%40").replace("?", "%3F").replace("#", "%23")
    return [f"postgresql://user:{quote(pw, safe='')}@{host}:{port}/db", f"postgresql://user:{raw}@{host}:{port}/db"]


def query_url(pw: str, host: str = "127.0.0.1", port: int = 5432) -> str:
    return (
        f"postgresql://user@{host}:{port}/db?sslmode=prefer&sslpassword={quote_plus(pw)}"
        f"&password={quote(pw, safe='')}&sslkey={quote(pw, safe='')}&application_name=einstruct"
    )


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: a connection is refused at once
    return port


# ---- parsing: the secrets are the ones the driver is given -----------------------------------------


@pytest.mark.parametrize("pw", HOSTILE, ids=IDS)
def test_parse_agrees_with_sqlalchemy(pw):
    from sqlalchemy.engine import make_url

    from search.secrets import parse, secrets_of

    for url in user_part_urls(pw):
        assert make_url(url).password == pw  # the URL connects with this password
        assert pw in secrets_of(url)
        assert parse(url).redacted() == "postgresql://user:***@127.0.0.1:5432/db"
    url = query_url(pw)
    q = make_url(url).query
    assert q["sslpassword"] == q["password"] == q["sslkey"] == pw
    assert pw in secrets_of(url) and password_of(url) == ""
    assert redact(url) == (
        "postgresql://user@127.0.0.1:5432/db?sslmode=prefer&sslpassword=***&password=***"
        "&sslkey=***&application_name=einstruct"
    )


def test_a_raw_at_sign_hides_every_reading():
    url = "postgresql://user:p@ss@w0rd@db-host/db"  # refused by check_url; its message must still hide it all
    assert password_of(url) == "p@ss@w0rd"
    assert redact(url) == "postgresql://user:***@db-host/db"
    assert "ss@w0rd" not in redact('could not translate host name "ss@w0rd@db-host"', url)
    url = "postgresql://user@h:1/db?password=p@ss:word&sslpassword=p@ss:word"  # '@' in parameters
    assert "ss:word" not in redact(url) and "ss:word" not in redact(f"cannot open {url!r}", url)


# ---- text: every form of every secret --------------------------------------------------------------


def _messages(url: str, pw: str) -> list[str]:
    libpq = "'" + pw.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return [
        url,
        f"cannot open storage {url!r}: refused",
        repr({"url": url}),
        json.dumps({"storage": url}),
        json.dumps({"storage": url}, ensure_ascii=False),
        str(ValueError(url, pw)),
        f"password={pw!r}",
        f"host=h port=1 password={libpq} dbname=db",
        f"FATAL: no such password {pw} here",
        f"sslpassword {pw.encode()!r}",
        f"{url}\nsecond line {pw!r}",
        url.replace("postgresql://", "postgresql+psycopg://"),
    ]


@pytest.mark.parametrize("pw", HOSTILE, ids=IDS)
def test_redact_hides_every_form_of_the_secrets(pw):
    for url in [*user_part_urls(pw), query_url(pw)]:
        for msg in _messages(url, pw):
            out = redact(msg, url)
            assert_clean(out, pw)
            assert "127.0.0.1" in out or "127.0.0.1" not in msg  # the host is no secret
        assert_clean(redact(url), pw)  # a URL alone needs no second argument


def test_redact_keeps_what_is_not_secret():
    url = "postgresql://einstruct:Zz'W\"r@db-host:5432/runs?sslmode=require&application_name=a%20b"
    assert redact(url) == "postgresql://einstruct:***@db-host:5432/runs?sslmode=require&application_name=a%20b"
    assert redact("sqlite:////tmp/a b/study.db") == "sqlite:////tmp/a b/study.db"
    assert redact("loss 0.25 at 12:30", url) == "loss 0.25 at 12:30"


# ---- stderr of a failed connection -----------------------------------------------------------------


def _run(argv, capsys, monkeypatch, tmp_path, env_url=None):
    monkeypatch.chdir(tmp_path)
    if env_url is None:
        monkeypatch.delenv("EINSTRUCT_STORAGE", raising=False)
    else:
        monkeypatch.setenv("EINSTRUCT_STORAGE", env_url)
    try:
        code = search_run.main(["--no-progress", *argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("pw", HOSTILE, ids=IDS)
def test_a_refused_connection_shows_no_secret(pw, capsys, monkeypatch, tmp_path):
    port = closed_port()
    for i, url in enumerate([*user_part_urls(pw, port=port), query_url(pw, port=port)]):
        for env in (False, True):  # --storage, and EINSTRUCT_STORAGE
            argv = ["--out", str(tmp_path / f"s{i}")] + ([] if env else ["--storage", url])
            code, out, err = _run(argv, capsys, monkeypatch, tmp_path, url if env else None)
            assert code == 2 and len(err.strip().splitlines()) == 1, err
            assert "Connection refused" in err and "127.0.0.1" in err, err
            assert_clean(out + err, pw)


def test_a_refused_connection_in_a_real_process(tmp_path):
    pw = HOSTILE[0] + " " + HOSTILE[-1]
    port = closed_port()
    for url in (user_part_urls(pw, port=port)[1], query_url(pw, port=port)):
        env = {**os.environ, "PYTHONPATH": ROOT, "EINSTRUCT_STORAGE": url, "OMP_NUM_THREADS": "1"}
        p = subprocess.run(
            [sys.executable, "-m", "search.run", "--no-progress", "--out", str(tmp_path / "s")],
            capture_output=True,
            text=True,
            env=env,
            cwd=str(tmp_path),
            timeout=120,
            check=False,
        )
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert_clean(p.stdout + p.stderr, pw)


# ---- what a study writes ---------------------------------------------------------------------------


STUDY_PW = "Zzq7'Wr0\"ng9 o@n10n:g4rl1c/9%41\\\u00fcb3r\u20ac"  # connects as written (the '@' percent-encoded)


def _study(url, folder, name, capsys, caplog):
    from search import report
    from search.loop import run_search

    caplog.set_level(logging.INFO)
    result = run_search(name, storage=url, out=str(folder), reporter=search_run.TqdmReporter(enabled=True), **SETTINGS)
    path = report.write_report(str(folder), name)
    out, err = capsys.readouterr()
    assert result.spent > 0 and os.path.exists(path)
    meta = json.load(open(folder / "study.json"))
    assert "***" in meta["storage"]
    texts = [out, err, caplog.text]
    for root, _, names in os.walk(folder):
        for n in names:
            with open(os.path.join(root, n), "rb") as f:
                texts.append(f.read().decode("utf-8", "replace"))
    return meta, texts


def test_study_files_and_logs_show_no_secret(tmp_path, capsys, caplog, monkeypatch):
    """study.json, trials.csv, report.md, plots, progress and logs of a study on a password-protected database
    (stood in for by SQLite behind the URL)."""
    import search.loop
    from search import storage

    real_open = storage.open_storage
    db = "sqlite:///" + str(tmp_path / "stand-in.db")
    url = (
        f"postgresql://einstruct:{STUDY_PW.replace('%', '%25').replace('@', '%40')}@db-host:5432/einstruct"
        f"?sslpassword={quote_plus(STUDY_PW)}"
    )
    monkeypatch.setattr(search.loop, "check_storage", lambda u: u)
    monkeypatch.setattr(search.loop, "open_storage", lambda u, **kw: real_open(db if u == url else u, **kw))
    meta, texts = _study(url, tmp_path / "study", "secret", capsys, caplog)
    assert meta["storage"] == "postgresql://einstruct:***@db-host:5432/einstruct?sslpassword=***"
    for text in texts:
        assert_clean(text, STUDY_PW)


def test_study_on_a_real_postgres_shows_no_secret(tmp_path, capsys, caplog):
    """With EINSTRUCT_TEST_POSTGRES (a trust-auth server from .ci/postgres.sh: any password connects)."""
    import time

    url = postgres_test_url(STUDY_PW.replace("%", "%25").replace("@", "%40"))
    _, texts = _study(url, tmp_path / "study", f"secret-{os.getpid()}-{time.time_ns()}", capsys, caplog)
    for text in texts:
        assert_clean(text, STUDY_PW)
