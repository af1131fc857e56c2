"""Typed results where strings used to be parsed: a budget reservation's status and why one was refused
(search.ledger), and why a trial was not trained with the trial a duplicate repeats (search.loop, the report).

A rejected trial keeps a sentence for people in its ``reason``; code reads the kind (``rejected`` in the trial's
record) and, for a duplicate, ``duplicate_of`` (the number of the trial it repeats; a trials.csv column), never
the sentence. ``duplicate_of`` of a trials.csv row written before these existed is read from its sentence.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass


class Status(str, enum.Enum):
    """A budget reservation's status, stored as its value (search.ledger's docstring follows a row's life)."""

    RUNNING = "running"
    DONE = "done"
    LOST = "lost"
    RETRIED = "retried"
    DEAD = "dead"


class Refused(enum.Enum):
    """Why ``Ledger.reserve`` refused a reservation."""

    BUDGET = "budget"  # the amount does not fit what the budget has left
    LEVEL = "level"  # the level's slots are taken
    SAME = "same"  # another trial of the level holds the same point
    RETRIED = "retried"  # retry_of is not a lost trial waiting for its retry (another retry took it over)
    TAKEN = "taken"  # this trial holds a reservation already


@dataclass(frozen=True)
class Refusal:
    """A refused reservation: its kind, a sentence for people, and what each kind knows."""

    kind: Refused
    detail: str
    trial: int | None = None  # SAME: the number of the trial that holds the point
    left: float | None = None  # BUDGET: the FLOPs the budget has left

    def __str__(self) -> str:
        return f"{self.kind.value}: {self.detail}"


class Rejected(str, enum.Enum):
    """Why a trial was rejected at zero cost (stored as its value)."""

    INVALID = "invalid"  # the candidate does not compile at its width
    STEPS = "steps"  # it gets fewer than min_steps steps at the level's allowance
    BUDGET = "budget"  # its allowance does not fit what the budget has left
    LEVEL = "level"  # the level's trials are taken (by other workers)
    REPEAT = "repeat"  # the same point is trained at this level already: not retrained (the twin's loss kept)
    CONCURRENT = "concurrent"  # the same point is being trained by another worker at the same moment
    RETRY_TAKEN = "retry_taken"  # another retry continues the same lost trial

    @property
    def duplicate(self) -> bool:
        """The sampler proposed a point that is trained already (it explores next)."""
        return self in (Rejected.REPEAT, Rejected.CONCURRENT)


_LEGACY_REPEAT = re.compile(r"same as trial (\d+):")  # a REPEAT's sentence, in rows from before duplicate_of


def duplicate_of(row: dict) -> int | None:
    """The trial number a REPEAT row (a trial's record or a trials.csv row) repeats; None for every other row."""
    v = row.get("duplicate_of")
    if v not in (None, ""):
        try:
            return int(float(v))
        except (TypeError, ValueError):  # a hand-edited file: not a duplicate this code can name
            return None
    if row.get("rejected") in (None, ""):  # from before the kind was recorded: read its sentence
        m = _LEGACY_REPEAT.match(str(row.get("reason", "")))
        return int(m.group(1)) if m else None
    return None
