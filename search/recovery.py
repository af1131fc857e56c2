"""Crash recovery: which workers are alive, and finishing, failing and retrying the trials of dead ones.

Every ``run_search`` call is a *worker*: it enters itself in the ledger's worker table (machine identity,
process id and start time, heartbeat interval) and, with heartbeats on, a thread counts its beats there
every ``heartbeat`` seconds. A worker is dead when

- it ended (its run_search returned or raised), or
- it ran on this machine (same boot and process namespace) and its process is gone (no such pid, a
  zombie, or the pid reused by a process that started at another time), or
- it beats (heartbeat > 0) and its count has not moved for 3 of its beats, as the looking worker observes
  it on its own clock (no clocks are compared across machines). A paused process (SIGSTOP, a VM pause, a
  long GC) is taken for dead this way too; when it wakes it finds its reservation gone and discards its work.

With heartbeats off only the first two apply: a paused or hung process is never taken for dead, and a
worker on another machine cannot be judged at all, so heartbeat 0 is for the embedded storage only.

A trial records its owner (the worker's token) right after it is created, and its reservation records
it too. ``Recoverer`` (called whenever a worker looks for work) finishes the RUNNING trials of dead owners,
each under a claim so that one worker does it. Every step is idempotent and the trial is failed last, so
a kill anywhere inside recovery leaves a RUNNING trial that the next look recovers again:

- its result recorded (it finished training, or was rejected, then died before telling Optuna): settle, then
  tell it as it is;
- a reservation: charge its bound (``Ledger.lose``, which holds the rest and the slot for the retry),
  enqueue one retry with the same parameters (up to ``max_retry`` in a chain), then FAIL it;
- no reservation (it died before reserving): FAIL at zero cost; if it had been queued (a reference, a
  retry, an exploration point), queue its parameters again.

A trial that was created but not yet owned (the instant between Optuna's ask and the owner record) belongs
to a worker that is *asking*; such a trial counts as abandoned only while no live worker is asking.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import socket
import threading
import time
import uuid

from . import faults
from . import optuna_api as oa
from .outcomes import Status

log = logging.getLogger(__name__)

OWNER = "einstruct_owner"  # the trial's system attribute naming its worker's token
MAX_RETRY = 3
CHAIN_ATTRS = ("reference", "exploration", "retry_of", "retry_of_id", "retry_history")  # what a requeue keeps


# ---- this process, and others on this machine -------------------------------------------------------


def host_id() -> str:
    """Where a process id means the same process: this boot of this machine and this pid namespace (Linux),
    else the host name."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return "host:" + socket.gethostname()


HOST = host_id()
HOST_TAG = hashlib.sha1(HOST.encode()).hexdigest()[:8]  # marks this machine's temporary files


def process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot ('' where unknown): tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def alive(pid: int, started: str = "") -> bool:
    """Whether process ``pid`` (started at ``started``, if known) runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OSError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        if fields[0] in ("Z", "X"):  # killed, not yet reaped by its parent
            return False
        return not started or fields[19] == started
    except (OSError, IndexError):
        return True


def temp_suffix() -> str:
    """The suffix of this process's temporary files: ``.tmp<pid>.<machine tag>``."""
    return f".tmp{os.getpid()}.{HOST_TAG}"


_TEMP = re.compile(r"\.tmp(\d+)(?:\.([0-9a-f]{8}))?$")


def stale_temporary(name: str) -> bool:
    """A temporary file of a process of this machine that is gone (a kill between a write and its rename)."""
    m = _TEMP.search(name)
    if m is None or (m.group(2) is not None and m.group(2) != HOST_TAG):
        return False
    return not alive(int(m.group(1)))


# ---- workers ----------------------------------------------------------------------------------------


