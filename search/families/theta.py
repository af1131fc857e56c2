"""The theta family (NeurIPS 2024, THEORY 2): theta on both simplices, sampled so that every sample is valid.

(alpha, beta, gamma) = (min(u1, u2), |u1 - u2|, 1 - max(u1, u2)) is uniform on the simplex, and the same with
(v1, v2) for (epsilon, delta, phi); rho = u3 * min(alpha, epsilon), so no sample is degenerate. A redundant sample
(min(alpha, epsilon) < min(beta, delta)) has alpha <-> beta and epsilon <-> delta swapped, which makes it
non-redundant. The BTT subspace (beta = delta = 0) samples only (u1, v1, u3).

Groups are per structure: a theta point belongs to the THEORY 2 named point it matches within 0.011 per entry
(dense, low rank, Kronecker, Tensor-Train, BTT), any other to "theta".
"""

from __future__ import annotations

from collections.abc import Sequence

import einstruct as es

from .base import Family

KEYS = ("alpha", "beta", "gamma", "delta", "epsilon", "phi", "rho")
MATCH_TOL = 0.011  # the papers write .33 and .67
_NAMED = (  # (group, theta with None for "any rho", rho condition)
    ("dense", (1, 0, 0, 1, 0, 0, 0), None),
    ("dense", (1, 0, 0, 0, 1, 0, 1), None),
    ("low rank", (1, 0, 0, 0, 1, 0, None), lambda r: r < 1 - MATCH_TOL),
    ("Kronecker", (0.5, 0.5, 0, 0.5, 0.5, 0, 0), None),
    ("Tensor-Train", (0.5, 0.5, 0, 0.5, 0.5, 0, None), lambda r: r > MATCH_TOL),
    ("BTT", (0.5, 0, 0.5, 0, 0.5, 0.5, None), None),
)


def theta_group(theta: Sequence[float]) -> str:
    """The THEORY 2 named point theta matches (within 0.011 per entry), else "theta"."""
    t = [float(v) for v in theta]
    for name, ref, cond in _NAMED:
        if all(r is None or abs(v - r) <= MATCH_TOL for v, r in zip(t, ref)) and (cond is None or cond(t[6])):
            return name
    return "theta"


def theta_from_unit(u1: float, u2: float, v1: float, v2: float) -> tuple[float, ...]:
    """(alpha, beta, gamma, delta, epsilon, phi) on both simplices, non-redundant by construction."""
    al, be, ga = min(u1, u2), abs(u1 - u2), 1.0 - max(u1, u2)
    ep, de, ph = min(v1, v2), abs(v1 - v2), 1.0 - max(v1, v2)
    if min(al, ep) < min(be, de):  # redundant: swap the roles so that A runs first
        al, be, ep, de = be, al, de, ep
    return (al, be, ga, de, ep, ph)


def canonical(theta) -> tuple[float, ...]:
    """Round to 3 decimals and put the rounding error of each simplex on its last entry."""
    t = [round(float(v), 3) for v in theta]
    t[2] = round(1.0 - t[0] - t[1], 3)
    t[5] = round(1.0 - t[3] - t[4], 3)
    t[6] = min(t[6], t[0], t[4])
    return tuple(abs(v) for v in t)  # no -0.0


class Theta(Family):
    name = "theta"
    label = group = "theta"
    groups = ("dense", "low rank", "Kronecker", "Tensor-Train", "BTT", "theta")
    keys = legacy_columns = KEYS
    continuous = True

    def __init__(self, btt_subspace: bool = False):
        self.btt_subspace = btt_subspace  # beta = delta = 0

    def suggest(self, trial):
        if self.btt_subspace:
            al = trial.suggest_float("u1", 0.0, 1.0)
            ep = trial.suggest_float("v1", 0.0, 1.0)
            t = (al, 0.0, 1.0 - al, 0.0, ep, 1.0 - ep)
        else:
            u1, u2 = trial.suggest_float("u1", 0.0, 1.0), trial.suggest_float("u2", 0.0, 1.0)
            v1, v2 = trial.suggest_float("v1", 0.0, 1.0), trial.suggest_float("v2", 0.0, 1.0)
            t = theta_from_unit(u1, u2, v1, v2)
        rho = trial.suggest_float("u3", 0.0, 1.0) * min(t[0], t[4])
        return dict(zip(KEYS, canonical((*t, rho))))

    def params_for(self, args):
        al, be, _, de, ep, _, rh = (args[k] for k in KEYS)
        p = {"u1": al, "v1": ep} if self.btt_subspace else {"u1": al, "u2": al + be, "v1": ep, "v2": ep + de}
        m = min(al, ep)
        p["u3"] = rh / m if m > 0 else 0.0
        return p

    def random_params(self, rng):
        keys = ("u1", "v1", "u3") if self.btt_subspace else ("u1", "u2", "v1", "v2", "u3")
        return {k: rng.random() for k in keys}

    def normalize(self, args):
        return {k: float(args[k]) for k in KEYS}

    def build(self, args):
        return es.theta(*(args[k] for k in KEYS))

    def structure_label(self, args) -> str:
        return "theta(" + ",".join(f"{args[k]:g}" for k in KEYS) + ")"

    def columns(self, args):
        return dict(args)

    def from_columns(self, row):
        return {k: float(row[k]) for k in KEYS}

    def group_of(self, args) -> str:
        return theta_group([args[k] for k in KEYS])

    def references(self):
        if self.btt_subspace:
            return (_t(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.5), _t(0.5, 0.0, 0.5, 0.0, 0.5, 0.5, 0.0))  # BTT as theta
        return (
            _t(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.5),  # low rank, r = sqrt(d)
            _t(0.5, 0.5, 0.0, 0.5, 0.5, 0.0, 0.0),  # Kronecker
            _t(0.5, 0.5, 0.0, 0.5, 0.5, 0.0, 0.25),  # Tensor-Train, r = d^1/4
        )

    def cheap_points(self):
        # rank-1 low rank, the cheapest theta: a structured layer's chain reads all of x in its first step and
        # writes all of y in its last, so two cores cost at least d_in + d_out MACs per example, which rank-1 low
        # rank costs exactly (a theta point left with one core is dense)
        return (_t(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0),)


def _t(*v) -> dict:
    return dict(zip(KEYS, v))


FAMILY = Theta()
BTT_SUBSPACE = Theta(btt_subspace=True)
