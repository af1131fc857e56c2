"""Named fault points, for crash tests: ``EINSTRUCT_FAULT`` kills or pauses this process at a chosen point.

The search calls ``point(name)`` between the steps whose order matters for crash consistency (after a
reservation, after a trial's result is recorded, after the ledger settles it, inside recovery, between a
temporary file's write and its rename, ...). Without the environment variable a point costs one lookup.

    EINSTRUCT_FAULT="kill:after_settle"        SIGKILL at the first pass through after_settle
    EINSTRUCT_FAULT="kill:after_settle#3"      at its third pass
    EINSTRUCT_FAULT="stop:after_train"         SIGSTOP: the process pauses until someone sends SIGCONT
    EINSTRUCT_FAULT="kill:*#17"                at the 17th point passed, whatever its name
    EINSTRUCT_FAULT="kill:after_ask#2,stop:*#40"   several rules, comma-separated

``EINSTRUCT_FAULT_LOG=path`` appends the name of every point passed to ``path`` (one a line), so that a
test can count a run's points. Counts are per process.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}
_parsed: tuple[str, list] = ("", [])


def _rules(text: str) -> list[tuple[str, str, int]]:
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        action, _, where = part.partition(":")
        name, _, nth = where.partition("#")
        if action not in ("kill", "stop") or not name:
            raise ValueError(f"EINSTRUCT_FAULT rule {part!r}: write kill:NAME[#N] or stop:NAME[#N] (NAME may be *)")
        out.append((action, name, int(nth or 1)))
    return out


def point(name: str) -> None:
    """Pass the fault point ``name``: act on it if a rule of EINSTRUCT_FAULT says so."""
    global _parsed
    text = os.environ.get("EINSTRUCT_FAULT", "")
    log = os.environ.get("EINSTRUCT_FAULT_LOG")
    if not text and not log:
        return
    if log:
        with open(log, "a") as f:
            f.write(name + "\n")
    if not text:
        return
    if _parsed[0] != text:
        _parsed = (text, _rules(text))
    _counts[name] = _counts.get(name, 0) + 1
    _counts["*"] = _counts.get("*", 0) + 1
    for action, where, nth in _parsed[1]:
        if where in (name, "*") and _counts[where] == nth:
            _act(action)


def _act(action: str) -> None:
    if action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    kill = getattr(signal, "SIGKILL", None)
    if kill is not None:
        os.kill(os.getpid(), kill)
    os._exit(137)  # where there is no SIGKILL: as abrupt as Python allows
