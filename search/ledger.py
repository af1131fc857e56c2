"""The budget ledger: an atomic reservation of training FLOPs, shared by every worker of a study.

Optuna has no way to say "start this trial only if the budget can still pay for it" across processes:
two workers that both read "1e9 FLOPs left" would both start a 1e9 trial. The ledger closes that gap
with tables in the study's own database (the same SQLite file or PostgreSQL database as Optuna's):

    einstruct_budget       one row per search: its budget; the row every reservation locks first
    einstruct_study        one row per search: the settings that define it (JSON), the source of truth
    einstruct_reservation  one row per trained trial: level, amount, bound, spare, status, owner, point
    einstruct_worker       one row per worker process (run_search call): host, pid, heartbeat count, ordinal
    einstruct_claim        one-time jobs (a level's references, a dead trial's recovery): who holds them

A reservation is one transaction that starts by *writing* the search's budget row (an UPDATE), which
serialises reservers: PostgreSQL holds the row lock until commit, SQLite takes its single write lock
(WAL mode, busy timeout). Inside the lock the transaction sums what all reservations hold or were charged
(``amount + spare``), counts the trials at the trial's level, and inserts its row only if the sum plus the
new amount fits the budget and the level still has a free slot. So whatever the number of workers or
machines, the total never exceeds the budget and no level gets more trials than planned.

A row's life, each step a compare-and-set on its status (a worker only ever moves its own row on from
``running``; a worker that finds its row moved on by someone else stops and discards what it has):

    running --settle--> done       the trial finished; amount = the FLOPs it spent (<= what it reserved)
    running --lose----> lost       its worker died: amount = its bound (the FLOPs it may have spent, raised
                                   before spending), spare = the rest of its reservation, held for the retry
    lost ---retry-----> retried    the retry took over: the spare and the level slot move to the retry's row
    lost ---end_chain-> dead       no retry will come (retries used up, or the retry did not fit): spare freed
    running --lose----> dead       (the same, when no retry is wanted)

A trial's slot at its level is held by every row but a ``retried`` one, so a dead trial and its retries
count once. ``point`` (a digest of the candidate) lets one reservation per point and level exist among
the running, done and lost rows: two workers proposing the same point at the same moment train it once. The
ledger is the budget's source of truth; trials.csv takes every trial's train_flops from it.
"""

from __future__ import annotations

import json
import time

import sqlalchemy as sa

from . import optuna_api
from .errors import SearchError
from .outcomes import Refusal, Refused, Status

__all__ = ["Ledger", "Refusal", "Refused", "Status", "create_tables", "stored"]


_META = sa.MetaData()
BUDGET = sa.Table(
    "einstruct_budget",
    _META,
    sa.Column("search", sa.String(200), primary_key=True),
    sa.Column("budget", sa.Float, nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False, default=0),
)
STUDY = sa.Table(
    "einstruct_study",
    _META,
    sa.Column("search", sa.String(200), primary_key=True),
    sa.Column("settings", sa.Text, nullable=False),  # JSON: the settings that must match on every resume
)
RESERVATION = sa.Table(
    "einstruct_reservation",
    _META,
    sa.Column("trial_id", sa.BigInteger, primary_key=True),  # Optuna's trial id: unique in the storage
    sa.Column("search", sa.String(200), nullable=False, index=True),
    sa.Column("level", sa.Integer, nullable=False),
    sa.Column("amount", sa.BigInteger, nullable=False),  # FLOPs held (running) or charged (the rest)
    sa.Column("bound", sa.BigInteger, nullable=False),  # FLOPs it may have spent so far (running)
    sa.Column("status", sa.String(8), nullable=False),  # running, done, lost, retried, dead
    sa.Column("number", sa.Integer, nullable=True),  # the trial's number in its level study
    sa.Column("owner", sa.String(64), nullable=True),  # the worker token that holds it
    sa.Column("spare", sa.BigInteger, nullable=True),  # lost: the part of its reservation held for the retry
    sa.Column("retry_of", sa.BigInteger, nullable=True),  # the trial id this one continues
    sa.Column("point", sa.String(64), nullable=True),  # digest of the candidate
)
CLAIM = sa.Table(
    "einstruct_claim",
    _META,
    sa.Column("key", sa.String(300), primary_key=True),
    sa.Column("owner", sa.String(64), nullable=True),  # the worker token doing the job (NULL: before owners)
)
WORKER = sa.Table(
    "einstruct_worker",
    _META,
    sa.Column("token", sa.String(64), primary_key=True),
    sa.Column("search", sa.String(200), nullable=False, index=True),
    sa.Column("ordinal", sa.Integer, nullable=False),  # distinct among live workers: offsets sampler seeds
    sa.Column("host", sa.String(200), nullable=False),  # machine and process-namespace identity
    sa.Column("hostname", sa.String(200), nullable=False),  # for messages
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started", sa.String(40), nullable=False),  # the process's start time, against pid reuse
    sa.Column("heartbeat", sa.Integer, nullable=False),  # seconds between beats; 0: no beats
    sa.Column("beats", sa.BigInteger, nullable=False),
    sa.Column("asking", sa.Integer, nullable=False),  # 1 while it creates a trial and records itself its owner
    sa.Column("ended", sa.Integer, nullable=False),  # 1 once its run_search returned or raised
)
_ADDED = {"einstruct_reservation": ("number", "owner", "spare", "retry_of", "point"), "einstruct_claim": ("owner",)}
HOLDS_SLOT = tuple(s.value for s in Status if s != Status.RETRIED)  # a retried row's slot belongs to its retry


