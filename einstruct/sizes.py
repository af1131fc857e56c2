"""Axis sizes as monomials in d_in, d_out and d = min(d_in, d_out): parsing, evaluation, exponents.

Grammar (parsed, never evaluated)::

    size  := INT | [coef '*'] base ['^' exp | '**' exp] ['/' INT] | '(' size ')'
    base  := 'd_in' | 'd_out' | 'd'
    exp   := INT | DECIMAL | INT '/' INT | '(' exp ')'
    coef  := INT | DECIMAL | INT '/' INT

Examples: ``32``, ``d_in^1/2``, ``d_out/4``, ``d/16``, ``2*d^0.25``, ``d_in**(1/3)``.
In ``d^1/2`` the ``/2`` belongs to the exponent; write ``d^1/2/4`` to also divide by 4.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import cast

from .errors import SpecError

BASES = ("d_in", "d_out", "d")
_MAX_EXPONENT = Fraction(4)
_MAX_INT_SIZE = 2**40


@dataclass(frozen=True)
class Size:
    """``coef * base ** exp``; ``base`` is None for a constant (then the size is ``coef``)."""

    coef: Fraction
    base: str | None = None
    exp: Fraction = Fraction(0)

    @property
    def is_constant(self) -> bool:
        return self.base is None or self.exp == 0

    @property
    def is_one(self) -> bool:
        return self.is_constant and self.coef == 1

    def value(self, d_in: int, d_out: int) -> float:
        """The real (unrounded) size at these layer dimensions."""
        if self.is_constant:
            return float(self.coef)
        b = {"d_in": d_in, "d_out": d_out, "d": min(d_in, d_out)}[cast(str, self.base)]
        return float(self.coef) * float(b) ** float(self.exp)

    def exponent(self) -> Fraction:
        """Exponent of d in the square case d_in = d_out = d (constants have exponent 0)."""
        return Fraction(0) if self.is_constant else self.exp

    def sympy(self, syms: dict):
        """sympy expression; ``syms`` maps 'd_in', 'd_out', 'd' to sympy expressions."""
        import sympy

        c = sympy.Rational(self.coef.numerator, self.coef.denominator)
        if self.is_constant:
            return c
        return c * syms[cast(str, self.base)] ** sympy.Rational(self.exp.numerator, self.exp.denominator)

    def __str__(self) -> str:
        if self.is_constant:
            return str(self.coef)
        s = cast(str, self.base)
        if self.exp != 1:
            s += f"^{self.exp}"
        if self.coef.numerator != 1:
            s = f"{self.coef.numerator}*{s}"
        if self.coef.denominator != 1:
            s += f"/{self.coef.denominator}"
        return s


_NUM = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"  # ASCII digits only: no other scripts' numerals
_FRAC = rf"{_NUM}(?:/[0-9]+)?"
_EXP = rf"(?:\(\s*{_FRAC}\s*\)|{_FRAC})"
_BASE = r"(d_in|d_out|d)"
_MONO = re.compile(
    rf"^(?:(?P<coef>{_FRAC})\s*\*\s*)?{_BASE}"
    rf"(?:\s*(?:\^|\*\*)\s*(?P<exp>{_EXP}))?"
    rf"(?:\s*/\s*(?P<div>[0-9]+))?$",
    re.ASCII,
)
_INT = re.compile(r"^[0-9]+$")
_HINT = "write an integer such as 32 or a monomial such as 'd_in^1/2', 'd_out/4', 'd/16'"


def _frac(text: str) -> Fraction:
    text = text.strip().strip("()").strip()
    if "/" in text:
        num, den = text.split("/")
        if Fraction(den) == 0:
            raise ZeroDivisionError
        return Fraction(num) / Fraction(den)
    return Fraction(text)


def parse_size(value, axis: str = "?") -> Size:
    """Parse one axis size (int or string) into a Size; raise SpecError naming the axis."""
    where = f"size of axis '{axis}'"
    if isinstance(value, Size):
        return _checked_size(value, where)
    if isinstance(value, bool) or value is None:
        raise SpecError(f"{where} is {value!r}; {_HINT}")
    if isinstance(value, int) or (not isinstance(value, (str, float)) and hasattr(value, "__index__")):
        try:
            return _checked_int(operator.index(value), where)  # numpy integers too
        except TypeError:
            raise SpecError(f"{where} has type {type(value).__name__}; {_HINT}") from None
    if isinstance(value, float):
        raise SpecError(
            f"{where} is the float {value!r}; sizes are integers or monomials: "
            f"write {int(value)} if you meant an integer, or a string like 'd^1/2'"
            if math.isfinite(value)
            else f"{where} is {value!r}; {_HINT}"
        )
    if not isinstance(value, str):
        raise SpecError(f"{where} has type {type(value).__name__}; {_HINT}")
    text = value.strip().replace(" ", "")
    while text.startswith("(") and text.endswith(")") and len(text) > 2:
        text = text[1:-1]
    if len(text) > 64:
        raise SpecError(f"{where} is {len(value)} characters long; {_HINT}")
    if _INT.match(text):
        return _checked_int(int(text), where)
    m = _MONO.match(text)
    if not m:
        raise SpecError(f"{where} {value!r} is not a size; {_HINT}")
    try:
        coef = _frac(m.group("coef")) if m.group("coef") else Fraction(1)
        exp = _frac(m.group("exp")) if m.group("exp") else Fraction(1)
        if m.group("div"):
            coef /= int(m.group("div"))
    except (ZeroDivisionError, ValueError):
        raise SpecError(f"{where} {value!r} divides by zero; {_HINT}") from None
    if coef <= 0:
        raise SpecError(f"{where} {value!r} has a zero coefficient; sizes must be positive")
    if exp < 0 or exp > _MAX_EXPONENT:
        raise SpecError(f"{where} {value!r} has exponent {exp}; use an exponent between 0 and {_MAX_EXPONENT}")
    if exp == 0:
        if coef.denominator != 1:
            raise SpecError(f"{where} {value!r} is the constant {coef}, not an integer")
        return _checked_int(int(coef), where)
    return Size(coef, m.group(2), exp)


def _checked_size(s: Size, where: str) -> Size:
    """A Size built directly (not parsed) obeys the same rules as a parsed one."""
    ok = (
        isinstance(s.coef, Fraction)
        and isinstance(s.exp, Fraction)
        and s.coef > 0
        and (s.base is None or s.base in BASES)
        and 0 <= s.exp <= _MAX_EXPONENT
    )
    if not ok:
        raise SpecError(f"{where} is {s!r}, which is not a valid size; {_HINT}")
    if s.is_constant:
        if s.coef.denominator != 1:
            raise SpecError(f"{where} is the constant {s.coef}, not an integer")
        return _checked_int(int(s.coef), where)
    return s


def _checked_int(n: int, where: str) -> Size:
    if n < 1:
        raise SpecError(f"{where} is {n}; sizes must be positive integers (use 1 to drop an axis)")
    if n > _MAX_INT_SIZE:
        raise SpecError(f"{where} is {n}, larger than {_MAX_INT_SIZE}; use a realistic size")
    return Size(Fraction(n))
