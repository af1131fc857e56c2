"""Many workers on one study: atomic budget, no lost or duplicate trials, crash recovery from checkpoints."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from search import outputs
from search.ledger import Ledger, Refused
from search.storage import open_storage
from tests.search.conftest import TINY_TASK as TINY

SETTINGS = dict(
    budget=2e8,
    levels=3,
    ratio=2.0,
    top_trials=3,
    min_steps=8,
    target_steps=30,
    task_settings=TINY,
    device="cpu",
    space="btt",
    heartbeat=2,
    confirm_share=0.0,  # exploration's workers (tests/search/test_confirm.py runs both phases)
)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def postgres_url() -> str:
    url = os.environ.get("EINSTRUCT_TEST_POSTGRES")
    if not url:
        pytest.skip(
            "EINSTRUCT_TEST_POSTGRES is not set: start a server with `bash .ci/postgres.sh` and export "
            "the URL it prints (.ci/run does)"
        )
    return url


def worker(args: dict, log) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.search._worker", json.dumps(args)],
        cwd=ROOT,
        env=ENV,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def check_study(out: str, budget: float, storage: str, name: str):
    rows = outputs.read_trials_csv(os.path.join(out, "trials.csv"))
    assert sum(int(r["train_flops"]) for r in rows) <= budget
    assert not [r for r in rows if r["state"] in ("RUNNING", "WAITING")]
    keys = [(r["level"], r["trial"]) for r in rows]
    assert len(keys) == len(set(keys)), "a trial appears twice"
    store = open_storage(storage)
    ledger = Ledger(store.engine, name, budget)
    assert ledger.spent() <= budget
    import optuna

    n = sum(
        len(
            optuna.load_study(study_name=f"{name}.L{i}", storage=store).get_trials(
                states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
            )
        )
        for i in range(SETTINGS["levels"])
    )
    assert n == len(rows), "every finished trial is in trials.csv"
    return rows


def test_reservations_never_exceed_the_budget(tmp_path):
    """The ledger alone: 200 greedy reservations of random sizes against a small budget."""
    import random

    store = open_storage("sqlite:///" + str(tmp_path / "l.db"))
    led = Ledger(store.engine, "s", 1000)
    rng = random.Random(0)
    granted = []
    for tid in range(200):
        amount = rng.randint(1, 120)
        if led.reserve(tid, tid % 3, amount, None, amount // 2) is None:
            granted.append(amount)
    assert sum(granted) <= 1000 and led.spent() == sum(granted)
    led.settle(0, 1)  # gives back all but 1 FLOP of trial 0's reservation
    assert led.spent() == sum(granted) - granted[0] + 1
    assert led.reserve(999, 0, 1, 3, 1).kind is Refused.LEVEL  # level 0 holds more than 3 already
    assert led.reserve(999, 0, 1, None, 1) is None  # a retry takes a lost trial's slot: no cap
    assert led.lose(1) == led.row(1).bound and led.row(1).status == "lost"
    assert led.claim("once") and not led.claim("once")


def test_three_workers_on_postgres_share_one_study(tmp_path):
    url = postgres_url()
    name = f"pg-{uuid.uuid4().hex[:8]}"
    out = str(tmp_path / "pg")
    args = {"study": name, "storage": url, "out": out, **SETTINGS, "budget": 1.2e8}
    with open(tmp_path / "log", "w") as log:
        procs = [worker({**args, "worker": i}, log) for i in range(3)]
        codes = [p.wait(timeout=170) for p in procs]
    assert codes == [0, 0, 0], (tmp_path / "log").read_text()[-3000:]
    rows = check_study(out, args["budget"], url, name)
    trained = [r for r in rows if int(r["train_flops"]) > 0]
    assert trained and all(r["state"] in ("COMPLETE", "FAIL") for r in trained)
    levels = json.load(open(os.path.join(out, "study.json")))["levels"]
    for lv in levels:  # no level got more trials than planned, however the workers raced
        assert sum(1 for r in trained if int(r["level"]) == lv["index"]) <= lv["trials"]


def _checkpoints(folder: str) -> list[str]:
    """Saved checkpoints (``L<level>-t<trial>.pt``); a save in progress is a ``.pt.tmp*`` file."""
    return sorted(f for f in os.listdir(folder) if f.endswith(".pt"))


def test_killed_worker_is_retried_from_its_checkpoint(tmp_path):
    out = str(tmp_path / "kill")
    storage = "sqlite:///" + os.path.join(out, "study.db")
    os.makedirs(out)
    name = "kill"
    args = {
        "study": name,
        "storage": storage,
        "out": out,
        **SETTINGS,
        "budget": 1.2e8,
        "checkpoint_steps": 10,
        "slow": 0.03,
    }
    ckdir = os.path.join(out, "checkpoints")
    with open(tmp_path / "log", "w") as log:
        a = worker(args, log)
        deadline = time.time() + 90
        while time.time() < deadline and a.poll() is None:
            if os.path.isdir(ckdir) and _checkpoints(ckdir):  # a finished save, not one being written
                break
            time.sleep(0.05)
        assert a.poll() is None, (tmp_path / "log").read_text()[-3000:]
        victim = _checkpoints(ckdir)[0]
        a.send_signal(signal.SIGKILL)
        a.wait()
        before = (
            {
                (r["level"], r["trial"]): r
                for r in outputs.read_trials_csv(os.path.join(out, "trials.csv"))
                if r["state"] == "COMPLETE"
            }
            if os.path.exists(os.path.join(out, "trials.csv"))
            else {}
        )
        b = worker({**args, "slow": 0}, log)
        assert b.wait(timeout=150) == 0, (tmp_path / "log").read_text()[-3000:]
    rows = check_study(out, args["budget"], storage, name)
    after = {(r["level"], r["trial"]): r for r in rows}
    for key, r in before.items():  # every finished trial kept, unchanged
        assert after[key]["state"] == "COMPLETE" and after[key]["loss"] == r["loss"]
    level, number = victim[1:-3].split("-t")
    lost = after[(level, number)]
    assert lost["state"] == "FAIL" and lost["reason"].startswith("lost") and int(lost["train_flops"]) > 0
    retry = [r for r in rows if r["reason"].startswith(f"retry of trial {number},") and r["level"] == level]
    assert len(retry) == 1 and retry[0]["state"] == "COMPLETE"
    resumed = int(retry[0]["reason"].split("resumed from step ")[1].split()[0])
    assert resumed > 0, retry[0]["reason"]
    # the retry paid only for the steps after its checkpoint; the two together fit the allowance's slack
    per_step = int(retry[0]["train_flops"]) // (int(retry[0]["steps"]) - resumed)
    assert int(retry[0]["train_flops"]) == (int(retry[0]["steps"]) - resumed) * per_step
    assert not os.listdir(ckdir), "checkpoints of finished trials are removed"