class Worker:
    """This run_search call as the ledger knows it; ``with``-free: call ``end()`` when done."""

    def __init__(self, ledger, heartbeat: int | None):
        self.ledger, self.heartbeat = ledger, int(heartbeat or 0)
        self.token = uuid.uuid4().hex
        self.ordinal = ledger.register(
            self.token,
            busy=_maybe_alive,
            host=HOST,
            hostname=socket.gethostname()[:200],
            pid=os.getpid(),
            started=process_start(os.getpid()),
            heartbeat=self.heartbeat,
        )
        self._stop = threading.Event()
        self._thread = None
        if self.heartbeat:
            self._thread = threading.Thread(target=self._beat, daemon=True, name=f"heartbeat-{self.token[:8]}")
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                self.ledger.beat(self.token)
            except Exception:  # a busy database must not kill the worker; the next beat tries again
                log.warning("heartbeat of worker %s not recorded", self.token[:8], exc_info=True)

    @contextlib.contextmanager
    def asking(self):
        """Around creating a trial and recording its owner: its trial is not taken for abandoned meanwhile."""
        self.ledger.set_worker(self.token, asking=1)
        try:
            yield
        finally:
            self.ledger.set_worker(self.token, asking=0)

    def end(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.ledger.set_worker(self.token, ended=1, asking=0)
        except Exception:  # the database went away: its trials are judged by pid or heartbeat instead
            log.warning("worker %s could not record its end", self.token[:8], exc_info=True)


def _maybe_alive(row) -> bool:
    """For ordinals: a worker of another machine counts as alive until it ends."""
    return row.host != HOST or alive(row.pid, row.started)


class Liveness:
    """Judges workers from the worker table; remembers beat counts to see them stop."""

    def __init__(self, ledger, me: Worker):
        self.ledger, self.me = ledger, me
        self.rows: dict = {}
        self._seen: dict[str, tuple[int, float]] = {}

    def refresh(self) -> None:
        self.rows = self.ledger.workers()

    def dead(self, token: str | None) -> bool:
        if token is None:
            return True  # a claim or trial from before owners were recorded
        if token == self.me.token:
            return False
        r = self.rows.get(token)
        if r is None:
            self.refresh()
            r = self.rows.get(token)
            if r is None:
                return True
        if r.ended or (r.host == HOST and not alive(r.pid, r.started)):
            return True
        if r.heartbeat > 0:
            now = time.monotonic()
            seen = self._seen.get(token)
            if seen is None or seen[0] != r.beats:
                self._seen[token] = (r.beats, now)
                return False
            return now - seen[1] >= 3 * r.heartbeat
        return False

    def asking(self) -> bool:
        """Some live worker other than this one is creating a trial right now."""
        return any(r.asking and not self.dead(t) for t, r in self.rows.items() if t != self.me.token)


# ---- trials ------------------------------------------------------------------------------------------


class TrialLost(RuntimeError):
    """Another worker declared this trial's worker dead (its heartbeat stopped) and charged it: stop."""


def retry_of(trial) -> int | None:
    """The number of the first trial this one retries (None for a fresh trial)."""
    return trial.user_attrs.get("retry_of")


def checkpoint_path(folder: str, level: int, number: int) -> str:
    """Each attempt's own checkpoint: a retry starts from a copy of its predecessor's."""
    return os.path.join(folder, "checkpoints", f"L{level}-t{number}.pt")


def tell(st, number: int, state, value=None) -> bool:
    """Finish a RUNNING trial; False if it is finished already (another worker got there first)."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    try:
        if state == TrialState.COMPLETE:
            st.tell(number, value)
        else:
            st.tell(number, state=state)
    except (UpdateFinishedTrialError, ValueError):  # ValueError: "Cannot tell a FAIL trial"
        return False
    return True


def set_attrs(st, trial_id: int, **attrs) -> bool:
    from optuna.exceptions import UpdateFinishedTrialError

    try:
        for k, v in attrs.items():
            oa.set_user_attr(st, trial_id, k, v)
    except UpdateFinishedTrialError:
        return False
    return True


class Recoverer:
    """``recoverer(study, level)``: finish the dead workers' RUNNING trials of one level study (see the module);
    ``recoverer(study, level, trials)`` takes the study's trials as this worker read them since its last write to
    the storage, instead of reading them again."""

    def __init__(self, ledger, worker: Worker, max_retry: int = MAX_RETRY):
        self.ledger, self.worker, self.max_retry = ledger, worker, max_retry
        self.live = Liveness(ledger, worker)
        self.lost: list[tuple[int, int, int]] = []  # (level, trial number, FLOPs charged), for the caller

    def __call__(self, st, level: int, trials: list | None = None) -> bool:
        """False when there was nothing to recover (nothing was written); True when it may have written."""
        from optuna.trial import TrialState

        if trials is None:
            running = st.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        else:
            running = [t for t in trials if t.state == TrialState.RUNNING]
        rows = {r.trial_id: r for r in self.ledger.rows()}
        waiting = [r for r in rows.values() if r.level == level and r.status == Status.LOST and r.owner is not None]
        if not running and not waiting:
            return False
        self.live.refresh()
        for t in running:
            row = rows.get(oa.trial_id(t))
            owner = (row.owner if row is not None else None) or t.system_attrs.get(OWNER)
            if owner == self.worker.token:
                continue
            if owner is None and self.live.asking():
                continue  # perhaps a live worker's, between its ask and its owner record
            if owner is not None and not self.live.dead(owner):
                continue
            if self.ledger.claim(f"recover:{oa.trial_id(t)}", self.worker.token, self.live.dead):
                self._finish(st, level, oa.trial_id(t))
        if waiting:
            self._chains(st, [r.trial_id for r in waiting])
        return True

    def _finish(self, st, level: int, tid: int) -> None:
        from optuna.trial import TrialState

        self.live.refresh()  # first the workers, then the trial: an unowned trial read after a refresh that shows
        t = oa.get_trial(st, tid)  # nobody asking cannot belong to a live worker (it records its owner first)
        if t.state != TrialState.RUNNING:
            return
        row = self.ledger.row(tid)
        owner = (row.owner if row is not None else None) or t.system_attrs.get(OWNER)
        if self.live.asking() if owner is None else not self.live.dead(owner):
            return  # alive after all (the claim stays with this worker: it looks again next time)
        rec = dict(t.user_attrs.get("record", {}))
        outcome = rec.pop("outcome", None)
        if row is not None and outcome and row.status in (Status.RUNNING, Status.DONE):
            if self.ledger.settle(tid, int(rec.get("train_flops", row.amount))) == Status.DONE:
                faults.point("recover_settled")
                state = TrialState[outcome]
                tell(st, t.number, state, rec.get("loss") if state == TrialState.COMPLETE else None)
                log.warning("trial %s of %s finished before its worker died: kept", t.number, st.study_name)
                return
        if row is None and outcome == "PRUNED":  # rejected at no cost, killed before Optuna heard of it
            tell(st, t.number, TrialState.PRUNED)
            return
        if row is None:  # it never reserved: it trained nothing; put a queued point back in the queue
            fixed = oa.queued_params(t)
            if fixed is not None:
                trials = st.get_trials(deepcopy=False)
                if not any(u.user_attrs.get("requeued_from") == tid for u in trials):
                    keep = {k: v for k, v in t.user_attrs.items() if k in CHAIN_ATTRS}
                    st.enqueue_trial(fixed, user_attrs={**keep, "requeued_from": tid})
                    faults.point("recover_requeued")
            rec.update(train_flops=0, reason="abandoned: its process stopped before training; charged nothing")
            set_attrs(st, tid, train_flops=0, record=rec)
            tell(st, t.number, TrialState.FAIL)
            return
        history = list(t.user_attrs.get("retry_history", []))
        again = len(history) < self.max_retry
        charged = self.ledger.lose(tid, retry=again)
        faults.point("recover_lost")
        if again and self.ledger.row(tid).status in (Status.LOST, Status.RETRIED):
            trials = st.get_trials(deepcopy=False)
            if not any(u.user_attrs.get("retry_of_id") == tid for u in trials):
                self._enqueue_retry(st, t, history)
        what = "retried with the same parameters" if again else f"not retried ({self.max_retry} retries used)"
        rec.update(
            train_flops=charged,
            reason=f"lost: its worker stopped during training; charged the FLOPs it may have spent, {what}",
        )
        set_attrs(st, tid, train_flops=charged, record=rec)
        if tell(st, t.number, TrialState.FAIL):
            self.lost.append((level, t.number, charged))
            log.warning("trial %s of %s lost its worker; charged %d FLOPs, %s", t.number, st.study_name, charged, what)

    def _enqueue_retry(self, st, t, history) -> None:
        keep = {k: v for k, v in t.user_attrs.items() if k in ("reference", "exploration")}
        st.enqueue_trial(
            dict(t.params),
            user_attrs={
                **keep,
                "retry_of": history[0] if history else t.number,
                "retry_of_id": oa.trial_id(t),
                "retry_history": [*history, t.number],
            },
        )
        faults.point("recover_enqueued")

    def _chains(self, st, lost_ids) -> None:
        """Lost trials whose retry is neither queued nor running (a safety net): queue it, or end the chain."""
        from optuna.trial import TrialState

        trials = st.get_trials(deepcopy=False)
        by_id = {oa.trial_id(t): t for t in trials}
        for tid in lost_ids:
            t = by_id.get(tid)
            if t is None or t.state == TrialState.RUNNING:
                continue  # another level's, or its recovery is still to come
            succ = [u for u in trials if u.user_attrs.get("retry_of_id") == tid]
            if any(not u.state.is_finished() for u in succ):
                continue
            if succ or not t.params:
                self.ledger.end_chain(tid)
            elif self.ledger.claim(f"retry:{tid}", self.worker.token, self.live.dead):
                self._enqueue_retry(st, t, list(t.user_attrs.get("retry_history", [])))


# ---- leftovers ----------------------------------------------------------------------------------------

_CKPT = re.compile(r"^L(\d+)-t(\d+)\.pt$")


def clean_folder(folder: str, level_studies, ledger) -> list[str]:
    """Remove what no one will read: temporary files of dead processes of this machine, and checkpoints of
    finished trials whose chain is over (a lost trial's checkpoint stays until its retry has copied it)."""
    removed = []
    ckdir = os.path.join(folder, "checkpoints")
    for d in (folder, ckdir):
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for n in names:
            if stale_temporary(n):
                removed += _remove(os.path.join(d, n))
    try:
        files = [(int(m.group(1)), int(m.group(2)), n) for n in os.listdir(ckdir) if (m := _CKPT.match(n))]
    except OSError:
        files = []
    if not files:
        return removed
    # files first, states after: a file listed belongs to a trial that existed before the states are read
    status = {(r.level, r.number): r.status for r in ledger.rows() if r.number is not None}
    finished = {}
    for level, st in level_studies:
        for t in st.get_trials(deepcopy=False):
            finished[(level, t.number)] = t.state.is_finished()
    for level, number, n in files:
        if finished.get((level, number)) and status.get((level, number)) != Status.LOST:
            removed += _remove(os.path.join(ckdir, n))
    return removed


def _remove(path: str) -> list[str]:
    try:
        os.remove(path)
        return [path]
    except OSError:
        return []
