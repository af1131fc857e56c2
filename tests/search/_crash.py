"""Search workers to kill and pause at chosen points, started cheaply, and what a study's storage holds.

Workers are processes forked from a server that has imported the search once (multiprocessing's
forkserver), so a start costs milliseconds, not the seconds of importing torch again. A worker runs
``run_search`` with

- ``fault``: rules for search.faults (``EINSTRUCT_FAULT``, e.g. ``kill:after_settle`` or ``kill:*#17``), and
- ``patches``: ``(target, when, nth, action)`` tuples that wrap a function, e.g.
  ``("search.ledger:Ledger.settle", "after", 1, "kill")`` kills the worker right after its first settle
  returns. Patches need no fault points, so the same test runs against code that has none.

The storage is read with plain SQL (the ledger's and Optuna's tables), not through the search's own
classes, so that the checks do not depend on the code under test.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import signal
import time

_CTX = None


def context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        # torch._dynamo: building a model on the meta device imports it (1 s a worker otherwise)
        _CTX.set_forkserver_preload(["search.loop", "torch._dynamo", "tests.search._crash"])
    return _CTX


def _act(action: str) -> None:
    os.kill(os.getpid(), signal.SIGSTOP if action == "stop" else signal.SIGKILL)


def _patch(target: str, when: str, nth: int, action: str) -> None:
    module, attr = target.split(":")
    obj = importlib.import_module(module)
    *path, name = attr.split(".")
    for p in path:
        obj = getattr(obj, p)
    real = getattr(obj, name)
    calls = [0]

    def wrapper(*a, **kw):
        calls[0] += 1
        hit = calls[0] == nth
        if hit and when == "before":
            _act(action)
        out = real(*a, **kw)
        if hit and when == "after":
            _act(action)
        return out

    setattr(obj, name, wrapper)


def _child(args: dict, env: dict, patches) -> None:
    import torch

    torch.set_num_threads(1)
    os.environ.update(env)
    for p in patches:
        _patch(*p)
    from search.loop import run_search

    args = dict(args)
    run_search(args.pop("study"), estimate=False, **args)


def start(args: dict, fault: str = "", patches=(), env: dict | None = None):
    p = context().Process(target=_child, args=(args, {"EINSTRUCT_FAULT": fault, **(env or {})}, list(patches)))
    p.start()
    return p


def run(args: dict, fault: str = "", patches=(), timeout: float = 120, env: dict | None = None) -> int:
    """Run a worker to its end (or its fault); its exit code (-9 when killed). A worker still running after
    ``timeout`` seconds is killed and reported as None (a hang)."""
    p = start(args, fault, patches, env)
    p.join(timeout)
    if p.is_alive():
        p.kill()
        p.join()
        return None
    return p.exitcode


def state_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def wait_stopped(p, timeout: float = 60) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if state_of(p.pid) == "T":
            return True
        if not p.is_alive():
            return False
        time.sleep(0.05)
    return False


# ---- what the storage holds -------------------------------------------------------------------------


def engine(url: str):
    import sqlalchemy as sa

    return sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1), poolclass=sa.pool.NullPool)


def ledger_rows(url: str, name: str) -> dict:
    """Trial id -> (level, amount, status) of every reservation of the search."""
    import sqlalchemy as sa

    e = engine(url)
    try:
        with e.connect() as c:
            rows = c.execute(
                sa.text("SELECT trial_id, level, amount, status FROM einstruct_reservation WHERE search = :s"),
                {"s": name},
            ).all()
    finally:
        e.dispose()
    return {r.trial_id: (r.level, int(r.amount), r.status) for r in rows}


def trials(url: str, name: str, levels: int) -> dict:
    """(level, number) -> (trial id, state, value) of every trial of the search's level studies."""
    import sqlalchemy as sa

    e = engine(url)
    out = {}
    try:
        with e.connect() as c:
            for i in range(levels):
                for r in c.execute(
                    sa.text(
                        "SELECT t.trial_id, t.number, t.state, v.value FROM trials t JOIN studies s "
                        "ON s.study_id = t.study_id LEFT JOIN trial_values v ON v.trial_id = t.trial_id "
                        "WHERE s.study_name = :n"
                    ),
                    {"n": f"{name}.L{i}"},
                ):
                    out[(i, r.number)] = (r.trial_id, str(r.state).split(".")[-1], r.value)
    finally:
        e.dispose()
    return out


def leftovers(folder: str) -> list[str]:
    """Temporary files and checkpoints anywhere in the study folder."""
    out = []
    for root, _, names in os.walk(folder):
        for n in names:
            if ".tmp" in n or n.endswith(".pt"):
                out.append(os.path.relpath(os.path.join(root, n), folder))
    return sorted(out)


def check_invariants(out: str, url: str, name: str) -> dict:
    """What must hold once a study has ended, whatever was killed on the way: nothing RUNNING or WAITING, no
    reservation running, the ledger within the budget, trials.csv equal to the ledger trial by trial, every
    finished trial in trials.csv, and no level with more trials than planned (a lost trial and its retries
    count once). Returns the pieces for further checks."""
    import json

    from search import outputs

    meta = json.load(open(os.path.join(out, "study.json")))
    budget, planned = meta["settings"]["budget"], [lv["trials"] for lv in meta["levels"]]
    rows = outputs.read_trials_csv(os.path.join(out, "trials.csv"))
    led = ledger_rows(url, name)
    tr = trials(url, name, len(planned))
    assert not {k: v for k, v in tr.items() if v[1] in ("RUNNING", "WAITING")}, "a trial is left running or queued"
    assert not [t for t, v in led.items() if v[2] == "running"], "a reservation is left running"
    total = sum(a for _, a, _ in led.values())
    assert total <= budget, f"the ledger charges {total:.4g} of a {budget:.4g} budget"
    by_key = {(int(r["level"]), int(r["trial"])): r for r in rows}
    assert len(by_key) == len(rows) == len(tr), "trials.csv has every finished trial once"
    for key, r in by_key.items():
        tid = tr[key][0]
        assert int(r["train_flops"]) == led.get(tid, (0, 0, ""))[1], f"trials.csv and the ledger differ on {key}: {r}"
    assert sum(int(r["train_flops"]) for r in rows) == total
    for i, n in enumerate(planned):
        held = sum(1 for lv, _, s in led.values() if lv == i and s not in ("lost", "retried"))
        assert held <= n, f"level {i} trained {held} trials for {n} planned"
    return {"rows": rows, "ledger": led, "trials": tr, "by_key": by_key, "budget": budget, "planned": planned}