def _holds_slot(r) -> bool:  # a lost row from before owners were recorded gave its slot to its retry at once
    return r.status in HOLDS_SLOT and not (r.status == Status.LOST and r.owner is None)


def create_tables(engine) -> None:
    """The ledger's tables, if missing, and columns added since (safe to call from several processes at once)."""
    for attempt in range(6):
        try:
            _META.create_all(engine, checkfirst=True)
            _add_columns(engine)
            return
        except sa.exc.DBAPIError:  # a concurrent create won: look again
            if attempt == 5:
                raise
            time.sleep(0.2 * (attempt + 1))


def _add_columns(engine) -> None:
    insp = sa.inspect(engine)
    quote = engine.dialect.identifier_preparer.quote
    for table, names in _ADDED.items():
        have = {c["name"] for c in insp.get_columns(table)}
        for name in names:
            if name not in have:
                col = _META.tables[table].c[name]
                with engine.begin() as c:
                    c.execute(
                        sa.text(f"ALTER TABLE {table} ADD COLUMN {quote(name)} {col.type.compile(engine.dialect)}")
                    )


def stored(engine, search: str) -> dict:
    """What a database holds of a search, read without creating anything: settings (or None), budget (or None),
    and whether any of Optuna's level studies ``<search>.L<i>`` exists."""
    insp = sa.inspect(engine)
    tables = set(insp.get_table_names())
    out = {"settings": None, "budget": None, "studies": False}
    with engine.connect() as c:
        if "einstruct_study" in tables:
            text = c.execute(sa.select(STUDY.c.settings).where(STUDY.c.search == search)).scalar()
            out["settings"] = json.loads(text) if text else None
        if "einstruct_budget" in tables:
            out["budget"] = c.execute(sa.select(BUDGET.c.budget).where(BUDGET.c.search == search)).scalar()
        out["studies"] = optuna_api.has_studies(c, tables, search + ".L")
    return out


