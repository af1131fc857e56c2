"""Asymptotic analysis of a symbolic spec: omega, psi, nu (THEORY 3) and theta validity (THEORY 2).

Every size is written as d^t (square case d_in = d_out = d; integer sizes have t = 0). As d grows, a
chain's MACs are dominated by its largest step, so the leading exponent of the asymptotically cheapest
chain is the least possible largest step exponent (:func:`einstruct.plan.bottleneck_chain`); the
parameters' leading exponent is the largest core's. psi is the minimum x-y cut with capacity t per axis.
Exponents are scaled to integers on their common denominator, so every comparison is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

from . import network, plan


@dataclass(frozen=True)
class Taxonomy:
    omega: Fraction
    psi: Fraction
    nu: Fraction
    order: tuple[int, ...]  # a chain attaining the leading MACs exponent (positions in spec.cores)
    notes: tuple[str, ...] = ()  # why the numbers are undefined or only bounds, if they are


@lru_cache(maxsize=1024)
def taxonomy(spec) -> Taxonomy:
    exps = {a: s.exponent() for a, s in spec.sizes.items()}
    scale = math.lcm(*(e.denominator for e in exps.values()))
    weight = {a: int(e * scale) for a, e in exps.items()}
    core_axes = [c.axes for c in spec.cores]
    chain = plan.bottleneck_chain(spec.x, spec.y, core_axes, weight)
    macs = Fraction(chain.cost, scale)
    params = max(Fraction(sum(weight[a] for a in axes), scale) for axes in core_axes)
    cut, _ = network.min_cut(spec, lambda a: weight[a])
    notes = []
    if all(e == 0 for e in exps.values()):
        notes.append(
            "no axis size depends on d (all sizes are integers), so the taxonomy is undefined: omega, psi and "
            "nu are exponents of d, and the values shown (omega=0, psi=0, nu=-1) mean nothing; give the sizes "
            "that should grow with the layer in d (e.g. 'd_in^1/2') to get them"
        )
    elif not chain.exact:
        notes.append(
            f"the search for the asymptotically cheapest chain stopped after {chain.states} subsets of the "
            f"{len(core_axes)} cores; nu and omega come from the best chain found, an upper bound"
        )
    return Taxonomy(omega=macs - params, psi=Fraction(cut, scale), nu=macs - 1, order=chain.order, notes=tuple(notes))


def theta_warnings(theta) -> tuple[str, ...]:
    """Redundant / degenerate flags of a theta point (THEORY 2); empty for a valid one."""
    if theta is None:
        return ()
    al, be, _, de, ep, _, rh = theta
    out = []
    if min(al, ep) < min(be, de):
        out.append(
            f"theta is redundant: min(alpha, epsilon) = {float(min(al, ep)):g} < min(beta, delta) = "
            f"{float(min(be, de)):g}; the core B runs first (a cheaper chain), and the paper's omega/psi/nu "
            "formulas do not hold"
        )
    if rh > min(al, ep):
        out.append(
            f"theta is degenerate: rho = {float(rh):g} > min(alpha, epsilon) = {float(min(al, ep)):g}; the two "
            "cores could be merged into a cheaper structure, and the paper's formulas do not hold"
        )
    return tuple(out)
