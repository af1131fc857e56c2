"""Crash recovery: heartbeats while a trial runs, failing the trials of dead workers, and retrying them.

A worker records a heartbeat for its trial every ``heartbeat`` seconds (a thread; Optuna's RDB storage
keeps the time). Whenever a worker looks for work it asks Optuna to fail the RUNNING trials whose
heartbeat is older than the grace period (3 heartbeats); exactly one worker wins that update and runs
``Recovery`` on the trial: the ledger charges the FLOPs the trial may have spent (its bound) and frees its
slot, and a WAITING copy with the same parameters is enqueued (Optuna's RetryHeartbeatStaleTrialCallback,
up to ``max_retry`` times). The worker that picks the copy up finds the dead trial's checkpoint and
continues from it. A RUNNING trial that never reserved anything and never got a heartbeat (its process
died right after asking) is failed at zero cost once it is older than the grace period.
"""

from __future__ import annotations

import copy
import datetime
import logging
import os
import threading

log = logging.getLogger(__name__)

KEEP_ATTRS = ("reference", "exploration")  # user attributes a retry inherits; the rest is the dead run's


class Heartbeat:
    """``with Heartbeat(storage, trial_id, seconds):`` records the trial's heartbeat until the block ends."""

    def __init__(self, storage, trial_id: int, seconds: float | None):
        self.storage, self.trial_id, self.seconds = storage, trial_id, seconds
        self._stop = threading.Event()
        self._thread = None

    def _beat(self) -> None:
        while not self._stop.is_set():
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:  # a busy database must not kill the trial; the next beat tries again
                log.warning("heartbeat of trial id %s not recorded", self.trial_id, exc_info=True)
            self._stop.wait(self.seconds)

    def __enter__(self):
        if self.seconds:
            self.storage.record_heartbeat(self.trial_id)  # at once: from now on a dead worker is detectable
            self._thread = threading.Thread(target=self._beat, daemon=True, name=f"heartbeat-{self.trial_id}")
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return False


class Recovery:
    """The stale-trial callback: charge the dead trial's bound in the ledger, then enqueue its retry."""

    def __init__(self, max_retry: int = 3):
        import warnings

        import optuna
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        self.ledger = None  # set once the ledger exists (it needs the storage this callback is given to)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        self.lost: list[tuple[int, int]] = []  # (trial number, FLOPs charged), for the caller's report

    def __call__(self, study, trial) -> None:
        charged = self.ledger.lose(trial._trial_id) if self.ledger is not None else 0
        self.lost.append((trial.number, charged))
        log.warning("trial %s of %s lost its worker; charged %d FLOPs, retrying", trial.number, study.study_name,
                    charged)
        again = copy.deepcopy(trial)
        again.user_attrs = {k: v for k, v in trial.user_attrs.items() if k in KEEP_ATTRS}
        self.retry(study, again)


def recover(study, grace: float | None) -> None:
    """Fail this study's dead trials (stale heartbeat, or never started and older than ``grace``)."""
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    if not grace:
        return
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        fail_stale_trials(study)
    now = datetime.datetime.now()
    beating = None
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        started = t.datetime_start
        if "train_flops" in t.user_attrs or started is None or (now - started).total_seconds() < 2 * grace:
            continue
        if beating is None:
            beating = _with_heartbeat(study)
        if beating is None or t._trial_id in beating:
            continue  # alive, or its heartbeat will tell
        try:  # asked, then its process died before it reserved or beat: it trained nothing
            study._storage.set_trial_user_attr(t._trial_id, "train_flops", 0)
            study._storage.set_trial_user_attr(t._trial_id, "record", {
                "train_flops": 0, "reason": "abandoned: its process stopped before training; charged nothing"})
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:
            pass


def _with_heartbeat(study) -> set | None:
    """Ids of trials that ever recorded a heartbeat (Optuna's trial_heartbeats table); None if unreadable."""
    import sqlalchemy as sa

    try:
        with getattr(study._storage, "_backend", study._storage).engine.connect() as c:
            return {r[0] for r in c.execute(sa.text("SELECT trial_id FROM trial_heartbeats"))}
    except Exception:
        return None


class TrialLost(RuntimeError):
    """Another worker declared this trial's worker dead (its heartbeat was late) and charged it: stop."""


def retry_of(study, trial) -> int | None:
    """The number of the first trial this one retries (None for a fresh trial)."""
    return study._storage.get_trial_system_attrs(trial._trial_id).get("failed_trial")


def checkpoint_path(folder: str, level: int, number: int) -> str:
    return os.path.join(folder, "checkpoints", f"L{level}-t{number}.pt")
