"""The compiler proper: compile(spec, d_in, d_out) -> Structure with sizes, chain plan, costs and muP numbers."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from . import analysis, network, plan, rules
from .errors import SpecError
from .limits import MAX_ELEMENTS, count, human_bytes
from .resolve import resolve
from .spec import Spec

MAX_DIM = 2**24


@dataclass(frozen=True)
class Core:
    """One core at its step of the chain (THEORY 4): a dense (d_out x d_in) matrix per batch index."""

    name: str
    index: int  # position in the spec
    axes: str
    shape: tuple[int, ...]
    step: plan.Step
    d_in: int  # product of contracted axes
    d_out: int  # product of produced axes
    batch: int  # product of batch (block) axes
    macs: int  # MACs of its step per example
    init_std: float
    kappa: float  # Adam learning-rate multiplier relative to a dense layer of the same shape
    kappa_sgd: float

    @property
    def params(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Structure:
    """A spec compiled for one layer size. Numbers are per example; see DESIGN.md for meanings."""

    spec: Spec
    d_in: int
    d_out: int
    d_in_padded: int
    d_out_padded: int
    size_items: tuple[tuple[str, int], ...]
    cores: tuple[Core, ...]  # execution order
    macs: int
    params: int
    rank: int
    max_intermediate: int  # largest activation (elements per example) the chain makes
    omega: float
    psi: float
    nu: float
    warnings: tuple[str, ...]

    @property
    def sizes(self) -> dict[str, int]:
        return dict(self.size_items)

    @property
    def flops(self) -> int:
        return rules.forward_flops(self.macs)

    @property
    def train_flops(self) -> int:
        return rules.train_flops(self.flops)

    @property
    def steps(self) -> tuple[plan.Step, ...]:
        return tuple(c.step for c in self.cores)

    @property
    def order(self) -> tuple[int, ...]:
        return tuple(c.index for c in self.cores)

    @property
    def padded(self) -> bool:
        return (self.d_in_padded, self.d_out_padded) != (self.d_in, self.d_out)

    def core(self, name: str) -> Core:
        for c in self.cores:
            if c.name == name:
                return c
        raise KeyError(f"no core named {name!r}; cores are {', '.join(c.name for c in self.cores)}")

    def table(self) -> str:
        from .table import format_table

        return format_table(self)

    def symbolic(self, square: bool | None = None) -> dict:
        """sympy expressions for the costs and per-core numbers (see :func:`einstruct.symbolic.symbolic`)."""
        from .symbolic import symbolic

        return symbolic(self, square=square)

    def __str__(self) -> str:
        return self.table()


def _dim(value, name: str) -> int:
    if isinstance(value, bool):
        raise SpecError(f"{name} must be a positive integer, got {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        raise SpecError(f"{name} must be a positive integer, got {value!r}") from None
    if n < 1 or n > MAX_DIM:
        raise SpecError(f"{name} = {n} is out of range; use an integer between 1 and {MAX_DIM}")
    return n


def compile(spec, d_in, d_out=None, *, pad_tolerance: float = 0.15) -> Structure:
    """Compile ``spec`` (a Spec or a preset name) for a layer R^d_in -> R^d_out (d_out defaults to d_in)."""
    if isinstance(spec, str):
        from . import presets

        spec = presets.get(spec)
    if not isinstance(spec, Spec):
        raise SpecError(
            f"compile() needs an es.Spec or a preset name such as 'btt', got {type(spec).__name__}; "
            "build one with es.Spec('ga,gaf,fge->fe', ...) or es.presets.btt(rank=1)"
        )
    d_in = _dim(d_in, "d_in")
    d_out = d_in if d_out is None else _dim(d_out, "d_out")
    if isinstance(pad_tolerance, bool) or not isinstance(pad_tolerance, (int, float)) or not 0 <= pad_tolerance <= 1:
        raise SpecError(f"pad_tolerance must be a number in [0, 1], got {pad_tolerance!r}")
    return _compile(spec, d_in, d_out, float(pad_tolerance))


@lru_cache(maxsize=2048)
def _compile(spec: Spec, d_in: int, d_out: int, pad_tolerance: float) -> Structure:
    res = resolve(spec, d_in, d_out, pad_tolerance)
    sizes = res.sizes
    warnings = list(spec.notes) + list(res.notes) + list(analysis.theta_warnings(spec.theta))
    # A core whose axes all resolve to 1 is a scalar at this size: it does not take part.
    cores = [c for c in spec.cores if any(sizes[a] > 1 for a in c.axes)]
    for c in spec.cores:
        if c not in cores:
            warnings.append(f"core {c.name} has all axes of size 1 at d_in={d_in}, d_out={d_out}: dropped")
    if not cores:
        raise SpecError(
            f"every core of {spec.einsum!r} has size 1 at d_in={d_in}, d_out={d_out}; use larger dimensions"
        )
    core_axes = [c.axes for c in cores]
    prod = lambda axes: math.prod(sizes[a] for a in axes)
    for c in cores:
        _check_elements(f"core {c.name} ('{c.axes}')", prod(c.axes), spec, d_in, d_out)
    chain = plan.cheapest_chain(spec.x, spec.y, core_axes, sizes)
    macs, order = chain.cost, chain.order
    if not chain.exact:
        warnings.append(
            f"the chain order comes from a heuristic: the exact search over orders of the {len(cores)} cores "
            f"stopped after {chain.states} subsets, so a cheaper order may exist (greedy cheapest next step, "
            "improved by moving single cores; see einstruct.plan)"
        )
    k = len(cores)
    out_cores = []
    applied: frozenset[int] = frozenset()
    max_inter = 0
    for i in order:
        st = plan.make_step(spec.x, spec.y, core_axes, applied, i)
        applied = applied | {i}
        cs = cores[i]
        fan_in, fan_out = prod(st.contracted), prod(st.produced)
        _check_elements(
            f"the activation after core {cores[i].name} (axes '{st.after}')", prod(st.after), spec, d_in, d_out
        )
        max_inter = max(max_inter, prod(st.after))
        out_cores.append(
            Core(
                name=cs.name,
                index=cs.index,
                axes=cs.axes,
                shape=tuple(sizes[a] for a in cs.axes),
                step=plan.Step(cs.index, st.before, st.after, st.contracted, st.produced, st.batch, st.carried),
                d_in=fan_in,
                d_out=fan_out,
                batch=prod(st.batch),
                macs=rules.step_macs(sizes[a] for a in plan.step_axes(st, core_axes)),
                init_std=rules.init_std(fan_in, fan_out),
                kappa=rules.kappa(fan_in, fan_out, d_in, d_out, k, "adam"),
                kappa_sgd=rules.kappa(fan_in, fan_out, d_in, d_out, k, "sgd"),
            )
        )
    sub = spec if len(cores) == len(spec.cores) else _subspec(spec, cores)
    # Exact: sizes multiply along a cut, so the max-flow runs on integer products (network docstring).
    cut_size, _ = network.min_cut(sub, lambda a: sizes[a], product=True)
    rank = min(cut_size, d_in, d_out)
    tax = analysis.taxonomy(spec)
    warnings.extend(tax.notes)
    return Structure(
        spec=spec,
        d_in=d_in,
        d_out=d_out,
        d_in_padded=res.d_in,
        d_out_padded=res.d_out,
        size_items=tuple(sizes.items()),
        cores=tuple(out_cores),
        macs=macs,
        params=sum(math.prod(c.shape) for c in out_cores),
        rank=rank,
        max_intermediate=max_inter,
        omega=float(tax.omega),
        psi=float(tax.psi),
        nu=float(tax.nu),
        warnings=tuple(warnings),
    )


def _check_elements(what: str, n: int, spec: Spec, d_in: int, d_out: int) -> None:
    if n > MAX_ELEMENTS:
        raise SpecError(
            f"{what} of {spec.einsum!r} has {count(n)} elements at d_in={d_in}, d_out={d_out} "
            f"({human_bytes(4 * n)} as float32), more than any tensor can hold (2^62); use smaller sizes"
        )


def _subspec(spec: Spec, cores) -> Any:
    """The spec without the cores that are scalars at this size (for the rank cut)."""
    from types import SimpleNamespace

    return SimpleNamespace(x=spec.x, y=spec.y, cores=tuple(cores), axes=spec.axes)
