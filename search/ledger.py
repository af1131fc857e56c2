"""The budget ledger: an atomic reservation of training FLOPs, shared by every worker of a study.

Optuna has no way to say "start this trial only if the budget can still pay for it" across processes:
two workers that both read "1e9 FLOPs left" would both start a 1e9 trial. The ledger closes that gap
with two tables in the study's own database (the same SQLite file or PostgreSQL database as Optuna's):

    einstruct_budget       one row per search: its budget; the row every reservation locks first
    einstruct_reservation  one row per trained trial: level, amount (FLOPs held or charged), bound, status

A reservation is one transaction that starts by *writing* the search's budget row (an UPDATE), which
serialises reservers: PostgreSQL holds the row lock until commit, SQLite takes its single write lock
(WAL mode, busy timeout). Inside the lock the transaction sums the amounts of all reservations, counts
the live ones at the trial's level, and inserts its row only if ``sum + allowance <= budget`` and the
level still has a free slot. So whatever the number of workers or machines, the amounts never add up to
more than the budget and no level gets more trials than planned.

Amounts move only downwards after that: a trial that finishes is settled to the FLOPs it actually spent
(<= what it reserved). While it runs, a trial records a *bound*: the FLOPs it may have spent by its next
checkpoint (it raises the bound before spending, never after). A trial whose worker died (its heartbeat
went stale) is charged that bound, and its row is marked ``lost`` so its slot goes to the retry, which
reserves only what is left after the checkpoint it resumes from. The ledger is the budget's source of
truth; trials.csv mirrors it (train_flops per trial) and never shows less than the ledger charges.
"""

from __future__ import annotations

import time

import sqlalchemy as sa

_META = sa.MetaData()
BUDGET = sa.Table(
    "einstruct_budget", _META,
    sa.Column("search", sa.String(200), primary_key=True),
    sa.Column("budget", sa.Float, nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False, default=0),
)
RESERVATION = sa.Table(
    "einstruct_reservation", _META,
    sa.Column("trial_id", sa.BigInteger, primary_key=True),  # Optuna's trial id: unique in the storage
    sa.Column("search", sa.String(200), nullable=False, index=True),
    sa.Column("level", sa.Integer, nullable=False),
    sa.Column("amount", sa.BigInteger, nullable=False),  # FLOPs held (running) or charged (done, lost)
    sa.Column("bound", sa.BigInteger, nullable=False),  # FLOPs it may have spent so far (running)
    sa.Column("status", sa.String(8), nullable=False),  # running, done, lost
)
CLAIM = sa.Table(  # one-time jobs (enqueueing a level's references): the first insert wins
    "einstruct_claim", _META,
    sa.Column("key", sa.String(300), primary_key=True),
)


def create_tables(engine) -> None:
    """The ledger's tables, if missing (safe to call from several processes at once)."""
    for attempt in range(5):
        try:
            _META.create_all(engine, checkfirst=True)
            return
        except sa.exc.DBAPIError:  # a concurrent create won: look again
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))


