"""Where a study lives: runs/<study>/, its Optuna storage URL, and URLs with passwords hidden."""

from __future__ import annotations

import os
import re

from . import secrets
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
    name = check_study_name(name)  # also with --out: the name is stored, and shown in reports
    return os.path.abspath(out) if out else os.path.abspath(os.path.join("runs", name))


def default_url(folder: str) -> str:
    return "sqlite:///" + os.path.join(folder, "study.db")


def redact(text, url: str | None = None) -> str:
    """``text`` (a URL, or a message quoting one) with every secret of ``url`` replaced by ***; see search.secrets."""
    return secrets.redact(text, url)


def password_of(url) -> str:
    """The password in a storage URL as written in it ('' if none); see search.secrets."""
    return secrets.password_of(url)


def check_url(url) -> str:
    if not isinstance(url, str) or not re.match(r"^[a-z][a-z0-9+]*://", url):
        raise SearchError(
            f"storage {redact(str(url), str(url))!r} is not a URL; use e.g. sqlite:///runs/s/study.db "
            "or postgresql://USER:PASSWORD@HOST/DB"
        )
    if "@" in password_of(url):
        raise SearchError(
            f"the password in storage {redact(url, url)!r} holds a raw '@' (or the URL has two); "
            "percent-encode it as %40"
        )
    return url


CONNECT_TIMEOUT = 10  # seconds: an unreachable database server fails fast instead of hanging


def check_storage(url: str) -> str:
    """Fail fast, before any training: the URL is well formed and its database answers (connects once).

    SQLite is only checked for its folder, so that nothing is created.
    """
    check_url(url)
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[1] if ":///" in url else ""
        folder = os.path.dirname(os.path.abspath(path)) if path and not path.startswith(":memory:") else ""
        if folder and not os.path.isdir(folder):
            raise SearchError(
                f"cannot open storage {redact(url)!r}: the folder {folder!r} does not exist; create it "
                "or leave out --storage to use runs/<study>/study.db"
            )
        return url
    import sqlalchemy
    from sqlalchemy.exc import SQLAlchemyError

    try:
        engine = sqlalchemy.create_engine(
            driver_url(url), connect_args=_connect_args(url), poolclass=sqlalchemy.pool.NullPool
        )
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    except ImportError as e:
        raise _driver_error(url, e) from None
    except (SQLAlchemyError, ValueError, TypeError, OSError) as e:
        raise _open_error(url, e) from None
    return url


def _connect_args(url: str) -> dict:
    return {"connect_timeout": CONNECT_TIMEOUT} if url.startswith(("postgres", "mysql")) else {}


def _driver_error(url: str, e: ImportError) -> SearchError:
    return SearchError(
        f"cannot open storage {redact(url)!r}: no database driver ({redact(str(e.name or e), url)}); "
        "for PostgreSQL install it with pip install 'einstruct[postgres]'"
    )


def _open_error(url: str, e: Exception) -> SearchError:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return SearchError(
        f"cannot open storage {redact(url)!r}: {redact(reason, url)}; check the URL and that the "
        "database server is running and reachable"
    )


def driver_url(url: str) -> str:
    """``postgresql://`` (and ``postgres://``) go through psycopg 3, the driver the ``postgres`` extra installs."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def create_storage_tables(url: str | None, folder: str) -> None:
    """Create Optuna's and the budget ledger's tables in a study's storage (the default one if url is None)."""
    from .ledger import create_tables
    from .optuna_api import engine

    create_tables(engine(open_storage(url or default_url(folder))))


def _rdb(optuna, url: str, kwargs: dict):
    """RDBStorage, retried when several workers create the schema of an empty database at the same moment."""
    import time

    from sqlalchemy.exc import DBAPIError

    for attempt in range(6):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except DBAPIError as e:
            raced = any(s in str(e) for s in ("already exists", "duplicate key", "UNIQUE constraint failed"))
            if not raced or attempt == 5:
                raise
            time.sleep(0.3 * (attempt + 1))


def open_storage(url: str):
    """An Optuna RDB storage; SQLite gets WAL mode and a busy timeout so several processes can share it.

    Optuna's own heartbeats stay off: workers beat in the ledger's worker table (search.recovery).
    """
    import optuna
    from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError

    from .optuna_api import engine

    check_url(url)
    url = driver_url(url)
    kwargs = {}
    if url.startswith("sqlite"):
        kwargs = {"connect_args": {"timeout": 60}}
    elif url.startswith("postgresql"):
        kwargs = {"pool_pre_ping": True, "connect_args": _connect_args(url)}
    try:
        storage = _rdb(optuna, url, kwargs)
        if url.startswith("sqlite"):
            from sqlalchemy import event

            @event.listens_for(engine(storage), "connect")
            def _pragmas(dbapi_conn, _record):  # every connection: WAL, commits without an fsync each
                dbapi_conn.isolation_level = None  # no implicit BEGIN from the driver: _begin below says when
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")  # several workers may share the file
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.close()

            @event.listens_for(engine(storage), "begin")
            def _begin(conn):  # the write lock from the first statement: a read-then-write (Optuna taking a
                conn.exec_driver_sql("BEGIN IMMEDIATE")  # WAITING trial) is atomic across processes

            engine(storage).dispose()  # connections made before the listeners are closed
        return storage
    except ImportError as e:
        raise _driver_error(url, e) from None
    except (ArgumentError, OperationalError, SQLAlchemyError, ValueError, TypeError) as e:
        raise _open_error(url, e) from None
