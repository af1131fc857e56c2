"""The contraction plan: the cheapest chain in which the activation meets one core per step (THEORY 4).

Cores are never merged with each other. The cost of a step depends only on which cores were applied
before it, so the cheapest order is found by dynamic programming over subsets of cores, ties broken by
the order of the cores in the spec (the lexicographically smallest sequence of spec indices).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    """One batched matmul of the chain: activation (axes ``before``) times one core -> ``after``.

    contracted: in the activation and the core, summed away here (the core's fan-in);
    produced: in the core only (its fan-out); batch: in both and kept (block axes of the core);
    carried: in the activation only (the rows the core is shared across).
    """

    core: int  # position of the core in spec.cores
    before: str
    after: str
    contracted: str
    produced: str
    batch: str
    carried: str


def activation(x: str, y: str, core_axes: list[str], applied: frozenset[int]) -> str:
    """Axes of the running activation once the cores in ``applied`` have been met (x's order first)."""
    have = x + "".join(core_axes[i] for i in sorted(applied))
    need = set(y).union(*(set(core_axes[i]) for i in range(len(core_axes)) if i not in applied))
    out = []
    for a in have:
        if a in need and a not in out:
            out.append(a)
    return "".join(out)


def make_step(x: str, y: str, core_axes: list[str], applied: frozenset[int], i: int) -> Step:
    before = activation(x, y, core_axes, applied)
    after = activation(x, y, core_axes, applied | {i})
    c = core_axes[i]
    return Step(
        core=i,
        before=before,
        after=after,
        contracted="".join(a for a in c if a in before and a not in after),
        produced="".join(a for a in c if a not in before),
        batch="".join(a for a in c if a in before and a in after),
        carried="".join(a for a in before if a not in c),
    )


def step_axes(step: Step, core_axes: list[str]) -> set[str]:
    """Every axis that takes part in the step: its cost is the product of their sizes."""
    return set(step.before) | set(core_axes[step.core])


def best_chain(x: str, y: str, core_axes: list[str], cost: Callable[[set[str]], object], zero) -> tuple:
    """Cheapest order of the cores as (total cost, tuple of core positions).

    ``cost`` maps the set of axes in a step to a comparable, addable cost; ``zero`` is its identity.
    """
    k = len(core_axes)
    best: dict[frozenset, tuple] = {frozenset(): (zero, ())}
    for size in range(1, k + 1):
        layer: dict[frozenset, tuple] = {}
        for applied, (c0, seq) in best.items():
            if len(applied) != size - 1:
                continue
            for i in range(k):
                if i in applied:
                    continue
                st = make_step(x, y, core_axes, applied, i)
                cand = (c0 + cost(step_axes(st, core_axes)), seq + (i,))
                key = applied | {i}
                if key not in layer or _less(cand, layer[key]):
                    layer[key] = cand
        best.update(layer)
    return best[frozenset(range(k))]


def _less(a: tuple, b: tuple) -> bool:
    return (a[0] < b[0]) or (not (b[0] < a[0]) and a[1] < b[1])
