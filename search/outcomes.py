"""Why a trial was not trained, as a type: the kind of rejection a trial records, and the trial a duplicate repeats.

A rejected trial keeps a sentence for people in its ``reason``; code reads the kind (``rejected`` in the trial's
record) and, for a duplicate, ``duplicate_of`` (the number of the trial it repeats; a trials.csv column), never
the sentence. ``duplicate_of`` of a trials.csv row written before these existed is read from its sentence.
"""

from __future__ import annotations

import enum
import re


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
