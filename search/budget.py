"""Spreading a total FLOP budget over compute levels, so that frontiers can be drawn, and checking that they can
train something.

Every level gets an equal share of the budget. Level i trains each trial for ``allowance_i`` FLOPs, with
allowances a factor ``ratio`` (>= 2) apart; the top level runs ``top_trials`` trials and each level below
``ratio`` times as many, so the planned allowances add up to at most the budget.

A level *cannot train any candidate* when even the cheapest candidate of the search space (at the smallest
width) gets fewer than ``min_steps`` steps from its allowance: every trial there would be rejected.
``check_plan`` finds those levels and the smallest budget that makes each of them feasible, and refuses a
plan in which no level can train anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import SearchError
from .settings import default

LEVELS, RATIO, TOP_TRIALS = default("levels"), default("ratio"), default("top_trials")  # the options' defaults


@dataclass(frozen=True)
class Level:
    index: int
    allowance: float  # training FLOPs per trial at this level
    trials: int

    @property
    def planned_flops(self) -> float:
        return self.allowance * self.trials


def plan_levels(
    budget: float, levels: int = LEVELS, ratio: float = RATIO, top_trials: int = TOP_TRIALS
) -> tuple[Level, ...]:
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


def budget_for(
    level: int, allowance: float, levels: int = LEVELS, ratio: float = RATIO, top_trials: int = TOP_TRIALS
) -> float:
    """The smallest total budget whose plan (``plan_levels`` with these settings) gives ``level`` an allowance of
    at least ``allowance`` FLOPs per trial. A level's number of trials does not depend on the budget."""
    plan = lambda b: plan_levels(b, levels, ratio, top_trials)[level].allowance
    b = allowance * levels * top_trials * ratio ** (levels - 1 - level)
    while plan(b) < allowance:  # rounding in plan_levels: step up to the first budget that is enough
        b = math.nextafter(b, math.inf)
    while plan(math.nextafter(b, 0.0)) >= allowance:
        b = math.nextafter(b, 0.0)
    return b


def total_for(explore_budget: float, explore: float) -> float:
    """The smallest total budget whose exploration share ``explore`` is at least ``explore_budget``."""
    b = explore_budget / explore
    while b * explore < explore_budget:
        b = math.nextafter(b, math.inf)
    return b


def round_up(x: float, digits: int = 3) -> float:
    """``x`` rounded up to ``digits`` significant digits: a budget to print (with ``:.3g``) that is still enough,
    and the very number that printing it and reading it back gives."""
    e = math.floor(math.log10(x)) - digits + 1
    k = math.ceil(x / 10.0**e)
    while float(f"{k}e{e}") < x:
        k += 1
    return float(f"{k}e{e}")


@dataclass(frozen=True)
class Cheapest:
    """The candidate of a space (or of its references) with the fewest training FLOPs per step."""

    label: str
    width: int
    flops_per_step: int

    def need(self, min_steps: int) -> float:
        """Training FLOPs per trial that give it ``min_steps`` steps."""
        return float(min_steps) * self.flops_per_step


@dataclass(frozen=True)
class Shortfall:
    """A level whose allowance is less than ``need``; ``budget`` is the smallest budget that gives it ``need``."""

    level: int
    allowance: float
    need: float
    budget: float


@dataclass(frozen=True)
class Feasibility:
    """What each level of a plan can train: ``infeasible`` levels train no candidate of the space at all;
    at ``no_references`` levels (feasible ones only) no reference structure gets ``min_steps`` steps."""

    min_steps: int
    cheapest: Cheapest
    cheapest_reference: Cheapest | None
    infeasible: tuple[Shortfall, ...]
    no_references: tuple[Shortfall, ...]


class _Replay:
    """Replays fixed Optuna params through ``Space.suggest``, so that a point is one the space proposes."""

    def __init__(self, params: dict):
        self.params = params

    def suggest_categorical(self, key, choices):
        return self.params[key]

    def suggest_float(self, key, low, high):
        return self.params[key]

    def suggest_int(self, key, low, high):
        return self.params[key]


def candidates(space, refs, width: int, families: bool = True) -> list:
    """The points that hold the cheapest candidate of ``space`` at ``width``: every reference and (``families``)
    each family's cheap points (``Family.cheap_points``: every option of a discrete family; for theta the rank-1
    low-rank point, the cheapest theta). Each point is replayed through ``space.suggest``: one the space proposes."""
    pts = [r.at(width) for r in refs] + (space.cheap_candidates(width) if families else [])
    return [space.suggest(_Replay(space.params_for(c))) for c in pts]


def cheapest(task, cands) -> Cheapest | None:
    """The candidate with the fewest training FLOPs per step on ``task`` (models on the meta device); None when
    none of them builds."""
    import einstruct as es

    from . import train

    best = None
    for c in cands:
        try:
            _, per_step = train.plan(task, c.spec(), c.width, 1.0)
        except (es.SpecError, SearchError):
            continue
        if best is None or per_step < best.flops_per_step:
            best = Cheapest(c.label, c.width, int(per_step))
    return best


def check_plan(
    task,
    space,
    refs,
    budget: float,
    min_steps: int,
    levels: int = LEVELS,
    ratio: float = RATIO,
    top_trials: int = TOP_TRIALS,
    explore: float = 1.0,
) -> Feasibility:
    """Which levels of ``plan_levels(budget * explore, levels, ratio, top_trials)`` (``explore``: the exploration
    share, 1 - confirm_share; the budgets named are total ones) can train a candidate of ``space`` (or one
    of its references ``refs``) for ``min_steps`` steps. Raises SearchError, naming the budget that would do, when
    no level can train anything."""
    plan = plan_levels(budget * explore, levels, ratio, top_trials)
    width = min(task.widths)

    def short(low):
        need = low.need(min_steps)
        return tuple(
            Shortfall(
                lv.index, lv.allowance, need, total_for(budget_for(lv.index, need, levels, ratio, top_trials), explore)
            )
            for lv in plan
            if lv.allowance < need
        )

    low = cheapest(task, candidates(space, refs, width))
    if low is None:  # nothing builds at the smallest width: each trial says why
        return Feasibility(min_steps, Cheapest("", width, 0), None, (), ())
    infeasible = short(low)
    if len(infeasible) == len(plan):
        top, need = infeasible[-1], low.need(min_steps)
        raise SearchError(
            f"budget {budget:.3g} can train no candidate at any level: the cheapest, {low.label} at width "
            f"{low.width}, needs {min_steps} steps x {low.flops_per_step:.3g} = {need:.3g} training FLOPs per "
            f"trial, and the top level allows {top.allowance:.3g}; give --budget {round_up(top.budget):.3g} or more "
            f"({round_up(infeasible[0].budget):.3g} for every level), or a lower --min-steps"
        )
    ref = cheapest(task, candidates(space, refs, width, families=False)) if refs else None
    bad = {s.level for s in infeasible}
    no_refs = () if ref is None else tuple(s for s in short(ref) if s.level not in bad)
    return Feasibility(min_steps, low, ref, infeasible, no_refs)
