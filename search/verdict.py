"""The verdict's statistics (THEORY 10): how many times less compute one structure needs than another, read on
confirmation runs only, with a small-sample 95% interval over seeds, and a call a researcher can defend.

    runs = {seed: [(compute, loss), ...], ...}          # one structure's confirmation points, per fresh seed
    c = compare("btt r=1", runs_btt, "dense", runs_dense)
    c.multiplier, c.low, c.high, c.loss, c.call, c.seeds   # e.g. 1.8, 1.3, 2.5, 0.061, "better", 3
    c.as_json()                                           # a verdict.json entry

How a comparison is read, per seed: the seed's points give a frontier (``frontier.pareto_frontier``) and a
power law fitted to it (``frontier.fit_power_law``); the loss L* at which the multiplier is read is the lowest
loss that every seed's frontier of both structures reaches (the largest of their lowest losses), and it must
also lie inside every one of those frontiers' loss ranges, so no law is read outside the losses it was fitted
on (otherwise: no common loss range, and no number). The seed's estimate is the log compute ratio
ln C_vs(L*) - ln C_structure(L*) (> 0: the structure needs less compute). Seeds that both structures ran are
paired (a seed fixes the data both saw, so its effect cancels in the difference); the 95% interval is the
Student-t interval of the mean estimate (n - 1 degrees of freedom for n paired seeds, Welch's for unpaired
ones), which holds its coverage at 3 seeds where a percentile bootstrap does not (THEORY 10; the calibration
tests in tests/search/test_verdict.py measure it). The multiplier is exp(mean), the interval exp(mean +- t se).

The call: "better" when the whole interval lies above 1, "worse" when it lies below 1, "not distinguishable"
otherwise; "no common loss range" when the frontiers share no loss, and "not established" with fewer than 2
usable seeds per structure (a seed is usable when its frontier has points at 2 or more computes and its law
falls with compute).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from . import frontier
from .errors import SearchError

LEVEL = 0.95  # the verdict's interval level
CALLS = ("better", "worse", "not distinguishable", "no common loss range", "not established")


@dataclass(frozen=True)
class Comparison:
    """One row of the verdict: ``structure`` against ``vs`` (dense, or the best named structure)."""

    structure: str
    vs: str
    loss: float | None  # where the multiplier is read (None: no common loss range)
    multiplier: float | None  # C_vs(loss) / C_structure(loss): > 1 means the structure needs less compute
    low: float | None
    high: float | None
    call: str
    seeds: int  # the confirmation seeds behind the interval
    note: str = ""  # why there is no number, in words
    edge_limited: tuple[str, ...] = ()  # the sides (structure, vs) whose frontier is edge-limited (search.confirm)

    def as_json(self) -> dict:
        """The verdict.json entry: structure, vs, loss, multiplier, low, high, call, seeds (and the note, and
        edge_limited: the sides whose best width is at the width grid's edge at some level)."""
        return {
            "structure": self.structure,
            "vs": self.vs,
            "loss": self.loss,
            "multiplier": self.multiplier,
            "low": self.low,
            "high": self.high,
            "call": self.call,
            "seeds": self.seeds,
            "note": self.note,
            "edge_limited": list(self.edge_limited),
        }


@dataclass(frozen=True)
class _Seed:
    law: frontier.PowerLaw
    lowest: float  # the lowest loss on the seed's frontier
    highest: float  # the highest


def _seeds(name: str, runs: Mapping[int, Sequence]) -> dict[int, _Seed]:
    if not isinstance(runs, Mapping):
        raise SearchError(f"{name}: runs must map each seed to its (compute, loss) points, got {type(runs).__name__}")
    out = {}
    for seed, points in runs.items():
        front = frontier.pareto_frontier(points)
        if len({float(p[0]) for p in front}) < 2:
            continue  # one compute: no law to read (not usable)
        law = frontier.fit_power_law(front)
        if not law.a > 0:
            continue  # loss does not fall with compute on this seed: no compute at which to read a loss
        losses = [float(p[1]) for p in front]
        out[seed] = _Seed(law, min(losses), max(losses))
    return out


def _t_quantile(dof: float, level: float) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.5 + level / 2, dof))


