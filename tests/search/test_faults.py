"""Faults one at a time: a worker killed or paused at a chosen step, then the study resumed, then checked.

Each test reproduces one break of issue 15 with a kill or a pause at the step that exposed it (through
function patches, see tests/search/_crash.py), and then checks what must hold: the budget, the trials
per level, trials.csv against the ledger, nothing left running, no files left behind.
"""

import os
import signal

import pytest

from search.errors import SearchError
from search.ledger import Ledger, Refused
from search.loop import run_search
from search.storage import open_storage
from tests.search import _crash
from tests.search.conftest import TINY_TASK as TINY

SMALL = dict(
    budget=1.2e8,
    levels=3,
    ratio=2.0,
    top_trials=3,
    min_steps=8,
    target_steps=30,
    task_settings=TINY,
    device="cpu",
    space="btt",
    heartbeat=1,
    checkpoint_steps=10,
    checkpoints=4,
    confirm_share=0.0,  # exploration's crash points (tests/search/test_confirm.py kills one in confirmation)
)


def study(tmp_path, name="s", **more):
    out = str(tmp_path / name)
    os.makedirs(out, exist_ok=True)
    url = "sqlite:///" + os.path.join(out, "study.db")
    return {**SMALL, "study": name, "out": out, "storage": url, **more}, out, url, name


def retries_of(rows, level: int, number: int) -> list[dict]:
    return [r for r in rows if int(r["level"]) == level and r["reason"].startswith(f"retry of trial {number},")]


# ---- 1. a paused worker ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pause",
    [
        ("search.train:run", "after", 1, "stop"),  # trained, not yet settled
        ("search.ledger:Ledger.raise_bound", "after", 1, "stop"),
    ],
)  # before a checkpoint
def test_a_paused_worker_wakes_to_find_its_trial_retried_and_charges_nothing_more(tmp_path, pause):
    """Worker A pauses past its heartbeat grace; B fails A's trial, retries it (from A's checkpoint if A wrote one,
    else from step 0, reserving the whole run) and ends the study; then A wakes. A must not settle (its
    reservation was revoked), not remove a checkpoint the retry uses, not write one for a trial that is over;
    the ledger keeps what B charged."""
    args, out, url, name = study(tmp_path)
    a = _crash.start(args, patches=[pause])
    try:
        assert _crash.wait_stopped(a), "worker A did not reach its pause"
        assert _crash.run(args, timeout=120) == 0
    finally:
        os.kill(a.pid, signal.SIGCONT)
    a.join(120)
    assert a.exitcode == 0
    got = _crash.check_invariants(out, url, name)
    paused = got["by_key"][(0, 0)]  # A's first trial
    assert paused["state"] == "FAIL" and paused["reason"].startswith("lost"), paused
    (retry,) = retries_of(got["rows"], 0, 0)
    resumed = int(retry["reason"].split("resumed from step ")[1].split()[0])
    assert retry["state"] == "COMPLETE" and (resumed > 0) == (pause[0] == "search.train:run"), retry
    per_step = int(retry["train_flops"]) // (int(retry["steps"]) - resumed)
    assert int(retry["train_flops"]) == (int(retry["steps"]) - resumed) * per_step  # it paid for the rest only
    assert _crash.leftovers(out) == []


# ---- 2. the study's settings live in its database ------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_settings_come_from_the_study_database(tmp_path, backend):
    """A second process with another --budget, on another machine (another folder), is refused; one that gives
    no budget takes the study's, also when study.json is gone."""
    if backend == "postgres":
        import uuid

        from tests.search.test_workers import postgres_url

        url, name = postgres_url(), f"set-{uuid.uuid4().hex[:8]}"
    else:
        url, name = "sqlite:///" + str(tmp_path / "db.sqlite"), "set"
    first, other = str(tmp_path / "first"), str(tmp_path / "other")
    args = {**SMALL, "study": name, "out": first, "storage": url, "budget": 1.1e8}
    assert _crash.run(args, patches=[("search.loop:_evaluate", "after", 2, "kill")]) == -9
    with pytest.raises(SearchError, match="already exists with budget=110000000"):
        run_search(name, storage=url, out=other, dry_run=True, estimate=False, **{**SMALL, "budget": 1e10})
    again = run_search(name, storage=url, out=other, dry_run=True, estimate=False, device="cpu")
    assert again.settings["budget"] == 1.1e8 and again.settings["task_settings"] == TINY
    os.remove(os.path.join(first, "study.json"))
    again = run_search(name, storage=url, out=first, dry_run=True, estimate=False, device="cpu")
    assert again.settings["budget"] == 1.1e8 and again.settings["space"] == "btt"
    # two workers that create the study at the same moment: the second's other budget is refused as well
    led = Ledger(open_storage(url).engine, name)
    with pytest.raises(SearchError, match="already exists with budget"):
        Ledger(led.engine, name, 1e10)


