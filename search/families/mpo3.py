"""The mpo3 family: the continuous three-core tensor-train (a matrix product operator), docs/mpo3.md.

x = (a, b, c), y = (d, e, f), cores G1 = (a, d, r), G2 = (b, e, r, s), G3 = (c, f, s): ``abc,adr,besr,cfs->def``
with a, b, c = d_in^(alpha1, alpha2, alpha3), d, e, f = d_out^(eps1, eps2, eps3) (each triple on the simplex)
and bonds r = d^rho1, s = d^rho2 (d = min(d_in, d_out)). Kronecker with three factors is rho = 0, the
three-core Tensor-Train rho > 0, dense-like points need large bonds.

Valid (non-degenerate, docs/mpo3.md section 2), in the square case: rho1 <= alpha1 + eps1, rho2 <= alpha3 + eps3,
|rho1 - rho2| <= alpha2 + eps2, rho1, rho2 <= 1, and alpha2 + eps2 > 0 (the middle core has an axis of x or y).
Sampling makes every sample valid: each simplex from two unit coordinates as theta's are, then
rho1 = w1 * min(1, alpha1 + eps1, alpha3 + eps3 + m) and rho2 = lo + w2 (hi - lo) with m = alpha2 + eps2,
lo = max(0, rho1 - m), hi = min(1, alpha3 + eps3, rho1 + m). A point given otherwise (a reference, a row) that is
not valid is rejected before training (SpecError: zero cost).
"""

from __future__ import annotations

from fractions import Fraction

import einstruct as es
from einstruct.sizes import Size

from .base import Family

KEYS = ("alpha1", "alpha2", "alpha3", "eps1", "eps2", "eps3", "rho1", "rho2")
EINSUM = "abc,G1:adr,G2:besr,G3:cfs->def"
UNITS = ("u1", "u2", "v1", "v2", "w1", "w2")
TOL = 1e-9


def bounds(t: dict) -> tuple[float, float, float]:
    """(upper bound of rho1, and the interval of rho2 given rho1) of a valid point."""
    m = t["alpha2"] + t["eps2"]
    b1 = min(1.0, t["alpha1"] + t["eps1"], t["alpha3"] + t["eps3"] + m)
    lo = max(0.0, t["rho1"] - m)
    hi = min(1.0, t["alpha3"] + t["eps3"], t["rho1"] + m)
    return b1, lo, hi


def why_invalid(t: dict) -> str:
    """'' for a valid point, else the condition it breaks (docs/mpo3.md section 2)."""
    for side in (("alpha1", "alpha2", "alpha3"), ("eps1", "eps2", "eps3")):
        if any(t[k] < -TOL or t[k] > 1 + TOL for k in side) or abs(sum(t[k] for k in side) - 1) > 0.01:
            return f"{'+'.join(side)} must be 1 with entries in [0, 1]"
    if t["alpha2"] + t["eps2"] <= 0:
        return "alpha2 + eps2 = 0: the middle core joins only the bonds (merge it into a neighbour)"
    b1, lo, hi = bounds(t)
    if not (-TOL <= t["rho1"] <= b1 + TOL):
        return f"rho1 = {t['rho1']:g} is outside [0, {b1:g}]: the bond r is larger than what it joins (degenerate)"
    if not (lo - TOL <= t["rho2"] <= hi + TOL):
        return f"rho2 = {t['rho2']:g} is outside [{lo:g}, {hi:g}]: the bond s is larger than what it joins (degenerate)"
    return ""


def from_unit(u1, u2, v1, v2, w1, w2) -> dict:
    """A valid point from six unit coordinates, rounded to 3 decimals (duplicates are found)."""
    t = {"alpha1": min(u1, u2), "alpha2": abs(u1 - u2), "eps1": min(v1, v2), "eps2": abs(v1 - v2)}
    for k in t:
        t[k] = round(t[k], 3)
    t["alpha3"] = abs(round(1.0 - t["alpha1"] - t["alpha2"], 3))
    t["eps3"] = abs(round(1.0 - t["eps1"] - t["eps2"], 3))
    if t["alpha2"] + t["eps2"] == 0:  # rounding left the middle core without axes: give it the smallest step
        big = "eps1" if t["eps1"] >= t["eps3"] else "eps3"
        t[big], t["eps2"] = round(t[big] - 0.001, 3), 0.001
    t["rho1"] = 0.0
    b1, _, _ = bounds(t)
    t["rho1"] = round(w1 * b1, 3)
    t["rho1"] = min(t["rho1"], b1)
    _, lo, hi = bounds(t)
    t["rho2"] = min(max(round(lo + w2 * (hi - lo), 3), lo), hi)
    return {k: abs(t[k]) for k in KEYS}


def _size(base: str, v: float):
    return 1 if v == 0 else Size(Fraction(1), base, Fraction(repr(float(v))))


class MPO3(Family):
    name = "mpo3"
    label = group = "MPO-3"
    keys = KEYS
    continuous = True

    def _names(self):
        return [f"{self.name}.{u}" for u in UNITS]

    def suggest(self, trial):
        return from_unit(*(trial.suggest_float(n, 0.0, 1.0) for n in self._names()))

    def params_for(self, args):
        a1, a2, e1, e2 = args["alpha1"], args["alpha2"], args["eps1"], args["eps2"]
        b1, lo, hi = bounds(args)
        w1 = args["rho1"] / b1 if b1 > 0 else 0.0
        w2 = (args["rho2"] - lo) / (hi - lo) if hi > lo else 0.0
        return dict(zip(self._names(), (a1, a1 + a2, e1, e1 + e2, w1, w2)))

    def random_params(self, rng):
        return {n: rng.random() for n in self._names()}

    def normalize(self, args):
        return {k: float(args[k]) for k in KEYS}

    def build(self, args):
        why = why_invalid(args)
        if why:
            raise es.SpecError(f"mpo3 point {self.structure_label(args)} is not valid: {why}")
        sizes = dict(zip("abc", (_size("d_in", args[k]) for k in ("alpha1", "alpha2", "alpha3"))))
        sizes.update(zip("def", (_size("d_out", args[k]) for k in ("eps1", "eps2", "eps3"))))
        sizes.update(r=_size("d", args["rho1"]), s=_size("d", args["rho2"]))
        return es.Spec(EINSUM, label=self.structure_label(args), **sizes)

    def structure_label(self, args) -> str:
        return "mpo3(" + ",".join(f"{args[k]:g}" for k in KEYS) + ")"

    def references(self):
        third = (0.333, 0.333, 0.334)
        return (
            dict(zip(KEYS, (*third, *third, 0.0, 0.0))),  # Kronecker with three factors
            dict(zip(KEYS, (*third, *third, 0.25, 0.25))),  # three-core Tensor-Train, r = s = d^1/4
        )

    def cheap_points(self):
        # the cheapest valid point: G1 reads all of x and G3 writes all of y through size-1 bonds
        # (d_in + d_out MACs per example; its middle core keeps the smallest output axis, eps2 = 0.001)
        return (dict(zip(KEYS, (1.0, 0.0, 0.0, 0.0, 0.001, 0.999, 0.0, 0.0))),)


FAMILY = MPO3()