def compare(
    structure: str, runs: Mapping[int, Sequence], vs: str, base_runs: Mapping[int, Sequence], level: float = LEVEL
) -> Comparison:
    """``structure``'s compute multiplier over ``vs`` with its interval and call (see the module's docstring)."""
    if not 0 < level < 1:
        raise SearchError(f"the interval level must lie between 0 and 1, got {level!r}")
    a, b = _seeds(structure, runs), _seeds(vs, base_runs)
    n = min(len(a), len(b))

    def empty(call: str, note: str, loss: float | None = None) -> Comparison:
        return Comparison(structure, vs, loss, None, None, None, call, n, note)

    if n < 2:
        return empty(
            "not established",
            f"{n} usable seed(s) ({structure}: {len(a)}, {vs}: {len(b)}); an interval needs 2 or more",
        )
    every = [*a.values(), *b.values()]
    loss = max(s.lowest for s in every)
    if loss > min(s.highest for s in every) * (1 + 1e-12):
        return empty(
            "no common loss range",
            f"the frontiers of {structure} and {vs} share no loss on every seed; a multiplier would be extrapolated",
        )
    log_c = {
        name: {k: math.log(s.law.compute_at(loss)) for k, s in seeds.items()} for name, seeds in (("a", a), ("b", b))
    }
    common = sorted(set(a) & set(b), key=str)
    if len(common) >= 2 and set(a) == set(b):  # paired by seed: the seed's own effect cancels
        diffs = [log_c["b"][k] - log_c["a"][k] for k in common]
        mean, var, dof, seeds = _mean(diffs), _var(diffs) / len(diffs), len(diffs) - 1, len(diffs)
    else:  # Welch: unpaired seeds
        xa, xb = list(log_c["a"].values()), list(log_c["b"].values())
        va, vb = _var(xa) / len(xa), _var(xb) / len(xb)
        mean, var, seeds = _mean(xb) - _mean(xa), va + vb, min(len(xa), len(xb))
        dof = var**2 / (va**2 / (len(xa) - 1) + vb**2 / (len(xb) - 1)) if var > 0 else float(seeds - 1)
    half = _t_quantile(dof, level) * math.sqrt(var)
    low, high = math.exp(mean - half), math.exp(mean + half)
    call = "better" if low > 1 else "worse" if high < 1 else "not distinguishable"
    return Comparison(structure, vs, loss, math.exp(mean), low, high, call, seeds)


def _log_compute(seeds: dict[int, _Seed], loss: float) -> dict[int, float]:
    return {k: math.log(s.law.compute_at(loss)) for k, s in seeds.items()}


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _var(xs: Sequence[float]) -> float:
    m = _mean(xs)
    return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)


def write_json(folder: str, comparisons: Sequence[Comparison]) -> str:
    """``verdict.json`` in the study folder (written atomically): the comparisons' entries, in order."""
    import json
    import os

    from .outputs import write_atomic

    path = os.path.join(folder, "verdict.json")
    write_atomic(path, json.dumps([c.as_json() for c in comparisons], indent=2) + "\n")
    return path


def markdown(comparisons: Sequence[Comparison]) -> str:
    """The report's ``## Verdict`` section: one line per comparison, how to read it, and the protocol's caveats."""
    lines = [
        "## Verdict",
        "",
        "Compute multiplier = how many times less training compute a structure needs than the one it is compared",
        f"with, read at one loss on confirmation runs only (fresh seeds); {LEVEL:.0%} Student-t interval over seeds.",
        "",
        "| structure | vs | multiplier | 95% interval | at loss | call | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        if c.multiplier is None:
            lines.append(f"| {c.structure} | {c.vs} | - | - | - | {c.call} | {c.seeds} |")
        else:
            lines.append(
                f"| {c.structure} | {c.vs} | {c.multiplier:.3g}x | {c.low:.3g}-{c.high:.3g} | {c.loss:.4g} | "
                f"{c.call} | {c.seeds} |"
            )
    notes = [f"- {c.structure} vs {c.vs}: {c.note}" for c in comparisons if c.note]
    if any(c.edge_limited for c in comparisons):
        notes.append(
            "- edge-limited: that side's best width is at the edge of the task's width grid, so its frontier may "
            "not be compute-optimal there, and a wider grid could move the multiplier (verdict.json's edge_limited)"
        )
    return "\n".join([*lines, "", *notes]).rstrip() + "\n"
