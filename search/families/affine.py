"""Brace expressions of a space file: a parameter name, or an affine expression of parameters and numbers.

    {rank}   {1-x}   {2*x + 1/4}   {(x + y)/2}   {-x+1}

``+``, ``-``, ``*`` (one side a number), ``/`` by a number and parentheses; numbers are decimals. Parsed by a small
recursive-descent parser into an Affine (exact fractions), never evaluated as Python. ``substitute`` replaces
every brace of a size with its value, written as an integer when it is one, else as the shortest decimal that
round-trips the float.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

_TOKEN = re.compile(r"\s*(?:(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<op>[-+*/()]))")
_BRACE = re.compile(r"\{([^{}]*)\}")


class ExprError(ValueError):
    """A brace expression that is not affine or does not parse; the message says which part."""


@dataclass(frozen=True)
class Affine:
    const: Fraction
    coefs: tuple[tuple[str, Fraction], ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.coefs)

    def value(self, values: dict) -> Fraction:
        out = self.const
        for n, c in self.coefs:
            v = values[n]
            out += c * (Fraction(v) if isinstance(v, int) else Fraction(repr(float(v))))
        return out

    def _combine(self, other: Affine, sign: int) -> Affine:
        d = dict(self.coefs)
        for n, c in other.coefs:
            d[n] = d.get(n, Fraction(0)) + sign * c
        return Affine(self.const + sign * other.const, tuple((n, c) for n, c in d.items() if c != 0))

    def _scale(self, k: Fraction) -> Affine:
        return Affine(self.const * k, tuple((n, c * k) for n, c in self.coefs if c * k != 0))


def parse(text: str) -> Affine:
    """The Affine of one brace's content; ExprError naming the problem."""
    tokens, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            if text[pos:].strip() == "":
                break
            raise ExprError(f"{text!r} has {text[pos:].strip()[:1]!r}, which is not a number, a name or + - * / ( )")
        tokens.append((m.lastgroup, m.group(m.lastgroup)))
        pos = m.end()
    if not tokens:
        raise ExprError("an empty brace {}; write a parameter name such as {rank}")
    p = _Parser(tokens, text)
    out = p.expr()
    if p.i != len(tokens):
        raise ExprError(f"{text!r} has {tokens[p.i][1]!r} where the expression should end")
    return out


class _Parser:
    def __init__(self, tokens, text):
        self.t, self.i, self.text = tokens, 0, text

    def _peek(self):
        return self.t[self.i][1] if self.i < len(self.t) else None

    def expr(self) -> Affine:
        out = self.term()
        while self._peek() in ("+", "-"):
            sign = 1 if self.t[self.i][1] == "+" else -1
            self.i += 1
            out = out._combine(self.term(), sign)
        return out

    def term(self) -> Affine:
        out = self.factor()
        while self._peek() in ("*", "/"):
            op = self.t[self.i][1]
            self.i += 1
            rhs = self.factor()
            if op == "/":
                if rhs.coefs or rhs.const == 0:
                    raise ExprError(f"{self.text!r} divides by a parameter or by zero; divide by a nonzero number")
                out = out._scale(1 / rhs.const)
            elif out.coefs and rhs.coefs:
                raise ExprError(f"{self.text!r} multiplies two parameters; a brace is affine (number * parameter)")
            else:
                out = out._scale(rhs.const) if not rhs.coefs else rhs._scale(out.const)
        return out

    def factor(self) -> Affine:
        if self.i >= len(self.t):
            raise ExprError(f"{self.text!r} ends too early")
        kind, tok = self.t[self.i]
        self.i += 1
        if kind == "num":
            return Affine(Fraction(tok))
        if kind == "name":
            return Affine(Fraction(0), ((tok, Fraction(1)),))
        if tok == "-":
            return self.factor()._scale(Fraction(-1))
        if tok == "+":
            return self.factor()
        if tok == "(":
            out = self.expr()
            if self._peek() != ")":
                raise ExprError(f"{self.text!r} has an unclosed parenthesis")
            self.i += 1
            return out
        raise ExprError(f"{self.text!r} has {tok!r} where a number, a name or '(' should be")


def braces(text: str) -> list[Affine]:
    """Every brace expression of a size text, parsed (ExprError for a bad one or an unmatched brace)."""
    rest = _BRACE.sub("", text)
    if "{" in rest or "}" in rest:
        raise ExprError(f"{text!r} has an unmatched or nested brace")
    return [parse(m.group(1)) for m in _BRACE.finditer(text)]


def write(v: Fraction) -> str:
    """An integer as itself, else the shortest decimal that round-trips the float (never exponent notation)."""
    if v.denominator == 1:
        return str(v.numerator)
    return format(Decimal(repr(float(v))), "f")


def substitute(text: str, values: dict) -> str:
    """The size text with every brace replaced by its value."""
    return _BRACE.sub(lambda m: write(parse(m.group(1)).value(values)), text)
