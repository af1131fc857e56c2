"""Every use of Optuna beyond its documented API, in one module, each one exercised by tests/search/test_optuna_api.py.

Several workers share a study through its storage, and Optuna's public API does not reach what they need, so the
search relies on these internals (checked against Optuna ``TESTED_VERSION``; the test fails on any other version,
so that an upgrade is checked before it is trusted):

- a trial's storage id (``Trial._trial_id``, ``FrozenTrial._trial_id``): unique in the whole storage, unlike a
  trial's number, and the key of the budget ledger's reservations;
- the study's storage (``Study._storage``): a trial's attributes written by id (a worker recovering another
  worker's trial holds no Trial object for it), one trial read by id, and the error a finished trial raises;
- the system attribute under which ``Study.enqueue_trial`` keeps a queued trial's parameters (``fixed_params``);
- the relational storage's tables: ``RDBStorage.engine`` (the SQLAlchemy engine, which the ledger's tables share)
  and the ``studies`` table with its ``study_name`` column, read without creating anything;
- a study's storage id (``Study._study_id``) and the ``trials`` table's ``trial_id``, ``study_id`` and ``state``
  columns, counted per study and state (``trial_marks``), and that a finished trial never changes in the storage
  (its attributes and state refuse writes, as ``_CachedStorage`` assumes when it never reads one again).

- the study's per-ask read cache (``Study._get_trials(use_cache=True)``, ``Study._thread_local.cached_all_trials``,
  which ``Study.ask`` clears): :func:`one_sampling_read` lets the sampler's reads of one ask and its suggestions
  share one read of the study.

The search uses none of Optuna's heartbeat machinery (its ``trial_heartbeats`` table): workers beat in the ledger's
own worker table (search.recovery), so nothing here reads it.
"""

from __future__ import annotations

import contextlib

TESTED_VERSION = "5.0.0"
QUEUED_PARAMS = "fixed_params"  # Study.enqueue_trial's system attribute


def trial_id(trial) -> int:
    """The storage id of a Trial or FrozenTrial (unique across all studies of the storage)."""
    return trial._trial_id


def get_trial(study, tid: int):
    """The FrozenTrial with storage id ``tid``, read afresh from the storage."""
    return study._storage.get_trial(tid)


def set_system_attr(study, tid: int, key: str, value) -> None:
    study._storage.set_trial_system_attr(tid, key, value)


def set_user_attr(study, tid: int, key: str, value) -> None:
    """Raises optuna.exceptions.UpdateFinishedTrialError when the trial is finished already."""
    study._storage.set_trial_user_attr(tid, key, value)


def queued_params(trial) -> dict | None:
    """The parameters a trial was queued with (Study.enqueue_trial), None for a trial the sampler proposed."""
    return trial.system_attrs.get(QUEUED_PARAMS)


def study_id(study) -> int:
    """The storage id of an optuna.Study."""
    return study._study_id


def trial_marks(engine, study_ids) -> dict[int, tuple]:
    """Per study id, what changes whenever a trial is created or leaves a state: ((state, trials, largest trial id),
    ...) over the states its trials are in, in one query of Optuna's ``trials`` table. A study whose marks are the
    same at two moments and which had no RUNNING trial at the first holds the same trials at both: no trial was
    created (the counts only grow), none left WAITING (that count only falls without a new trial), and a finished
    trial never changes."""
    import sqlalchemy as sa

    ids = sorted(set(study_ids))
    if not ids:
        return {}
    trials = sa.table("trials", sa.column("trial_id"), sa.column("study_id"), sa.column("state"))
    query = (
        sa.select(trials.c.study_id, trials.c.state, sa.func.count(), sa.func.max(trials.c.trial_id))
        .where(trials.c.study_id.in_(ids))
        .group_by(trials.c.study_id, trials.c.state)
    )
    marks: dict[int, list] = {i: [] for i in ids}
    with engine.connect() as c:
        for sid, state, n, last in c.execute(query):
            marks[int(sid)].append((str(getattr(state, "name", state)), int(n), int(last)))
    return {i: tuple(sorted(m)) for i, m in marks.items()}


@contextlib.contextmanager
def one_sampling_read(study):
    """Inside the block, every read of ``study``'s trials through ``Study._get_trials`` (what the samplers and the
    search space's group decomposition call) takes the study's per-ask cache: one read of the storage, made at the
    first such call after ``ask`` cleared it, instead of one per call.

    TPE with ``constant_liar=True`` (which the search uses, so that workers sharing a study see each other's running
    trials) reads the study afresh at every sampling call, about three times per trial. One read per ask and its
    suggestions gives what those reads would give if the other workers had been a few milliseconds slower; this
    worker's own writes in between touch only the trial being asked, which the liar and the search-space reads leave
    out. ``Study.ask``'s own read of the queue (``_pop_waiting_trial_id``) goes to the storage and stays fresh."""
    cls = type(study)

    def cached(deepcopy: bool = True, states=None, use_cache: bool = False):
        return cls._get_trials(study, deepcopy, states, use_cache=True)

    study._thread_local.cached_all_trials = None
    study._get_trials = cached
    try:
        yield
    finally:
        del study._get_trials
        study._thread_local.cached_all_trials = None


def engine(storage):
    """The SQLAlchemy engine of an optuna.storages.RDBStorage."""
    return storage.engine


def has_studies(connection, tables, prefix: str) -> bool:
    """Whether the storage (its open SQLAlchemy ``connection``, and its table names ``tables``) holds a study whose
    name starts with ``prefix``; creates nothing (False when Optuna's tables are not there)."""
    import sqlalchemy as sa

    if "studies" not in tables:
        return False
    studies = sa.table("studies", sa.column("study_name"))
    like = prefix.replace("\\", "\\\\").replace("%", r"\%").replace("_", r"\_") + "%"
    query = sa.select(sa.func.count()).select_from(studies).where(studies.c.study_name.like(like, escape="\\"))
    return connection.execute(query).scalar() > 0
