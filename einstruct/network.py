"""The tensor network of a spec: the exact minimum x-y cut (connectivity is checked in einstruct.spec).

For the cut, axes are nodes with a capacity (split into an in- and an out-node), tensors (x, cores, y)
are nodes of unbounded capacity. The minimum x-y cut is the structural rank bound (THEORY 3); pairwise
tensor-tensor edges would count an axis shared by three tensors several times.

The max-flow is computed exactly, never in floating point: capacities are integers or Fractions that
add (exponents of d, for psi), or integer sizes that *multiply* along a cut (for the rank, whose
capacities are log(size)). In the multiplicative case the flow lives in the positive rationals under
multiplication, which log maps onto the reals under addition preserving order, so the augmenting-path
algorithm runs unchanged with product for sum, quotient for difference and 1 for zero. A float log
capacity leaves rounding residue in the residual graph, and the source side read from it can be a
wrong cut (issue 14: rank 1 for full-rank layers).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from fractions import Fraction


def min_cut(spec, capacity: Callable[[str], int | Fraction], *, product: bool = False) -> tuple:
    """Minimum x-y cut of ``spec`` (x, y, cores, axes) with axis capacities ``capacity(axis)``.

    Returns (value, the cut axes). ``product=False``: capacities add (integers or Fractions, >= 0) and
    value is their sum over the cut. ``product=True``: capacities are positive integer sizes that
    multiply, and value is the product of the cut axes' sizes (the rank bound). Exact either way.
    """
    return cut(spec.x, spec.y, [c.axes for c in spec.cores], capacity, product=product)


def cut(
    x: str,
    y: str,
    core_axes: Sequence[str],
    capacity: Callable[[str], int | Fraction],
    *,
    product: bool = False,
    sink_cores: Sequence[int] = (),
) -> tuple:
    """Minimum cut between x and y (together with the cores at positions ``sink_cores``).

    The value is the least total capacity of a set of axes whose removal leaves no path from x to y or
    to a sink core. See :func:`min_cut` for ``product``.
    """
    axes: list[str] = []
    for s in [x, y, *core_axes]:
        for a in s:
            if a not in axes:
                axes.append(a)
    # Node ids: 0 = source (x), 1 = sink (y and the sink cores), 2.. = the other cores, then in/out per axis.
    core_node = {}
    nxt = 2
    for i in range(len(core_axes)):
        if i in sink_cores:
            core_node[i] = 1
        else:
            core_node[i] = nxt
            nxt += 1
    in_node = {a: nxt + 2 * j for j, a in enumerate(axes)}
    n = nxt + 2 * len(axes)
    to: list[int] = []
    res: list = []  # residual capacity per edge, None = unbounded; edge e ^ 1 is its reverse
    adj: list[list[int]] = [[] for _ in range(n)]
    zero = Fraction(1) if product else 0

    def edge(u: int, v: int, c) -> None:
        adj[u].append(len(to))
        to.append(v)
        res.append(c)
        adj[v].append(len(to))
        to.append(u)
        res.append(zero)

    caps = {}
    for a in axes:
        c = capacity(a)
        caps[a] = Fraction(c) if product else c
        edge(in_node[a], in_node[a] + 1, caps[a])
    for node, s in [(0, x), (1, y)] + [(core_node[i], s) for i, s in enumerate(core_axes)]:
        for a in s:
            edge(node, in_node[a], None)
            edge(in_node[a] + 1, node, None)

    if product:
        positive = lambda r: r is None or r > 1
        take = lambda r, b: None if r is None else r / b
        give = lambda r, b: None if r is None else r * b
    else:
        positive = lambda r: r is None or r > 0
        take = lambda r, b: None if r is None else r - b
        give = lambda r, b: None if r is None else r + b

    def reach() -> list:
        """BFS over edges with residual capacity left: the predecessor edge of each reached node."""
        pred: list = [None] * n
        pred[0] = -1
        q = deque([0])
        while q:
            u = q.popleft()
            for e in adj[u]:
                v = to[e]
                if pred[v] is None and positive(res[e]):
                    pred[v] = e
                    if v == 1:
                        return pred
                    q.append(v)
        return pred

    while True:  # Edmonds-Karp: shortest augmenting paths, O(V E) augmentations whatever the capacities
        pred = reach()
        if pred[1] is None:
            break
        path = []
        v = 1
        while v != 0:
            e = pred[v]
            path.append(e)
            v = to[e ^ 1]
        finite = [res[e] for e in path if res[e] is not None]
        b = min(finite)  # every x-y path passes an axis edge or a reverse edge, so one is finite
        for e in path:
            res[e] = take(res[e], b)
            res[e ^ 1] = give(res[e ^ 1], b)
    side = [p is not None for p in pred]
    cut_axes = frozenset(a for a in axes if side[in_node[a]] and not side[in_node[a] + 1])
    value: int | Fraction = math.prod(int(caps[a]) for a in cut_axes) if product else sum(caps[a] for a in cut_axes)
    return value, cut_axes
