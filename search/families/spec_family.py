"""A family written in einstruct's spec language with free parameters in braces (a space file's ``[families.X]``).

    spec = "abc,adr,besr,cfs->def"
    sizes = { a = "d_in^1/3", ..., r = "{rank}", s = "{rank}" }
    params = { rank = [1, 2, 4] }                  # a list: categorical
    params = { x = { low = 0.25, high = 0.75 } }    # a float range; int = true for integers

Optuna parameters are named ``<family>.<parameter>`` so that families never share one. A point whose sizes do
not make a valid Spec (SpecError) is rejected before training, at zero cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import einstruct as es

from .affine import ExprError, braces, substitute
from .base import Family


class FamilyError(ValueError):
    """A family definition that cannot work; the message names the key, the caller adds file and family."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Param:
    name: str
    choices: tuple | None = None  # categorical
    low: float | None = None
    high: float | None = None
    integer: bool = False

    def suggest(self, trial, key: str):
        if self.choices is not None:
            return trial.suggest_categorical(key, list(self.choices))
        if self.integer:
            return trial.suggest_int(key, int(self.low), int(self.high))
        return trial.suggest_float(key, float(self.low), float(self.high))

    def random(self, rng):
        if self.choices is not None:
            return rng.choice(self.choices)
        if self.integer:
            return rng.randint(int(self.low), int(self.high))
        return self.low + (self.high - self.low) * rng.random()

    def check(self, v):
        """The value as this parameter holds it, or ValueError."""
        if isinstance(v, bool):
            raise ValueError(f"{v!r} is not a number")
        if self.choices is not None:
            if v not in self.choices:
                raise ValueError(f"{v!r} is not one of {list(self.choices)}")
            return v
        x = float(v)
        if not self.low <= x <= self.high:
            raise ValueError(f"{v!r} is outside [{self.low:g}, {self.high:g}]")
        return int(x) if self.integer else x


def parse_param(name: str, raw) -> Param:
    key = f"params.{name}"
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    if isinstance(raw, list):
        if not raw or not all(num(v) for v in raw):
            raise FamilyError(key, "a list of choices must hold one or more numbers, e.g. [1, 2, 4]")
        if len(set(raw)) != len(raw):
            raise FamilyError(key, f"the choices {raw} repeat a value")
        return Param(name, choices=tuple(raw))
    if isinstance(raw, dict):
        extra = set(raw) - {"low", "high", "int"}
        if extra:
            raise FamilyError(key, f"unknown key {sorted(extra)[0]!r}; a range has low, high and optionally int = true")
        if not (num(raw.get("low")) and num(raw.get("high"))):
            raise FamilyError(key, "a range needs numbers low and high, e.g. { low = 0.25, high = 0.75 }")
        integer = raw.get("int", False)
        if not isinstance(integer, bool):
            raise FamilyError(key, "int must be true or false")
        low, high = raw["low"], raw["high"]
        if low >= high:
            raise FamilyError(key, f"low = {low} must be below high = {high}")
        if integer and not (float(low).is_integer() and float(high).is_integer()):
            raise FamilyError(key, "an int range needs whole-number low and high")
        return Param(name, low=low, high=high, integer=integer)
    raise FamilyError(key, "give a list of choices [1, 2, 4] or a range { low = 0.25, high = 0.75 }")


class SpecFamily(Family):
    """A family from a spec with brace parameters (see the module docstring)."""

    def __init__(self, name: str, spec: str, sizes: dict, params: dict, label: str = "", group: str = ""):
        self.name, self.spec_text, self.sizes = name, spec, dict(sizes)
        self.params = tuple(parse_param(k, v) for k, v in params.items())
        self.keys = tuple(p.name for p in self.params)
        self.label = label or name
        self.group = group or self.label
        self.continuous = any(p.choices is None and not p.integer for p in self.params)
        self._refs: tuple[dict, ...] = ()
        used = set()
        for axis, text in self.sizes.items():
            if isinstance(text, bool) or not isinstance(text, (str, int)):
                raise FamilyError(f"sizes.{axis}", f"{text!r} is not a size; write 32, 'd_in^1/2' or 'd_in^{{x}}'")
            try:
                for e in braces(str(text)):
                    unknown = [n for n in e.names if n not in self.keys]
                    if unknown:
                        declared = ", ".join(self.keys) or "none"
                        raise FamilyError(
                            f"sizes.{axis}",
                            f"{{{unknown[0]}}} names no parameter (declared: {declared}); add it to params",
                        )
                    used.update(e.names)
            except ExprError as e:
                raise FamilyError(f"sizes.{axis}", str(e)) from None
        unused = [k for k in self.keys if k not in used]
        if unused:
            raise FamilyError(f"params.{unused[0]}", "is used in no size; use it in a brace or remove it")
        try:  # the spec itself, at the first point of every parameter
            self.build({p.name: p.choices[0] if p.choices else p.low for p in self.params})
        except es.SpecError as e:
            raise FamilyError("spec", str(e)) from None

    def _key(self, p: Param) -> str:
        return f"{self.name}.{p.name}"

    def suggest(self, trial):
        return {p.name: p.suggest(trial, self._key(p)) for p in self.params}

    def params_for(self, args):
        return {self._key(p): args[p.name] for p in self.params}

    def random_params(self, rng):
        return {self._key(p): p.random(rng) for p in self.params}

    def normalize(self, args):
        args = super().normalize(args)
        out = {}
        for p in self.params:
            try:
                out[p.name] = p.check(args[p.name])
            except (TypeError, ValueError) as e:
                raise FamilyError(p.name, f"{e}") from None
        return out

    def build(self, args):
        sizes = {a: substitute(str(t), args) for a, t in self.sizes.items()}
        return es.Spec(self.spec_text, label=self.structure_label(args), **sizes)

    def set_references(self, refs: tuple[dict, ...]) -> None:
        self._refs = tuple(self.normalize(r) for r in refs)

    def references(self):
        return self._refs

    def cheap_points(self):
        grid = [{}]
        for p in self.params:  # every combination of choices (at most 64 kept), range ends
            values = p.choices if p.choices is not None else (p.low, p.high)
            grid = [{**g, p.name: v} for g in grid for v in values][:64]
        return tuple(grid)
