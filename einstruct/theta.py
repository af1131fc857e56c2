"""es.theta: the continuous 7-parameter family of two-core einsums (NeurIPS 2024, THEORY 2)."""

from __future__ import annotations

import math
import re
from fractions import Fraction

from .errors import SpecError
from .sizes import Size
from .spec import Spec

NAMES = ("alpha", "beta", "gamma", "delta", "epsilon", "phi", "rho")
# x = (g, b, a); core A = (f, d, r, g, a); core B = (f, e, r, g, b); y = (f, e, d); d is delta's axis.
EINSUM = "gba,A:fdrga,B:fergb->fed"
# A theta entry given as text: a decimal (exponent notation up to e-99) or a fraction; parsed, never evaluated.
_TEXT = re.compile(r"^[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,2})?$|^[0-9]+/[0-9]+$", re.ASCII)


def _entry(name: str, v) -> Fraction:
    if isinstance(v, bool) or v is None:
        raise SpecError(f"theta {name} is {v!r}; give a number in [0, 1]")
    if isinstance(v, Fraction):
        f = v
    elif isinstance(v, int):
        f = Fraction(v)
    elif isinstance(v, float):
        if not math.isfinite(v):
            raise SpecError(f"theta {name} is {v!r}; give a finite number in [0, 1]")
        f = Fraction(repr(v))
    elif isinstance(v, str):
        text = v.strip()
        if len(text) > 64 or not _TEXT.match(text):
            shown = v if len(v) <= 40 else v[:40] + "..."
            raise SpecError(f"theta {name} is {shown!r}, not a number; give a number in [0, 1] such as 0.5 or 1/3")
        try:
            f = Fraction(text)
        except (ValueError, ZeroDivisionError):
            raise SpecError(f"theta {name} is {v!r}, not a number; give a number in [0, 1] such as 1/3") from None
    else:
        try:
            f = Fraction(repr(float(v)))  # numpy scalars and the like
        except (TypeError, ValueError, OverflowError):
            raise SpecError(f"theta {name} has type {type(v).__name__}; give a number in [0, 1]") from None
    if f < 0 or f > 1:
        raise SpecError(f"theta {name} = {v!r} is outside [0, 1]; every entry of theta is an exponent in [0, 1]")
    return f


def theta(alpha, beta, gamma, delta, epsilon, phi, rho) -> Spec:
    """The NeurIPS structure with exponents theta; sums within 0.01 of 1 are accepted and used as given.

    Redundant or degenerate theta compile (they are valid einsums) and say so in ``Structure.warnings``.
    """
    t = tuple(_entry(n, v) for n, v in zip(NAMES, (alpha, beta, gamma, delta, epsilon, phi, rho)))
    al, be, ga, de, ep, ph, rh = t
    for total, label in ((al + be + ga, "alpha+beta+gamma"), (de + ep + ph, "delta+epsilon+phi")):
        if abs(total - 1) > Fraction(1, 100):
            raise SpecError(f"theta has {label} = {float(total):g}; it must be 1 (within 0.01)")

    def p(base: str, e: Fraction):  # a Size, not text: any exact exponent in [0, 1] is representable
        return 1 if e == 0 else Size(Fraction(1), base, e)

    label = "theta(" + ", ".join(f"{float(v):g}" for v in t) + ")"
    return Spec(
        EINSUM,
        label=label,
        theta=t,
        a=p("d_in", al),
        b=p("d_in", be),
        g=p("d_in", ga),
        d=p("d_out", de),
        e=p("d_out", ep),
        f=p("d_out", ph),
        r=p("d", rh),
    )