# ---- 3. heartbeats off -----------------------------------------------------------------------------------


@pytest.mark.parametrize("resume_heartbeat", [0, 1])
def test_with_heartbeats_off_a_resume_recovers_the_killed_trial(tmp_path, resume_heartbeat):
    args, out, url, name = study(tmp_path, heartbeat=0)
    assert _crash.run(args, patches=[("search.train:save_checkpoint", "after", 1, "kill")]) == -9
    code = _crash.run({**args, "heartbeat": resume_heartbeat}, timeout=60)
    assert code == 0, "the resume hung on the killed trial" if code is None else code
    got = _crash.check_invariants(out, url, name)
    assert got["by_key"][(0, 0)]["reason"].startswith("lost")
    (retry,) = retries_of(got["rows"], 0, 0)
    assert retry["state"] == "COMPLETE" and "resumed from step 0 " not in retry["reason"]
    assert _crash.leftovers(out) == []


def test_heartbeat_off_is_refused_on_a_shared_storage(tmp_path, monkeypatch):
    import search.loop

    stand_in = "sqlite:///" + str(tmp_path / "stand-in.db")
    monkeypatch.setattr(search.loop, "check_storage", lambda u: u)
    monkeypatch.setattr(search.loop, "open_storage", lambda u, **kw: open_storage(stand_in, **kw))
    with pytest.raises(SearchError, match="--heartbeat 0"):
        run_search(
            "hb",
            storage="postgresql://u:p@db-host/x",
            out=str(tmp_path / "hb"),
            estimate=False,
            **{**SMALL, "heartbeat": 0},
        )