class Ledger:
    """Reservations for one search in one database (``engine`` is the Optuna RDB storage's engine)."""

    def __init__(self, engine, search: str, budget: float):
        self.engine, self.search, self.budget = engine, search, float(budget)
        for attempt in range(5):  # several workers may create the tables at the same moment
            try:
                create_tables(engine)
                with engine.begin() as c:
                    if c.execute(sa.select(BUDGET.c.search).where(BUDGET.c.search == search)).first() is None:
                        c.execute(BUDGET.insert().values(search=search, budget=self.budget, version=0))
                break
            except sa.exc.DBAPIError:  # a concurrent create or insert won: look again
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def _lock(self, c) -> None:
        c.execute(BUDGET.update().where(BUDGET.c.search == self.search).values(version=BUDGET.c.version + 1))

    def reserve(self, trial_id: int, level: int, amount: int, slots: int | None, bound: int) -> str:
        """Hold ``amount`` FLOPs for a trial; '' when granted, else why not ('budget: ...' or 'level: ...').

        ``slots`` caps the live reservations at ``level`` (None for a retry, which takes a lost trial's slot).
        """
        amount, bound = int(amount), int(bound)
        with self.engine.begin() as c:
            self._lock(c)
            rows = c.execute(sa.select(RESERVATION.c.level, RESERVATION.c.amount, RESERVATION.c.status)
                             .where(RESERVATION.c.search == self.search)).all()
            held = sum(r.amount for r in rows)
            if held + amount > self.budget:
                return f"budget: {amount:.3g} FLOPs do not fit the {self.budget - held:.3g} left"
            if slots is not None and sum(1 for r in rows if r.level == level and r.status != "lost") >= slots:
                return f"level: level {level} already has its {slots} trials"
            c.execute(RESERVATION.insert().values(trial_id=trial_id, search=self.search, level=level, amount=amount,
                                                  bound=min(bound, amount), status="running"))
        return ""

    def adopt(self, finished) -> None:
        """Enter trials trained before this ledger existed, ``(trial_id, level, flops)``, as settled."""
        finished = list(finished)
        if not finished:
            return
        with self.engine.begin() as c:
            self._lock(c)
            known = {r.trial_id for r in c.execute(sa.select(RESERVATION.c.trial_id)
                                                  .where(RESERVATION.c.search == self.search))}
            new = [dict(trial_id=t, search=self.search, level=lv, amount=int(f), bound=int(f), status="done")
                   for t, lv, f in finished if t not in known]
            if new:
                c.execute(RESERVATION.insert(), new)

    def claim(self, key: str) -> bool:
        """True for exactly one caller of a key, over all workers."""
        try:
            with self.engine.begin() as c:
                c.execute(CLAIM.insert().values(key=key))
            return True
        except sa.exc.IntegrityError:
            return False

    def raise_bound(self, trial_id: int, bound: int) -> bool:
        """Record, before spending them, the FLOPs this trial may have spent by its next checkpoint (<= amount).

        False if the trial is no longer running in the ledger (another worker took it for dead): stop spending.
        """
        with self.engine.begin() as c:
            done = c.execute(RESERVATION.update().where(RESERVATION.c.trial_id == trial_id)
                             .where(RESERVATION.c.status == "running").values(bound=int(bound)))
            return done.rowcount > 0

    def settle(self, trial_id: int, spent: int) -> None:
        """The trial finished having spent ``spent`` FLOPs (<= its reservation): the rest goes back."""
        with self.engine.begin() as c:
            c.execute(RESERVATION.update().where(RESERVATION.c.trial_id == trial_id)
                      .values(amount=int(spent), bound=int(spent), status="done"))

    def lose(self, trial_id: int) -> int:
        """The trial's worker died: charge its bound, free its slot; returns the FLOPs charged."""
        with self.engine.begin() as c:
            self._lock(c)
            row = c.execute(sa.select(RESERVATION.c.bound, RESERVATION.c.status)
                            .where(RESERVATION.c.trial_id == trial_id)).first()
            if row is None:
                return 0
            if row.status != "running":
                return 0
            c.execute(RESERVATION.update().where(RESERVATION.c.trial_id == trial_id)
                      .values(amount=row.bound, status="lost"))
            return int(row.bound)

    def charges(self) -> dict[int, int]:
        """Trial id -> FLOPs for the trials not settled by their own worker (running, or lost)."""
        with self.engine.connect() as c:
            return {r.trial_id: int(r.bound if r.status == "running" else r.amount) for r in c.execute(
                sa.select(RESERVATION).where(RESERVATION.c.search == self.search, RESERVATION.c.status != "done"))}

    def spent(self) -> int:
        """FLOPs held or charged by all reservations of this search."""
        with self.engine.connect() as c:
            return int(c.execute(sa.select(sa.func.coalesce(sa.func.sum(RESERVATION.c.amount), 0))
                                 .where(RESERVATION.c.search == self.search)).scalar())

    def used_slots(self, level: int) -> int:
        with self.engine.connect() as c:
            return int(c.execute(sa.select(sa.func.count()).select_from(RESERVATION)
                                 .where(RESERVATION.c.search == self.search, RESERVATION.c.level == level,
                                        RESERVATION.c.status != "lost")).scalar())

    def row(self, trial_id: int):
        with self.engine.connect() as c:
            return c.execute(sa.select(RESERVATION).where(RESERVATION.c.trial_id == trial_id)).first()
