"""Spec: an einsum with sized axes, parsed and validated (no torch, no evaluation of input).

Syntax: ``"x_axes,core_axes,...->y_axes"`` in standard einsum letters. The first operand is the input
x, the others are the cores, the output is y. A core may be named with a ``name:`` prefix
(``"ga,R:gafr,L:fgre->fe"``) or with ``names=("R", "L")``; unnamed cores are ``G1, G2, ...`` by
position. Every axis needs a size (see :mod:`einstruct.sizes`), given as keyword arguments or
``sizes={...}``. Axes whose size is the constant 1 are dropped, and so are cores left with no axes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fractions import Fraction

from .errors import SpecError
from .sizes import Size, parse_size

MAX_CORES = 24
_MAX_EINSUM_CHARS = 4000  # x, 24 cores and y of up to 52 single-letter axes, with room for core names
_RESERVED = {"bias", "gains", "weight", "training", "forward", "plan", "structure", "spec"}
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class CoreSpec:
    """One learnable tensor of the spec: its name, position among the cores, and axes."""

    name: str
    index: int
    axes: str


@dataclass(frozen=True, init=False)
class Spec:
    """A structured linear map declared as an einsum with sized axes.

    >>> Spec("ga,gafr,fgre->fe", g="d_in^1/2", a="d_in^1/2", f="d_out^1/2", e="d_out^1/2", r=4)
    """

    x: str
    cores: tuple[CoreSpec, ...]
    y: str
    size_items: tuple[tuple[str, Size], ...]
    label: str = ""
    theta: tuple[Fraction, ...] | None = None
    notes: tuple[str, ...] = field(default=())

    def __init__(self, einsum, names=None, sizes=None, *, label: str = "", theta=None, **axis_sizes):
        x, cores, y = _parse_einsum(einsum, names)
        if not isinstance(label, str):
            raise SpecError(f"label= must be a string, got {type(label).__name__}")
        if sizes is not None and not isinstance(sizes, dict):
            raise SpecError(
                f"sizes= must be a dict of axis -> size, e.g. sizes={{'g': 'd_in^1/2'}}, got {type(sizes).__name__}"
            )
        given = dict(sizes or {})
        for k, v in axis_sizes.items():
            if k in given:
                raise SpecError(f"axis '{k}' is given a size twice (in sizes= and as a keyword); give it once")
            given[k] = v
        all_axes = _axes_in_order(x, cores, y)
        unknown = [k for k in given if k not in all_axes]
        if unknown:
            raise SpecError(
                f"size given for axis '{unknown[0]}', which is not in {einsum!r}; its axes are {', '.join(all_axes)}"
            )
        missing = [a for a in all_axes if a not in given]
        if missing:
            raise SpecError(
                f"axis '{missing[0]}' of {einsum!r} has no size; give one, e.g. "
                f"Spec({einsum!r}, {missing[0]}='d_in^1/2') or {missing[0]}=16"
            )
        parsed = {a: parse_size(given[a], a) for a in all_axes}
        # Drop constant-1 axes, then cores with no axes left (they are scalars, not cores).
        ones = {a for a, s in parsed.items() if s.is_one}
        strip = lambda s: "".join(c for c in s if c not in ones)
        kept = tuple(CoreSpec(c.name, c.index, strip(c.axes)) for c in cores)
        dropped = [c.name for c in kept if not c.axes]
        kept = tuple(c for c in kept if c.axes)
        notes = tuple(f"core {n} has only size-1 axes: a scalar, dropped" for n in dropped)
        x2, y2 = strip(x), strip(y)
        if not kept:
            raise SpecError(f"{einsum!r} has no core with an axis of size > 1; a structure needs at least one core")
        object.__setattr__(self, "x", x2)
        object.__setattr__(self, "cores", kept)
        object.__setattr__(self, "y", y2)
        object.__setattr__(self, "size_items", tuple((a, parsed[a]) for a in all_axes if a not in ones))
        object.__setattr__(self, "label", label)
        object.__setattr__(self, "theta", theta)
        object.__setattr__(self, "notes", notes)
        _validate(self, einsum)

    # ---- views -------------------------------------------------------------------------
    @property
    def sizes(self) -> dict[str, Size]:
        return dict(self.size_items)

    @property
    def einsum(self) -> str:
        return ",".join([self.x] + [c.axes for c in self.cores]) + "->" + self.y

    @property
    def axes(self) -> tuple[str, ...]:
        return tuple(a for a, _ in self.size_items)

    def role(self, axis: str) -> str:
        """'input', 'output', 'block' (in x and y) or 'bond' (in neither)."""
        return {(True, False): "input", (False, True): "output", (True, True): "block", (False, False): "bond"}[
            (axis in self.x, axis in self.y)
        ]

    def __str__(self) -> str:
        sz = ", ".join(f"{a}={s}" for a, s in self.size_items)
        named = ",".join([self.x] + [f"{c.name}:{c.axes}" for c in self.cores]) + "->" + self.y
        return f"{self.label + ' ' if self.label else ''}{named} [{sz}]"

    def __repr__(self) -> str:
        return f"Spec({str(self)!r})"


def _axes_in_order(x: str, cores, y: str) -> list[str]:
    seen: list[str] = []
    for s in [x] + [c.axes for c in cores] + [y]:
        for a in s:
            if a not in seen:
                seen.append(a)
    return seen


def _parse_einsum(einsum, names):
    if not isinstance(einsum, str):
        raise SpecError(f"the einsum must be a string such as 'ga,gafr,fgre->fe', got {type(einsum).__name__}")
    text = einsum.replace(" ", "")
    if len(text) > _MAX_EINSUM_CHARS:
        raise SpecError(
            f"the einsum is {len(text)} characters long, more than {_MAX_EINSUM_CHARS}; a structure has at most "
            f"{MAX_CORES} cores of single-letter axes, so shorten the core names or use fewer cores"
        )
    if text.count("->") != 1:
        raise SpecError(f"{einsum!r} needs exactly one '->' between the operands and the output, e.g. 'ga,gaf,fge->fe'")
    lhs, y = text.split("->")
    ops = lhs.split(",")
    if len(ops) < 2:
        raise SpecError(f"{einsum!r} has no core: write the input x first, then at least one core, e.g. 'i,io->o'")
    if len(ops) - 1 > MAX_CORES:
        raise SpecError(f"{einsum!r} has {len(ops) - 1} cores; at most {MAX_CORES} are supported")
    x = ops[0]
    if ":" in x:
        raise SpecError(f"the input x ('{x}') cannot be named; only cores take a 'name:' prefix")
    parsed_names, axes = [], []
    for op in ops[1:]:
        name = None
        if ":" in op:
            name, op = op.split(":", 1)
        parsed_names.append(name)
        axes.append(op)
    if names is not None:
        if isinstance(names, str) or not hasattr(names, "__len__"):
            raise SpecError(f"names= must be a list of core names, got {names!r}")
        if len(names) != len(axes):
            raise SpecError(f"names= has {len(names)} entries but {einsum!r} has {len(axes)} cores; give one per core")
        if any(n is not None for n in parsed_names):
            raise SpecError("name cores either with 'name:' prefixes or with names=, not both")
        parsed_names = list(names)
    final = [n if n is not None else f"G{i + 1}" for i, n in enumerate(parsed_names)]
    for n in final:
        if not isinstance(n, str) or not _NAME.match(n) or n in _RESERVED:
            raise SpecError(
                f"core name {n!r} is not allowed; use a Python identifier starting with a letter "
                f"(not one of {', '.join(sorted(_RESERVED))})"
            )
    if len(set(final)) != len(final):
        dup = next(n for n in final if final.count(n) > 1)
        raise SpecError(f"core name '{dup}' is used twice in {einsum!r}; core names must be unique")
    for label, s in [("the input x", x), ("the output y", y)] + [(f"core {n}", a) for n, a in zip(final, axes)]:
        bad = [c for c in s if not ("a" <= c <= "z" or "A" <= c <= "Z")]
        if bad:
            raise SpecError(
                f"{label} in {einsum!r} has the character {bad[0]!r}; axes are single letters a-z or A-Z "
                "(no digits, no '...')"
            )
        if not s:
            raise SpecError(f"{label} in {einsum!r} has no axes; every operand needs at least one axis")
        rep = [c for c in s if s.count(c) > 1]
        if rep:
            raise SpecError(
                f"{label} ('{s}') in {einsum!r} repeats axis '{rep[0]}'; diagonals are not linear-layer "
                "structures, use a distinct letter for each axis"
            )
    return x, tuple(CoreSpec(n, i, a) for i, (n, a) in enumerate(zip(final, axes))), y


def _validate(spec: Spec, einsum: str) -> None:
    """Structural checks: every axis has a job, the network is connected, x and y sizes add up."""
    core_axes = [c.axes for c in spec.cores]
    for a in spec.y:
        if a not in spec.x and not any(a in c for c in core_axes):
            raise SpecError(f"output axis '{a}' of {einsum!r} is made by no operand; add it to a core or drop it")
    for a in spec.x:
        if a not in spec.y and not any(a in c for c in core_axes):
            raise SpecError(
                f"input axis '{a}' of {einsum!r} is used by no core and is not in the output; "
                "add it to the core that reads it"
            )
    for c in spec.cores:
        for a in c.axes:
            users = (a in spec.x) + (a in spec.y) + sum(a in o for o in core_axes)
            if users < 2:
                raise SpecError(
                    f"axis '{a}' appears only in core {c.name} ('{c.axes}') of {einsum!r}: it would be summed "
                    "away inside the core; remove it or share it with another operand"
                )
    floating = floating_cores(spec)
    if floating:
        raise SpecError(
            f"core {floating[0]} of {einsum!r} is joined to neither the input nor the output (directly or "
            "through other cores): it is only a scalar factor; join it with a shared axis or remove it"
        )
    sizes = spec.sizes
    for label, axes, base in (("input", spec.x, "d_in"), ("output", spec.y, "d_out")):
        if not axes:
            raise SpecError(f"all {label} axes of {einsum!r} have size 1; the {label} needs an axis of size {base}")
        dep = [sizes[a] for a in axes if not sizes[a].is_constant]
        if dep:
            total = sum((s.exponent() for s in dep), Fraction(0))
            if abs(total - 1) > Fraction(1, 100):
                listing = ", ".join(f"{a}={sizes[a]}" for a in axes)
                raise SpecError(
                    f"the {label} axes of {einsum!r} ({listing}) multiply to d^{total}, not {base}: "
                    f"their exponents must add up to 1 (within 0.01)"
                )


def floating_cores(spec) -> list[str]:
    """Cores joined neither to x nor to y (directly or through other cores): scalar factors, not structure.

    x and y may lie in different components: that is a rank-1 map (e.g. low rank with rank 1). Found by
    spreading from the axes of x and y through the cores that share an axis (no graph library: parsing sits
    under the graph layer, einstruct.network).
    """
    reached = set(spec.x) | set(spec.y)
    joined: set[str] = set()
    grew = True
    while grew:
        grew = False
        for c in spec.cores:
            if c.name not in joined and reached.intersection(c.axes):
                joined.add(c.name)
                reached.update(c.axes)
                grew = True
    return [c.name for c in spec.cores if c.name not in joined]
