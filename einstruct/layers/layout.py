"""Memory layouts of a compiled chain: the cost model and :func:`plan_chain` (torch-free).

Each step of the chain permutes the running activation to ``(batch, rows, contracted)`` (or
``(batch, contracted, rows)``), reshapes it to a matrix per batch index, and multiplies it with the core
reshaped to ``(batch, contracted, produced)``: one ``mm``/``bmm`` per core. Rows are the leading dimensions
of the input times the axes the core is shared across. The memory order of every intermediate, and the form
of each matmul, are chosen by a small dynamic programme over the steps that minimises a measured cost of the
permute copies and matmul forms, so consecutive steps reuse each other's layout where they can. The
prices are a per-device table (:mod:`einstruct.layers.costs`); the default is the CPU one.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from ..compiler import Structure
from .costs import CPU, CostTable

ROWS = "#"  # the flattened leading dimensions of the input, as a pseudo-axis of the layout
_MAX_PERMUTED = 4  # groups up to this many axes are tried in every order when planning layouts
# What a copy and a matmul form cost is the device's CostTable (einstruct.layers.costs). On CPU (one
# thread, float32, 1024 rows) a permute copy runs at about memory speed (copy 2 per element) when it moves
# contiguous runs of >= 16 elements or when the axes it reorders form blocks that fit in cache (e.g.
# within one example); otherwise it scatters (5). A matmul in any form but (rows, K) @ (K, P) costs about
# half a copy of its input more (form 1), and the forms differ in speed in proportion to their
# multiply-adds (fwd + both grads; 2 threads, over a grid of (M, K, P), and on whole layers): with both the
# activation and the output transposed, (P, M) = core (P, K) @ act (K, M), a step runs 1.3-2.5x slower than
# the plain form; with one of them transposed, up to 1.4x slower when M carries axes besides the input rows
# (its leading dimension is then rows * batch), and about as fast when M is the input rows alone (the BTT
# steps). Extra cost per multiply-add: table.mac * table.slowdown(form, M carries axes).
_CONTIGUOUS_RUN = 16
_CACHE_BLOCK = 16384
_ROWS_HINT = 256  # the batch is unknown when planning; assume at least this many rows
# Tie-break between the three other matmul forms (act_kr, core_left).
_FORM_ORDER = {(False, False): 0, (True, True): 1, (False, True): 2, (True, False): 3}


@dataclass(frozen=True)
class LayoutStep:
    """One matmul of the chain with every permutation and shape fixed; ``None`` in a shape is the batch."""

    core: str
    act_perm: tuple[int, ...] | None  # permute the activation first (None: its layout is already right)
    act_shape: tuple[int | None, ...]  # (B?, M, K) or (B?, K, M); None stands for batch * rows
    rows: int  # elements of M per input row (product of the carried axes)
    act_kr: bool  # the activation matrix is laid out (K, M)
    core_perm: tuple[int, ...] | None
    core_shape: tuple[int, ...]  # (B?, K, P), or (B?, P, K) when core_left
    core_left: bool  # output (B?, P, M) = core @ act, else (B?, M, P) = act @ core
    out_shape: tuple[int | None, ...]  # full shape of the output layout; None stands for the batch


@dataclass(frozen=True)
class ChainLayout:
    steps: tuple[LayoutStep, ...]
    in_shape: tuple[int | None, ...]
    final_perm: tuple[int, ...] | None
    fuse_bias: bool  # the last step is a plain 2-D (rows, K) @ core giving y itself: bias goes in via addmm
    cost: float  # planned cost per example of the copies and matmul forms (units of the device's CostTable)


def inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    """The permutation that undoes ``perm``."""
    return tuple(sorted(range(len(perm)), key=perm.__getitem__))


def fill(shape: tuple, value: int) -> tuple[int, ...]:
    """``shape`` with its batch placeholder (one None) replaced by ``value`` (runs per call: kept cheap)."""
    i = shape.index(None)
    return (*shape[:i], value, *shape[i + 1 :])


def _perm(src: tuple, dst: tuple) -> tuple[int, ...] | None:
    p = tuple(src.index(a) for a in dst)
    return None if p == tuple(range(len(p))) else p


def _orders(axes: tuple) -> list[tuple]:
    """Orders of a group to try; the given order first."""
    return list(itertools.permutations(axes)) if len(axes) <= _MAX_PERMUTED else [axes]


def plan_chain(st: Structure, plain: bool = False, costs: CostTable = CPU) -> ChainLayout:
    """Lay out the compiled chain: memory order of each intermediate and matmul forms of least cost.

    ``plain=True`` allows only the plain form (rows, K) @ (K, P), as torch.einsum lays out its bmm;
    ``costs`` is the device's price table (``einstruct.layers.costs.cost_table(device_type)``).
    """
    transposes = (False,) if plain else (False, True)
    sizes = st.sizes

    def big(axes) -> tuple:
        return tuple(a for a in axes if sizes[a] > 1)

    def elems(layout) -> int:
        return math.prod(sizes[a] for a in layout if a != ROWS)

    def extent(axes) -> int:
        return math.prod(_ROWS_HINT if a == ROWS else sizes[a] for a in axes)

    def copy_cost(src, dst) -> float:
        if src == dst:
            return 0
        keep = 0  # outer axes that stay in place split the copy into independent blocks
        while src[keep] == dst[keep]:
            keep += 1
        run = 0  # inner axes that stay in place are copied as contiguous runs
        while src[len(src) - 1 - run] == dst[len(dst) - 1 - run]:
            run += 1
        fast = extent(src[keep:]) <= _CACHE_BLOCK or extent(src[len(src) - run :]) >= _CONTIGUOUS_RUN
        return elems(src) * (costs.copy if fast else costs.scattered)

    # frontier: layout -> (cost, tie-break, choices so far); the first found wins ties (deterministic)
    frontier: dict[tuple, tuple] = {(ROWS,) + big(st.spec.x): (0, 0, ())}
    for core in st.cores:
        s = core.step
        groups = big(s.batch), big(s.contracted), (ROWS,) + big(s.carried), big(s.produced)
        nxt: dict[tuple, tuple] = {}
        for layout, (cost, pen, hist) in frontier.items():
            b, k, r0 = (tuple(a for a in layout if a in g) for g in groups[:3])
            for r in _orders(r0):
                for act_kr in transposes:
                    arr = b + (k + r if act_kr else r + k)
                    c = cost + copy_cost(layout, arr)
                    for core_left in transposes:
                        form = _FORM_ORDER[(act_kr, core_left)]
                        for p in _orders(groups[3]):
                            out = b + (p + r if core_left else r + p)
                            slow = costs.slowdown(act_kr, core_left, len(r) > 1)  # r holds ROWS: > 1 carries
                            step_cost = elems(arr) * costs.form + round(costs.mac * slow * elems(arr) * elems(p))
                            key = (c + (step_cost if form else 0), pen + form)
                            if out not in nxt or key < nxt[out][:2]:
                                nxt[out] = (*key, hist + ((layout, arr, act_kr, core_left, b, r, k, p, out),))
        frontier = nxt
    final = (ROWS,) + big(st.spec.y)
    layout, (cost, _, hist) = min(frontier.items(), key=lambda kv: (kv[1][0] + copy_cost(kv[0], final), kv[1][1]))
    steps = []
    for core, (src, arr, act_kr, core_left, b, r, k, p, out) in zip(st.cores, hist):
        bsz, ksz, psz = (math.prod(sizes[a] for a in g) for g in (b, k, p))
        lead = (bsz,) if b else ()
        ones = tuple(a for a in core.axes if sizes[a] == 1)
        core_order = ones + b + (p + k if core_left else k + p)
        steps.append(
            LayoutStep(
                core=core.name,
                act_perm=_perm(src, arr),
                act_shape=lead + ((ksz, None) if act_kr else (None, ksz)),
                rows=elems(r),
                act_kr=act_kr,
                core_perm=_perm(tuple(core.axes), core_order),
                core_shape=lead + ((psz, ksz) if core_left else (ksz, psz)),
                core_left=core_left,
                out_shape=tuple(None if a == ROWS else sizes[a] for a in out),
            )
        )
    in_layout = (ROWS,) + big(st.spec.x)
    return ChainLayout(
        steps=tuple(steps),
        in_shape=tuple(None if a == ROWS else sizes[a] for a in in_layout),
        final_perm=_perm(layout, final),
        fuse_bias=len(steps[-1].core_shape) == 2
        and steps[-1].rows == 1
        and not steps[-1].core_left
        and layout == final,
        cost=cost + copy_cost(layout, final),
    )