class Ledger:
    """Reservations for one search in one database (``engine`` is the Optuna RDB storage's engine).

    ``budget`` (and ``settings``, the study's defining settings) are stored with the search the first time, in
    one transaction; afterwards the stored budget is the one enforced, and a different ``budget`` is refused.
    """

    def __init__(self, engine, search: str, budget: float | None = None, settings: dict | None = None):
        self.engine, self.search = engine, search
        for attempt in range(5):  # several workers may create the tables at the same moment
            try:
                create_tables(engine)
                with engine.begin() as c:  # the budget and the settings in one transaction: a study has both
                    row = c.execute(sa.select(BUDGET.c.budget).where(BUDGET.c.search == search)).first()
                    if row is None:
                        if budget is None:
                            raise SearchError(f"study {search!r} has no budget in its storage; give --budget")
                        c.execute(BUDGET.insert().values(search=search, budget=float(budget), version=0))
                        stored_budget = float(budget)
                    else:
                        stored_budget = float(row.budget)
                    if (
                        settings is not None
                        and c.execute(sa.select(STUDY.c.search).where(STUDY.c.search == search)).first() is None
                    ):
                        c.execute(STUDY.insert().values(search=search, settings=json.dumps(settings, sort_keys=True)))
                break
            except sa.exc.DBAPIError:  # a concurrent create or insert won: look again
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))
        if budget is not None and abs(stored_budget - float(budget)) > 1e-9 * max(abs(stored_budget), 1.0):
            raise SearchError(
                f"study {search!r} already exists with budget={stored_budget!r} (in its storage), not "
                f"{float(budget)!r}; run it with the same settings to resume, or pick a new --study name"
            )
        self.budget = stored_budget

    def _lock(self, c) -> None:
        c.execute(BUDGET.update().where(BUDGET.c.search == self.search).values(version=BUDGET.c.version + 1))

    # ---- settings ----------------------------------------------------------------------------------

    def settings(self) -> dict | None:
        with self.engine.connect() as c:
            text = c.execute(sa.select(STUDY.c.settings).where(STUDY.c.search == self.search)).scalar()
        return json.loads(text) if text else None

    def store_settings(self, settings: dict) -> dict:
        """Store the search's settings unless some are stored already; returns the stored ones."""
        try:
            with self.engine.begin() as c:
                if c.execute(sa.select(STUDY.c.search).where(STUDY.c.search == self.search)).first() is None:
                    c.execute(STUDY.insert().values(search=self.search, settings=json.dumps(settings, sort_keys=True)))
        except sa.exc.IntegrityError:  # another worker stored them first
            pass
        return self.settings()

    # ---- reservations ------------------------------------------------------------------------------

    def reserve(
        self,
        trial_id: int,
        level: int,
        amount: int,
        slots: int | None,
        bound: int,
        *,
        number=None,
        owner=None,
        point=None,
        retry_of=None,
    ) -> Refusal | None:
        """Hold ``amount`` FLOPs for a trial; None when granted, else a Refusal saying why not: BUDGET, LEVEL (its
        ``slots`` are taken), SAME (trial number ``.trial`` holds this ``point``), RETRIED (``retry_of`` is not a
        lost trial waiting for its retry: another retry took it over) or TAKEN (the trial holds a reservation
        already). A retry (``retry_of`` = the lost trial's id) takes over the lost trial's slot and its spare; if it
        does not fit, the lost trial's chain ends.
        """
        amount, bound = int(amount), int(bound)
        with self.engine.begin() as c:
            self._lock(c)
            rows = c.execute(sa.select(RESERVATION).where(RESERVATION.c.search == self.search)).all()
            if any(r.trial_id == trial_id for r in rows):
                return Refusal(Refused.TAKEN, "this trial holds a reservation already")
            pred = None
            if retry_of is not None:
                pred = next((r for r in rows if r.trial_id == retry_of), None)
                if pred is None or pred.status != Status.LOST:
                    what = f"trial {pred.number} is {pred.status}" if pred is not None else "its trial has no row"
                    return Refusal(Refused.RETRIED, what)
            if point is not None:
                twin = next(
                    (
                        r
                        for r in rows
                        if r.level == level
                        and r.point == point
                        and r.trial_id != retry_of
                        and r.status in (Status.RUNNING, Status.DONE, Status.LOST)
                    ),
                    None,
                )  # lost: its retry will continue it
                if twin is not None:
                    return Refusal(Refused.SAME, f"trial {twin.number} holds this point", trial=twin.number)
            held = sum(r.amount + (r.spare or 0) for r in rows) - ((pred.spare or 0) if pred is not None else 0)
            if held + amount > self.budget:
                if pred is not None:
                    self._set(c, pred.trial_id, status=Status.DEAD.value, spare=0)
                left = self.budget - held
                return Refusal(Refused.BUDGET, f"{amount:.3g} FLOPs do not fit the {left:.3g} left", left=left)
            if slots is not None and sum(1 for r in rows if r.level == level and _holds_slot(r)) >= slots:
                return Refusal(Refused.LEVEL, f"level {level} already has its {slots} trials")
            if pred is not None:
                self._set(c, pred.trial_id, status=Status.RETRIED.value, spare=0)
            c.execute(
                RESERVATION.insert().values(
                    trial_id=trial_id,
                    search=self.search,
                    level=level,
                    amount=amount,
                    bound=min(bound, amount),
                    status=Status.RUNNING.value,
                    number=number,
                    owner=owner,
                    spare=0,
                    retry_of=retry_of,
                    point=point,
                )
            )
        return None

    @staticmethod
    def _set(c, trial_id, **values):
        c.execute(RESERVATION.update().where(RESERVATION.c.trial_id == trial_id).values(**values))

    def adopt(self, finished) -> None:
        """Enter trials trained before this ledger existed, ``(trial_id, level, flops)``, as settled."""
        finished = list(finished)
        if not finished:
            return
        with self.engine.begin() as c:
            self._lock(c)
            known = {
                r.trial_id
                for r in c.execute(sa.select(RESERVATION.c.trial_id).where(RESERVATION.c.search == self.search))
            }
            new = [
                dict(
                    trial_id=t,
                    search=self.search,
                    level=lv,
                    amount=int(f),
                    bound=int(f),
                    status=Status.DONE.value,
                    spare=0,
                )
                for t, lv, f in finished
                if t not in known
            ]
            if new:
                c.execute(RESERVATION.insert(), new)

    def raise_bound(self, trial_id: int, bound: int) -> bool:
        """Record, before spending them, the FLOPs this trial may have spent by its next checkpoint (<= amount).

        False if the trial is no longer running in the ledger (another worker took it for dead): stop spending.
        """
        with self.engine.begin() as c:
            done = c.execute(
                RESERVATION.update()
                .where(RESERVATION.c.trial_id == trial_id)
                .where(RESERVATION.c.status == Status.RUNNING.value)
                .values(bound=int(bound))
            )
            return done.rowcount > 0

    def settle(self, trial_id: int, spent: int) -> Status | None:
        """The trial finished having spent ``spent`` FLOPs (<= its reservation): the rest goes back.

        Only a running row is settled. Returns the row's Status afterwards: DONE (settled, now or before), or LOST,
        RETRIED, DEAD when another worker took the trial for dead first: then the charge stays what that worker
        recorded and the caller must discard its result. None if the trial has no row.
        """
        with self.engine.begin() as c:
            moved = c.execute(
                RESERVATION.update()
                .where(RESERVATION.c.trial_id == trial_id)
                .where(RESERVATION.c.status == Status.RUNNING.value)
                .values(amount=int(spent), bound=int(spent), status=Status.DONE.value, spare=0)
            )
            if moved.rowcount:
                return Status.DONE
            row = c.execute(sa.select(RESERVATION.c.status).where(RESERVATION.c.trial_id == trial_id)).first()
        return Status(row.status) if row is not None else None

    def lose(self, trial_id: int, retry: bool = True) -> int:
        """The trial's worker died: charge its bound; with ``retry`` hold the rest of its reservation (and its slot)
        for the retry (status lost), else free it (dead). Returns the FLOPs charged (also when already lost)."""
        with self.engine.begin() as c:
            self._lock(c)
            row = c.execute(sa.select(RESERVATION).where(RESERVATION.c.trial_id == trial_id)).first()
            if row is None:
                return 0
            if row.status != Status.RUNNING:
                return int(row.amount)
            self._set(
                c,
                trial_id,
                amount=row.bound,
                spare=(row.amount - row.bound) if retry else 0,
                status=(Status.LOST if retry else Status.DEAD).value,
            )
            return int(row.bound)

    def end_chain(self, trial_id: int) -> None:
        """A lost trial whose retry will not come: free what it held for it (its charge and slot stay)."""
        with self.engine.begin() as c:
            self._lock(c)
            c.execute(
                RESERVATION.update()
                .where(RESERVATION.c.trial_id == trial_id)
                .where(RESERVATION.c.status == Status.LOST.value)
                .values(status=Status.DEAD.value, spare=0)
            )

    def charges(self) -> dict[int, int]:
        """Trial id -> FLOPs charged, for every trial of this search with a reservation (a running one: its bound,
        what it may have spent so far)."""
        with self.engine.connect() as c:
            return {
                r.trial_id: int(r.bound if r.status == Status.RUNNING else r.amount)
                for r in c.execute(sa.select(RESERVATION).where(RESERVATION.c.search == self.search))
            }

    def spent(self) -> int:
        """FLOPs held or charged by all reservations of this search (what the budget check counts)."""
        with self.engine.connect() as c:
            return int(
                c.execute(
                    sa.select(
                        sa.func.coalesce(
                            sa.func.sum(RESERVATION.c.amount + sa.func.coalesce(RESERVATION.c.spare, 0)), 0
                        )
                    ).where(RESERVATION.c.search == self.search)
                ).scalar()
            )

    def used_slots(self, level: int) -> int:
        with self.engine.connect() as c:
            legacy_lost = sa.and_(RESERVATION.c.status == Status.LOST.value, RESERVATION.c.owner.is_(None))
            return int(
                c.execute(
                    sa.select(sa.func.count())
                    .select_from(RESERVATION)
                    .where(
                        RESERVATION.c.search == self.search,
                        RESERVATION.c.level == level,
                        RESERVATION.c.status.in_(HOLDS_SLOT),
                        sa.not_(legacy_lost),
                    )
                ).scalar()
            )

    def rows(self) -> list:
        with self.engine.connect() as c:
            return c.execute(sa.select(RESERVATION).where(RESERVATION.c.search == self.search)).all()

    def row(self, trial_id: int):
        with self.engine.connect() as c:
            return c.execute(sa.select(RESERVATION).where(RESERVATION.c.trial_id == trial_id)).first()

    # ---- claims: one-time jobs, taken over when their owner died -----------------------------------

    def claim(self, key: str, owner: str | None = None, dead=None) -> bool:
        """True for exactly one caller of a key at a time: the first, or (given ``dead(owner) -> bool``) one that
        takes the key over from a dead owner. A key claimed before owners were recorded counts as a dead owner's."""
        try:
            with self.engine.begin() as c:
                c.execute(CLAIM.insert().values(key=key, owner=owner))
            return True
        except sa.exc.IntegrityError:
            pass
        if dead is None:
            return False
        with self.engine.connect() as c:
            row = c.execute(sa.select(CLAIM.c.owner).where(CLAIM.c.key == key)).first()
        if row is None:
            return False
        if owner is not None and row.owner == owner:
            return True
        if not dead(row.owner):  # judged outside any transaction: it may read the worker table
            return False
        with self.engine.begin() as c:
            same = CLAIM.c.owner.is_(None) if row.owner is None else CLAIM.c.owner == row.owner
            return c.execute(CLAIM.update().where(CLAIM.c.key == key, same).values(owner=owner)).rowcount > 0

    # ---- workers ----------------------------------------------------------------------------------

    def register(self, token: str, busy, **values) -> int:
        """Enter a worker; returns its ordinal: the smallest not held by a worker that ``busy(row)`` calls live."""
        with self.engine.begin() as c:
            self._lock(c)
            rows = c.execute(sa.select(WORKER).where(WORKER.c.search == self.search)).all()
            held = {r.ordinal for r in rows if not r.ended and busy(r)}
            ordinal = next(i for i in range(len(held) + 1) if i not in held)
            c.execute(
                WORKER.insert().values(
                    token=token, search=self.search, ordinal=ordinal, beats=0, asking=0, ended=0, **values
                )
            )
        return ordinal

    def workers(self) -> dict:
        with self.engine.connect() as c:
            return {r.token: r for r in c.execute(sa.select(WORKER).where(WORKER.c.search == self.search))}

    def beat(self, token: str) -> None:
        with self.engine.begin() as c:
            c.execute(WORKER.update().where(WORKER.c.token == token).values(beats=WORKER.c.beats + 1))

    def set_worker(self, token: str, **values) -> None:
        with self.engine.begin() as c:
            c.execute(WORKER.update().where(WORKER.c.token == token).values(**values))
