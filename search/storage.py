"""Where a study lives: runs/<study>/, its Optuna storage URL, and URLs with passwords hidden."""

from __future__ import annotations

import os
import re

from .errors import SearchError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def check_study_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise SearchError(
            f"study name {name!r} is not allowed; use letters, digits, '_', '-' and '.' (no path characters), "
            "e.g. --study owt-small"
        )
    return name


def study_dir(name: str, out: str | None = None) -> str:
    return os.path.abspath(out) if out else os.path.abspath(os.path.join("runs", check_study_name(name)))


def default_url(folder: str) -> str:
    return "sqlite:///" + os.path.join(folder, "study.db")


def redact(url: str | None) -> str:
    """The URL with any password replaced by ***, for logs, files and messages."""
    if not url:
        return ""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def check_url(url) -> str:
    if not isinstance(url, str) or not re.match(r"^[a-z][a-z0-9+]*://", url):
        raise SearchError(f"storage {redact(str(url))!r} is not a URL; use e.g. sqlite:///runs/s/study.db or "
                          "postgresql://user:pass@host/db")
    return url


def driver_url(url: str) -> str:
    """``postgresql://`` (and ``postgres://``) go through psycopg 3, the driver the ``postgres`` extra installs."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def open_storage(url: str, heartbeat: int | None = None, grace: int | None = None, on_stale=None):
    """An Optuna RDB storage; SQLite gets WAL mode and a busy timeout so several processes can share it.

    ``heartbeat`` (seconds) turns on Optuna's heartbeats: a RUNNING trial whose heartbeat is older than
    ``grace`` seconds is failed by the next worker that looks, which then calls ``on_stale(study, trial)``.
    """
    import optuna
    from sqlalchemy.exc import ArgumentError, OperationalError

    check_url(url)
    url = driver_url(url)
    kwargs = {}
    if url.startswith("sqlite"):
        kwargs = {"connect_args": {"timeout": 60}}
    elif url.startswith("postgresql"):
        kwargs = {"pool_pre_ping": True}
    beat = {}
    if heartbeat:
        beat = {"heartbeat_interval": int(heartbeat), "grace_period": int(grace or 3 * heartbeat),
                "heartbeat_stale_trial_callback": on_stale}
    try:
        import warnings

        with warnings.catch_warnings():  # heartbeat_interval is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs, **beat)
        if url.startswith("sqlite"):
            from sqlalchemy import event

            @event.listens_for(storage.engine, "connect")
            def _pragmas(dbapi_conn, _record):  # every connection: WAL commits without an fsync each
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.close()

            storage.engine.dispose()  # connections made before the listener are closed
            with storage.engine.connect() as conn:  # several workers may share the file
                conn.exec_driver_sql("PRAGMA journal_mode=WAL")
        return storage
    except ImportError as e:
        raise SearchError(f"cannot open storage {redact(url)!r}: no database driver ({e.name or e}); for "
                          "PostgreSQL install it with pip install 'einstruct[postgres]'") from None
    except (ArgumentError, OperationalError, ValueError) as e:
        reason = str(e).splitlines()[0]
        raise SearchError(f"cannot open storage {redact(url)!r}: {redact(reason)}; check the URL and that "
                          "the database server is running") from None
