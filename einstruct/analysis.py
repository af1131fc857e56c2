"""Asymptotic analysis of a symbolic spec: omega, psi, nu (THEORY 3) and theta validity (THEORY 2).

Every size is written as d^t (square case d_in = d_out = d; integer sizes have t = 0). MACs and
parameter counts become polynomials in d compared by their leading terms, which also picks the
asymptotically cheapest chain; psi is the minimum x-y cut with capacity t per axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

from . import network, plan

_MAX_SCALE = 10**12


class Poly:
    """A polynomial in d with rational exponents and positive coefficients, ordered as d -> infinity."""

    __slots__ = ("terms",)

    def __init__(self, terms: dict | None = None):
        self.terms = {e: c for e, c in (terms or {}).items() if c}

    @classmethod
    def monomial(cls, coef: Fraction, exp: Fraction) -> Poly:
        return cls({exp: coef})

    def __add__(self, other: Poly) -> Poly:
        t = dict(self.terms)
        for e, c in other.terms.items():
            t[e] = t.get(e, 0) + c
        return Poly(t)

    def key(self) -> tuple:
        return tuple(sorted(self.terms.items(), reverse=True))

    def __lt__(self, other: Poly) -> bool:
        return self.key() < other.key()

    @property
    def degree(self) -> Fraction:
        return max(self.terms) if self.terms else Fraction(0)


@dataclass(frozen=True)
class Taxonomy:
    omega: Fraction
    psi: Fraction
    nu: Fraction
    order: tuple[int, ...]  # asymptotically cheapest chain (positions in spec.cores)


@lru_cache(maxsize=1024)
def taxonomy(spec) -> Taxonomy:
    sizes = spec.sizes
    core_axes = [c.axes for c in spec.cores]

    def mono(axes) -> Poly:
        coef, exp = Fraction(1), Fraction(0)
        for a in axes:
            s = sizes[a]
            coef *= s.coef
            exp += s.exponent()
        return Poly.monomial(coef, exp)

    macs, order = plan.best_chain(spec.x, spec.y, core_axes, mono, Poly())
    params = Poly()
    for axes in core_axes:
        params = params + mono(axes)
    # Integer capacities on a common denominator keep the max-flow exact; exponents with huge denominators
    # (e.g. theta entries like 5e-324) would overflow a float, so the scale is capped and psi is then summed
    # exactly over the cut that was found (the minimum to within 1e-12).
    scale = min(math.lcm(*(s.exponent().denominator for s in sizes.values())), _MAX_SCALE)
    _, cut = network.min_cut(spec, lambda a: math.floor(sizes[a].exponent() * scale))
    psi = sum((sizes[a].exponent() for a in cut), Fraction(0))
    return Taxonomy(omega=macs.degree - params.degree, psi=psi, nu=macs.degree - 1, order=order)


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