# ---- 4. an emptied or lost study.db ------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["empty", "missing"])
def test_a_lost_study_db_is_refused_and_trials_csv_kept(tmp_path, damage, capsys):
    from search import run as search_run

    args, out, _, name = study(tmp_path)
    del args["storage"]  # the default: runs/<study>/study.db, i.e. out/study.db
    assert _crash.run(args, patches=[("search.loop:_evaluate", "after", 3, "kill")]) == -9
    csv = os.path.join(out, "trials.csv")
    before = open(csv, "rb").read()
    assert before.count(b"\n") > 1
    db = os.path.join(out, "study.db")
    for suffix in ("-wal", "-shm"):
        if os.path.exists(db + suffix):
            os.remove(db + suffix)
    if damage == "empty":
        open(db, "w").close()
    else:
        os.remove(db)
    with pytest.raises(SearchError, match=r"restore study\.db from a backup"):
        run_search(name, out=out, estimate=False, **{k: v for k, v in args.items() if k not in ("study", "out")})
    assert search_run.main(["--study", name, "--out", out, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "restore study.db" in err[0], err
    assert open(csv, "rb").read() == before
    assert (os.path.getsize(db) == 0) if damage == "empty" else not os.path.exists(db)


# ---- 5. references queued halfway ---------------------------------------------------------------------------


def test_references_queued_halfway_are_finished_by_the_resume(tmp_path):
    from search.space import make_space, references

    args, out, url, name = study(tmp_path, space="theta")  # 3 references at every level
    assert _crash.run(args, patches=[("optuna.study.study:Study.enqueue_trial", "after", 2, "kill")]) == -9
    assert _crash.run(args) == 0
    got = _crash.check_invariants(out, url, name)
    refs = {c.label for c in references(make_space("theta", TINY["widths"]))}
    for level in range(3):
        assert refs <= {r["structure"] for r in got["rows"] if int(r["level"]) == level}, level


# ---- 6. kills between steps that must go together -------------------------------------------------------------


def test_a_kill_between_settle_and_tell_keeps_the_finished_trial(tmp_path):
    args, out, url, name = study(tmp_path)
    assert _crash.run(args, patches=[("search.ledger:Ledger.settle", "after", 1, "kill")]) == -9
    assert _crash.run(args) == 0
    got = _crash.check_invariants(out, url, name)
    kept = got["by_key"][(0, 0)]
    assert kept["state"] == "COMPLETE" and float(kept["loss"]) > 0, kept
    assert not retries_of(got["rows"], 0, 0), "the finished trial was trained again"
    assert int(kept["train_flops"]) == int(kept["steps"]) * (int(kept["train_flops"]) // int(kept["steps"]))


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_kill_inside_recovery_is_recovered_by_the_next_run(tmp_path, when):
    """Killed while charging a dead worker's trial (before: its reservation would stay running forever; after:
    it would stay 'retried' with no retry)."""
    args, out, url, name = study(tmp_path)
    assert _crash.run(args, patches=[("search.train:save_checkpoint", "after", 1, "kill")]) == -9
    assert _crash.run(args, patches=[("search.ledger:Ledger.lose", when, 1, "kill")]) == -9
    assert _crash.run(args) == 0
    got = _crash.check_invariants(out, url, name)
    lost = got["by_key"][(0, 0)]
    assert lost["reason"].startswith("lost") and lost["structure"] and lost["width"], lost
    (retry,) = retries_of(got["rows"], 0, 0)
    assert retry["state"] == "COMPLETE" and retry["structure"] == lost["structure"]


def test_a_lost_trials_retry_keeps_the_budget_and_slot_it_was_holding(tmp_path):
    """On PostgreSQL with 3 workers a retry was refused for budget: another worker had taken what the lost
    trial freed. The rest of a lost trial's reservation is held for its retry."""
    led = Ledger(open_storage("sqlite:///" + str(tmp_path / "l.db")).engine, "s", 100)
    assert led.reserve(1, 0, 100, 2, 20, number=0, owner="w1") is None
    assert led.lose(1) == 20  # charged its bound; 80 held for the retry
    assert led.spent() == 100 and led.used_slots(0) == 1
    assert led.reserve(2, 0, 50, 2, 10, number=1, owner="w2").kind is Refused.BUDGET  # another worker's new trial
    assert led.reserve(3, 0, 80, None, 10, number=2, owner="w2", retry_of=1) is None
    assert led.row(1).status == "retried" and led.used_slots(0) == 1  # the retry took the slot over
    assert led.reserve(4, 0, 1, None, 1, number=3, retry_of=1).kind is Refused.RETRIED  # a second retry: refused
    assert led.settle(3, 70) == "done" and led.spent() == 90
    assert led.settle(1, 100) == "retried"  # a lost trial's late worker charges nothing more


# ---- 10. smaller ------------------------------------------------------------------------------------------


def test_two_separately_started_workers_do_not_sample_or_train_the_same_points(tmp_path):
    args, out, url, name = study(tmp_path, sampler="random")
    workers = [_crash.start(args), _crash.start(args)]
    for w in workers:
        w.join(150)
        assert w.exitcode == 0
    got = _crash.check_invariants(out, url, name)
    trained = [
        (r["level"], r["structure"], r["width"])
        for r in got["rows"]
        if int(r["train_flops"]) > 0 and not r["reason"].startswith(("lost", "retry of"))
    ]
    assert len(trained) == len(set(trained)), "a point was trained twice at one level"


def test_one_reservation_per_point_and_level(tmp_path):
    led = Ledger(open_storage("sqlite:///" + str(tmp_path / "l.db")).engine, "s", 1000)
    assert led.reserve(1, 0, 10, 5, 5, number=0, point="p") is None
    same = led.reserve(2, 0, 10, 5, 5, number=1, point="p")  # at the same moment: not twice
    assert same.kind is Refused.SAME and same.trial == 0
    assert led.reserve(3, 1, 10, 5, 5, number=0, point="p") is None  # another level is another point
    led.lose(1)
    assert led.reserve(4, 0, 10, None, 5, number=2, point="p", retry_of=1) is None  # its own retry is not a twin


@pytest.mark.parametrize(
    "kill",
    [
        ("torch:save", "after", 2, "kill"),  # a checkpoint written, not renamed
        ("os:replace", "before", 2, "kill"),
    ],
)  # trials.csv or study.json likewise
def test_temporary_files_of_killed_workers_are_removed(tmp_path, kill):
    args, out, url, name = study(tmp_path)
    assert _crash.run(args, patches=[kill]) == -9
    assert [f for f in _crash.leftovers(out) if ".tmp" in f], "the kill left no temporary file to test with"
    assert _crash.run(args) == 0
    _crash.check_invariants(out, url, name)
    assert _crash.leftovers(out) == []


def test_a_kill_before_reserving_charges_nothing_in_trials_csv_or_the_ledger(tmp_path):
    args, out, url, name = study(tmp_path)
    assert _crash.run(args, patches=[("search.ledger:Ledger.reserve", "before", 1, "kill")]) == -9
    assert _crash.run(args) == 0
    got = _crash.check_invariants(out, url, name)
    first = got["by_key"][(0, 0)]
    assert first["state"] == "FAIL" and int(first["train_flops"]) == 0, first
