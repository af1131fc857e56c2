"""Spreading a total FLOP budget over compute levels, so that frontiers can be drawn.

Every level gets an equal share of the budget. Level i trains each trial for ``allowance_i`` FLOPs, with
allowances a factor ``ratio`` (>= 2) apart; the top level runs ``top_trials`` trials and each level below
``ratio`` times as many, so the planned allowances add up to at most the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import SearchError


@dataclass(frozen=True)
class Level:
    index: int
    allowance: float  # training FLOPs per trial at this level
    trials: int

    @property
    def planned_flops(self) -> float:
        return self.allowance * self.trials


def plan_levels(budget: float, levels: int = 3, ratio: float = 4.0, top_trials: int = 8) -> tuple[Level, ...]:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
        raise SearchError(f"--budget must be a positive number of FLOPs such as 1e13, got {budget!r}")
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 3:
        raise SearchError(
            f"--levels must be an integer >= 3 (frontiers need at least three compute levels), got {levels!r}"
        )
    if not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio < 2:
        raise SearchError(f"--ratio must be >= 2 (levels a factor of 2 or more apart), got {ratio!r}")
    if isinstance(top_trials, bool) or not isinstance(top_trials, int) or top_trials < 1:
        raise SearchError(f"--top-trials must be a positive integer, got {top_trials!r}")
    share = budget / levels
    top = share / top_trials
    out = []
    for i in range(levels):
        allowance = top / ratio ** (levels - 1 - i)
        out.append(Level(i, allowance, math.floor(share / allowance + 1e-9)))
    return tuple(out)
