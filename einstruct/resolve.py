"""Integer axis sizes at (d_in, d_out): exact factorisation, padding when it must, bonds rounded.

Input axes multiply to d_in and output axes to d_out exactly (THEORY 2). Among the exact splits we take
the one minimising sum_i (log f_i - log t_i)^2 over the fitted axes (t_i the real target size), ties to
the larger factor on the earlier axis. Integer sizes are taken as given. If the best exact split misses a
target by more than a factor of 2, d_in (or d_out) is padded up to the nearest size whose split is within
it, refused beyond ``pad_tolerance``. Bond axes (in neither x nor y) round half up, at least 1.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from functools import lru_cache

from .errors import SpecError

_EPS = 1e-9
_LOG2 = math.log(2.0)
_MAX_PAIRS = 4000


@dataclass(frozen=True)
class Resolution:
    sizes: dict
    d_in: int  # padded (== the layer's d_in when no padding was needed)
    d_out: int
    notes: tuple[str, ...]


def divisors(n: int) -> tuple[int, ...]:
    small, large = [], []
    i = 1
    while i * i <= n:
        if n % i == 0:
            small.append(i)
            if i * i != n:
                large.append(n // i)
        i += 1
    return tuple(small + large[::-1])


@lru_cache(maxsize=4096)
def best_split(n: int, logt: tuple[float, ...]) -> tuple[float, tuple[int, ...]] | None:
    """Best ordered factorisation of n into len(logt) factors (error, factors); None if impossible."""
    k = len(logt)
    if k == 0:
        return (0.0, ()) if n == 1 else None
    if k == 1:
        return ((math.log(n) - logt[0]) ** 2, (n,))
    best: tuple | None = None
    for f in reversed(divisors(n)):  # larger first, so ties keep the larger factor on the earlier axis
        head = (math.log(f) - logt[0]) ** 2
        if best is not None and head > best[0] + _EPS:
            continue
        rest = best_split(n // f, logt[1:])
        if rest is None:
            continue
        err = head + rest[0]
        if best is None or err < best[0] - _EPS:
            best = (err, (f,) + rest[1])
    return best


def _worst_miss(factors, logt) -> float:
    return max((abs(math.log(f) - t) for f, t in zip(factors, logt)), default=0.0)


def resolve(spec, d_in: int, d_out: int, pad_tolerance: float = 0.15) -> Resolution:
    sizes = spec.sizes
    x, y = spec.x, spec.y
    fixed = {a: int(s.coef) for a, s in sizes.items() if s.is_constant}
    target = {a: math.log(s.value(d_in, d_out)) for a, s in sizes.items() if not s.is_constant}
    block = [a for a in x if a in y and a in target]
    xs = [a for a in x if a not in y and a in target]
    ys = [a for a in y if a not in x and a in target]
    fx = math.prod(fixed[a] for a in x if a in fixed)
    fy = math.prod(fixed[a] for a in y if a in fixed)

    for label, axes, f, n, base in (("input", x, fx, d_in, "d_in"), ("output", y, fy, d_out, "d_out")):
        if all(a in fixed for a in axes) and f != n:
            listing = ", ".join(f"{a}={fixed[a]}" for a in axes)
            raise SpecError(
                f"the {label} axes ({listing}) multiply to {f}, not {base}={n}; integer sizes are taken as given, "
                f"so give axis '{axes[0]}' a size in {base}, e.g. '{base}/{f // fixed[axes[0]]}'"
            )

    def fit(pin: int, pout: int):
        """Best (error, {axis: size}) at padded dims, or None when no exact split exists."""
        if pin % fx or pout % fy:
            return None
        nin, nout = pin // fx, pout // fy
        best = None
        for bvals in _block_values(nin, nout, tuple(target[a] for a in block)):
            pb = math.prod(bvals)
            sx = best_split(nin // pb, tuple(target[a] for a in xs))
            sy = best_split(nout // pb, tuple(target[a] for a in ys))
            if sx is None or sy is None:
                continue
            err = sum((math.log(v) - target[a]) ** 2 for a, v in zip(block, bvals)) + sx[0] + sy[0]
            if best is None or err < best[0] - _EPS:
                best = (err, {**dict(zip(block, bvals)), **dict(zip(xs, sx[1])), **dict(zip(ys, sy[1]))})
        return best

    def ok(result) -> bool:
        return result is not None and all(abs(math.log(v) - target[a]) <= _LOG2 + _EPS for a, v in result[1].items())

    notes: list[str] = []
    lim_in = math.floor(d_in * (1 + pad_tolerance))
    lim_out = math.floor(d_out * (1 + pad_tolerance))
    if block:
        candidates = _pad_pairs(d_in, d_out, lim_in, lim_out)
    else:  # the two sides are independent: pad each alone to its nearest good size

        def first(lo, hi, good):
            return next((p for p in range(lo, hi + 1) if good(p)), None)

        def side_ok(p, f, axes):
            if p % f:
                return False
            logt = tuple(target[a] for a in axes)
            split = best_split(p // f, logt)
            return split is not None and _worst_miss(split[1], logt) <= _LOG2 + _EPS

        pin = first(d_in, lim_in, lambda p: side_ok(p, fx, xs))
        pout = first(d_out, lim_out, lambda p: side_ok(p, fy, ys))
        candidates = [(pin, pout)] if pin is not None and pout is not None else []
    result = None
    for i, (pin, pout) in enumerate(candidates):
        if i >= _MAX_PAIRS:
            break
        r = fit(pin, pout)
        if ok(r):
            result = r
            break
    if result is None:
        want = ", ".join(f"{a}~{math.exp(t):.3g}" for a, t in target.items() if a in x or a in y)
        raise SpecError(
            f"cannot split d_in={d_in}, d_out={d_out} into axis sizes near their targets ({want}) without "
            f"padding more than {pad_tolerance:.0%}; choose dimensions with more small factors "
            f"(e.g. multiples of 64) or raise pad_tolerance"
        )
    for base, n, p in (("d_in", d_in, pin), ("d_out", d_out, pout)):
        if p != n:
            notes.append(f"{base} padded {n} -> {p} (+{(p - n) / n:.1%}) so its axes split near their targets")
    out = dict(fixed)
    out.update(result[1] if result else {})
    for a, s in sizes.items():
        if a not in x and a not in y and a not in fixed:
            out[a] = max(1, math.floor(s.value(d_in, d_out) + 0.5))
    return Resolution({a: out[a] for a in sizes}, pin, pout, tuple(notes))


def _block_values(nin: int, nout: int, logt: tuple[float, ...]):
    """All assignments of the fitted block axes (in x and y) to common divisors of nin and nout."""
    if not logt:
        yield ()
        return
    common = divisors(math.gcd(nin, nout))
    for f in common:
        for rest in _block_values(nin // f, nout // f, logt[1:]):
            yield (f,) + rest


def _pad_pairs(d_in, d_out, lim_in, lim_out):
    """Padded (d_in, d_out) pairs for coupled specs (fitted block axes), smallest product first."""
    heap = [(d_in * d_out, d_in, d_out)]
    seen = {(d_in, d_out)}
    while heap:
        _, a, b = heapq.heappop(heap)
        yield a, b
        for na, nb in ((a + 1, b), (a, b + 1)):
            if na <= lim_in and nb <= lim_out and (na, nb) not in seen:
                seen.add((na, nb))
                heapq.heappush(heap, (na * nb, na, nb))
