"""The tensor network of a spec as a networkx graph: connectivity and the min-cut rank bound.

Axes are nodes with capacity log(size) (split into an in- and an out-node), tensors (x, cores, y) are
nodes of unbounded capacity. The minimum x-y cut is the structural rank bound (THEORY 3); pairwise
tensor-tensor edges would count an axis shared by three tensors several times.
"""

from __future__ import annotations

from collections.abc import Callable

import networkx as nx
from networkx.algorithms.flow import edmonds_karp

X, Y = "<x>", "<y>"


def graph(spec) -> nx.Graph:
    """Undirected bipartite graph: tensor nodes ('<x>', '<y>', core names) and axis nodes ('axis:a')."""
    g = nx.Graph()
    operands = [(X, spec.x), (Y, spec.y)] + [(c.name, c.axes) for c in spec.cores]
    for node, axes in operands:
        g.add_node(node, kind="tensor")
        for a in axes:
            g.add_node(f"axis:{a}", kind="axis", axis=a)
            g.add_edge(node, f"axis:{a}")
    return g


def floating_cores(spec) -> list[str]:
    """Cores joined neither to x nor to y (directly or through other cores): scalar factors, not structure.

    x and y may lie in different components: that is a rank-1 map (e.g. low rank with rank 1).
    """
    g = graph(spec)
    anchored = nx.node_connected_component(g, X) | nx.node_connected_component(g, Y)
    return [c.name for c in spec.cores if c.name not in anchored]


def min_cut(spec, capacity: Callable[[str], float]) -> tuple[float, frozenset[str]]:
    """Minimum x-y cut with axis capacities ``capacity(axis)``; returns (value, the cut axes)."""
    flow = nx.DiGraph()
    operands = [(X, spec.x), (Y, spec.y)] + [(c.name, c.axes) for c in spec.cores]
    for a in spec.axes:
        flow.add_edge(("in", a), ("out", a), capacity=float(capacity(a)))
    for node, axes in operands:
        for a in axes:
            flow.add_edge(node, ("in", a))  # no capacity attribute: unbounded
            flow.add_edge(("out", a), node)
    value, (source_side, _) = nx.minimum_cut(flow, X, Y, flow_func=edmonds_karp)  # fastest on these tiny graphs
    cut = frozenset(a for a in spec.axes if ("in", a) in source_side and ("out", a) not in source_side)
    return value, cut
