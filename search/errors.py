"""Errors of the search engine: bad settings or data, each with a message that says how to fix it; and telling
a failure of the machine (a full disk, a damaged database file, memory run out) from a bug."""

from __future__ import annotations

import errno
import os

from einstruct.errors import EinstructError, MemoryLimitError


class SearchError(EinstructError, ValueError):
    """A task, data file, budget or setting is unusable; the message names the problem and the fix."""


class DataError(SearchError):
    """A data path is missing, empty, too short for one batch, or in the wrong format."""


class TrainingMemoryError(SearchError, MemoryLimitError):
    """A task's model at some width needs more memory to train than its device (or this process) has."""


# What drivers say, in their own words, when the disk under a database is full or a database file is damaged.
_FULL = ("database or disk is full", "no space left on device", "disk quota exceeded", "could not extend file")
_DAMAGED = (
    "database disk image is malformed",
    "file is not a database",
    "malformed database schema",
    "database corruption",
)


def causes(e: BaseException):
    """``e`` and every exception behind it (``raise ... from``, the exception being handled, a DB-API error
    that SQLAlchemy wraps as ``.orig``), each once."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        todo += [x.__cause__, x.__context__, getattr(x, "orig", None)]


def _said(e: BaseException, words) -> str:
    """The first line of the shortest message behind ``e`` that holds one of ``words`` (the driver's own words,
    not a wrapper's that quotes them), or ''."""
    said = [(str(x).strip().splitlines() or [""])[0] for x in causes(e)]
    said = [t for t in said if any(w in t.lower() for w in words)]
    return min(said, key=len) if said else ""


def disk_full(e: BaseException) -> str:
    """What says that a disk is full behind ``e`` (ENOSPC, EDQUOT, SQLite's 'database or disk is full',
    PostgreSQL's SQLSTATE 53100), or '' when nothing does."""
    for x in causes(e):
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
            return x.strerror or os.strerror(x.errno)
        if getattr(x, "sqlstate", None) == "53100" or getattr(x, "pgcode", None) == "53100":
            return (str(x).strip().splitlines() or ["disk full"])[0]
    return _said(e, _FULL)


def damaged_database(e: BaseException) -> str:
    """What says that a database file is damaged behind ``e`` ('database disk image is malformed', ...), or ''."""
    return _said(e, _DAMAGED)


_NO_MEMORY = ("can't allocate memory", "cannot allocate memory", "out of memory")


def out_of_memory(e: BaseException) -> str:
    """What says that memory ran out behind ``e`` (MemoryError, torch's OutOfMemoryError, an allocator's
    'can't allocate memory'), or ''."""
    for x in causes(e):
        if isinstance(x, MemoryError) or type(x).__name__ == "OutOfMemoryError":
            return (str(x).strip().splitlines() or [type(x).__name__])[0] or type(x).__name__
    return _said(e, _NO_MEMORY)


def machine_problem(e: BaseException, folder: str, url: str | None = None) -> str:
    """One line for a failure that is the machine's, not a bug: a full disk (naming the folder, or the database
    server, that ran out of space) or a damaged database file; '' for anything else.

    ``folder`` is the study's folder; ``url`` its storage URL when it is not the default SQLite file there.
    """
    from .storage import redact

    where, db = folder, os.path.join(folder, "study.db")
    if url and url.startswith("sqlite") and ":///" in url:
        db = url.split(":///", 1)[1].split("?", 1)[0]
        where = os.path.dirname(os.path.abspath(db))
    server = bool(url) and not url.startswith("sqlite")
    full = disk_full(e)
    if full:
        if server:
            return (
                f"the database server's disk is full ({redact(full, url)}); free space on the server of "
                f"{redact(url, url)}, then run the same command to resume"
            )
        return (
            f"the disk holding {where} is full ({full}); free some space there (or give --out a folder on "
            "another disk), then run the same command to resume: finished trials are stored"
        )
    bad = damaged_database(e)
    if bad:
        if server:
            return (
                f"the study's database at {redact(url, url)} is damaged ({redact(bad, url)}); restore it from a backup"
            )
        return (
            f"the study's database {db} is damaged ({bad}); restore it from a backup, or start afresh with a new "
            f"--study or --out (trials.csv in {where} lists the trials finished so far)"
        )
    oom = out_of_memory(e)
    if oom:
        return (
            f"out of memory ({oom[:200]}); the task's models do not fit on this device at their widths: give "
            "smaller widths or batch in the task's settings, or use a device with more memory"
        )
    return ""
