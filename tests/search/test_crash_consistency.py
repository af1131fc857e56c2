"""Crash consistency: a study killed at random points, resumed after every kill, then checked.

Kills land on the fault points of search.faults (``kill:*#k``: the k-th point a worker passes, k drawn
from a seeded generator), so each kill falls between two steps whose order matters: after a trial is
asked for, after a reservation, after a bound is raised, between a checkpoint's write and its rename,
after a result is recorded, after the ledger settles, after Optuna is told, inside recovery. Some rounds
run two workers at once, some run with heartbeats off. After every round each trial that had finished
must still be there, unchanged; at the end the invariants of tests/search/_crash.check_invariants hold,
no lost trial is still waiting for its retry, and no temporary file or checkpoint is left.
"""

import os
import random

from tests.search import _crash
from tests.search.test_faults import SMALL

SEED = int(os.environ.get("EINSTRUCT_CRASH_SEED", "15"))  # another seed: another sequence of kills
KILLS, MAX_ROUNDS, POINTS = 22, 45, 30


def test_a_study_killed_at_random_points_resumes_to_a_consistent_end(tmp_path):
    out = str(tmp_path / "crash")
    os.makedirs(out)
    url = "sqlite:///" + os.path.join(out, "study.db")
    args = {**SMALL, "study": "crash", "out": out, "storage": url}
    rng = random.Random(SEED)
    kills, finished, rounds = 0, {}, 0
    while kills < KILLS and rounds < MAX_ROUNDS:
        rounds += 1
        heartbeat = rng.choice([0, 1])
        workers = [
            _crash.start({**args, "heartbeat": heartbeat}, fault=f"kill:*#{rng.randint(1, POINTS)}")
            for _ in range(2 if rng.random() < 0.3 else 1)
        ]
        for w in workers:
            w.join(120)
            assert not w.is_alive(), f"round {rounds}: a worker hung"
            assert w.exitcode in (0, -9), f"round {rounds}: a worker failed with exit code {w.exitcode}"
            kills += w.exitcode == -9
        now = _crash.trials(url, "crash", SMALL["levels"])
        for key, was in finished.items():
            assert now.get(key) == was, f"round {rounds}: finished trial {key} was {was}, is now {now.get(key)}"
        finished = {k: v for k, v in now.items() if v[1] in ("COMPLETE", "PRUNED", "FAIL")}
    assert kills >= 20, f"only {kills} kills in {rounds} rounds"
    assert _crash.run(args, timeout=120) == 0
    got = _crash.check_invariants(out, url, "crash")
    for key, was in finished.items():
        assert got["trials"][key] == was
    assert not [v for v in got["ledger"].values() if v[2] == "lost"], "a lost trial still waits for its retry"
    assert sum(1 for r in got["rows"] if r["state"] == "COMPLETE") >= 10  # and it got somewhere
    assert _crash.leftovers(out) == []
