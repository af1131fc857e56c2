"""The contraction plan: the cheapest chain in which the activation meets one core per step (THEORY 4).

Cores are never merged with each other. Once the cores in a set S have been applied, the activation
holds act(S) = (x's axes, or an axis of a core in S) and (y's axes, or an axis of a core not in S), and
applying core i costs the product of the sizes of act(S) and i's axes. The cheapest order, ties broken
by the order of the cores in the spec (the lexicographically smallest sequence of spec positions), is a
shortest path through the subsets of cores: a dynamic program over subsets, layer by layer.

:func:`cheapest_chain` keeps that program exact but prunes it (branch and bound):

- a seed chain: the greedy one (cheapest next step, ties to the earlier core), improved by moving one
  core at a time while that makes the chain cheaper;
- a lower bound for the cost still to come: the sum over the remaining cores i of L_i, the least cost
  i's step can have in any chain (i's axes times a minimum cut between x and (y, i) over the other
  axes, :func:`step_bounds`). A subset whose cost so far plus that bound exceeds the seed's cost (or
  equals it with a sequence after the seed's in spec order) is dropped; so is a subset reached again by a
  prefix that is not cheaper (or as cheap and later in spec order).

For a tensor train or a butterfly L_i is the cost of i's step in the best chain, so only the subsets on
optimal chains survive: a 16-core tensor train of equal sizes keeps 16 subsets, one of random sizes up
to about 12,000 (measured). The program has at most 2^k subsets, so every spec of up to 16 cores
(``MAX_STATES`` = 2^16) is searched exactly. Above that the search stops once it has kept
``MAX_STATES`` subsets and returns the seed with ``exact=False`` (the compiler says so in
``st.warnings``). The problem is a left-deep join ordering with outer (cross) products allowed, and
join orderings of this kind are NP-hard in general, so no exact method is fast for every spec.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from . import network

MAX_STATES = 1 << 16  # subsets the exact search may keep: every spec of up to 16 cores fits


@dataclass(frozen=True)
class Step:
    """One batched matmul of the chain: activation (axes ``before``) times one core -> ``after``.

    contracted: in the activation and the core, summed away here (the core's fan-in);
    produced: in the core only (its fan-out); batch: in both and kept (block axes of the core);
    carried: in the activation only (the rows the core is shared across).
    """

    core: int  # position of the core in spec.cores
    before: str
    after: str
    contracted: str
    produced: str
    batch: str
    carried: str


@dataclass(frozen=True)
class Chain:
    """A chain order and its cost; ``exact`` is False when the search stopped at its node budget."""

    cost: int
    order: tuple[int, ...]
    exact: bool
    states: int  # subsets the search kept


def activation(x: str, y: str, core_axes: list[str], applied: frozenset[int]) -> str:
    """Axes of the running activation once the cores in ``applied`` have been met (x's order first)."""
    have = x + "".join(core_axes[i] for i in sorted(applied))
    need = set(y).union(*(set(core_axes[i]) for i in range(len(core_axes)) if i not in applied))
    out = []
    for a in have:
        if a in need and a not in out:
            out.append(a)
    return "".join(out)


def make_step(x: str, y: str, core_axes: list[str], applied: frozenset[int], i: int) -> Step:
    before = activation(x, y, core_axes, applied)
    after = activation(x, y, core_axes, applied | {i})
    c = core_axes[i]
    return Step(
        core=i,
        before=before,
        after=after,
        contracted="".join(a for a in c if a in before and a not in after),
        produced="".join(a for a in c if a not in before),
        batch="".join(a for a in c if a in before and a in after),
        carried="".join(a for a in before if a not in c),
    )


def step_axes(step: Step, core_axes: list[str]) -> set[str]:
    """Every axis that takes part in the step: its cost is the product of their sizes."""
    return set(step.before) | set(core_axes[step.core])


class _Net:
    """Bit masks of a chain problem: axes as bits, ``weight`` per axis combined by product or by sum."""

    def __init__(self, x: str, y: str, core_axes: Sequence[str], weight: Mapping[str, int], product: bool):
        names: list[str] = []
        for s in [x, y, *core_axes]:
            for a in s:
                if a not in names:
                    names.append(a)
        bit = {a: 1 << j for j, a in enumerate(names)}
        self.k = len(core_axes)
        self.x = sum(bit[a] for a in set(x))
        self.y = sum(bit[a] for a in set(y))
        self.core = [sum(bit[a] for a in set(c)) for c in core_axes]
        self.product = product
        # Tables per 8 bits: the combined weight of every byte pattern, so measuring a mask is a few lookups.
        w = [weight[a] for a in names]
        self.tables = []
        for lo in range(0, len(names), 8):
            chunk = w[lo : lo + 8]
            table = [1 if product else 0] * (1 << len(chunk))
            for v in range(1, len(table)):
                low = (v & -v).bit_length() - 1
                rest = table[v & (v - 1)]
                table[v] = rest * chunk[low] if product else rest + chunk[low]
            self.tables.append(table)

    def measure(self, mask: int) -> int:
        tables = self.tables
        j = 0
        if self.product:
            out = 1
            while mask:
                out *= tables[j][mask & 255]
                mask >>= 8
                j += 1
        else:
            out = 0
            while mask:
                out += tables[j][mask & 255]
                mask >>= 8
                j += 1
        return out

    def act(self, applied: int) -> int:
        """Axis mask of the activation after the cores in the bit set ``applied``."""
        done = rest = 0
        for i, m in enumerate(self.core):
            if applied >> i & 1:
                done |= m
            else:
                rest |= m
        return (self.x | done) & (self.y | rest)

    def steps(self, order: Sequence[int]) -> list[int]:
        """The cost of every step of a chain."""
        suffix = [0] * (len(order) + 1)
        for t in range(len(order) - 1, -1, -1):
            suffix[t] = suffix[t + 1] | self.core[order[t]]
        done = 0
        out = []
        for t, i in enumerate(order):
            act = (self.x | done) & (self.y | suffix[t])
            out.append(self.measure(act | self.core[i]))
            done |= self.core[i]
        return out


def step_bounds(x: str, y: str, core_axes: Sequence[str], weight: Mapping[str, int], *, product: bool) -> list[int]:
    """For each core, the least cost its step can have in any chain (exact; see the module docstring).

    The activation core i meets is act(S) for some S without i, and act(S) with i's axes removed is a
    set of axes separating x from y and i; so the step costs at least i's own axes times that min cut.
    """
    out = []
    for i, c in enumerate(core_axes):
        own = set(c)
        if product:
            value, _ = network.cut(x, y, core_axes, _outside(own, weight, 1), product=True, sink_cores=(i,))
            for a in own:
                value *= weight[a]
        else:
            value, _ = network.cut(x, y, core_axes, _outside(own, weight, 0), sink_cores=(i,))
            value += sum(weight[a] for a in own)
        out.append(value)
    return out


def _outside(own: set, weight: Mapping, inside: int) -> Callable[[str], int]:
    """Axis weights with the axes of ``own`` set to ``inside`` (free to cut through one's own core)."""
    return lambda a: inside if a in own else weight[a]


def _greedy(net: _Net) -> tuple[int, ...]:
    """Cheapest next step each time, ties to the earlier core."""
    done, applied, order = 0, 0, []
    for _ in range(net.k):
        rest = 0
        for i, m in enumerate(net.core):
            if not applied >> i & 1:
                rest |= m
        act = (net.x | done) & (net.y | rest)
        # the cheapest step; min over (cost, index) breaks ties to the earlier core
        _, pick = min((net.measure(act | net.core[i]), i) for i in range(net.k) if not applied >> i & 1)
        order.append(pick)
        applied |= 1 << pick
        done |= net.core[pick]
    return tuple(order)


def _improve(net: _Net, order: tuple[int, ...], key) -> tuple[int, ...]:
    """Move single cores to other positions while that lowers ``key(steps, order)`` (at most 4k passes)."""
    best = key(net.steps(order), order)
    better = True
    for _ in range(4 * len(order)):
        if not better:
            break
        better = False
        for p in range(len(order)):
            for q in range(len(order)):
                if p == q:
                    continue
                moved = list(order)
                moved.insert(q, moved.pop(p))
                cand = tuple(moved)
                k = key(net.steps(cand), cand)
                if k < best:
                    best, order, better = k, cand, True
    return order


def _frontier(net: _Net, layer: dict, keep, room: int) -> dict | None:
    """One layer of the search: every subset one core larger than those in ``layer`` that ``keep`` admits.

    ``layer`` maps a bit set of applied cores to (cost so far, sequence, axes of its cores, bound);
    ``keep(g, cost, seq, i, bound)`` returns the new (cost, bound) or None to drop the child.
    Among the sequences reaching a subset the least (cost, sequence) is kept. None when more than
    ``room`` subsets would be kept.
    """
    out: dict = {}
    for applied, (g, seq, done, h) in layer.items():
        rest = 0
        for i, m in enumerate(net.core):
            if not applied >> i & 1:
                rest |= m
        act = (net.x | done) & (net.y | rest)
        for i in range(net.k):
            if applied >> i & 1:
                continue
            s2 = seq + (i,)
            kept = keep(g, net.measure(act | net.core[i]), s2, i, h)
            if kept is None:
                continue
            t = applied | 1 << i
            old = out.get(t)
            if old is None:
                if len(out) >= room:
                    return None
                out[t] = (kept[0], s2, done | net.core[i], kept[1])
            elif (kept[0], s2) < (old[0], old[1]):
                out[t] = (kept[0], s2, done | net.core[i], kept[1])
    return out


def cheapest_chain(
    x: str, y: str, core_axes: Sequence[str], sizes: Mapping[str, int], *, max_states: int | None = None
) -> Chain:
    """The cheapest chain order (total MACs per example), ties to spec order; exact unless ``exact=False``.

    ``max_states`` defaults to ``MAX_STATES``.
    """
    k = len(core_axes)
    max_states = MAX_STATES if max_states is None else max_states
    net = _Net(x, y, core_axes, sizes, product=True)
    seed = _improve(net, _greedy(net), lambda steps, order: (sum(steps), order))
    ub, ub_order = sum(net.steps(seed)), seed
    if k == 1:
        return Chain(ub, ub_order, True, 0)
    bound = step_bounds(x, y, core_axes, sizes, product=True)

    def keep(g, c, seq, i, h):
        g2, h2 = g + c, h - bound[i]
        f = g2 + h2  # every completion costs at least this: it must beat the seed or tie it earlier in spec order
        if f > ub or (f == ub and seq > ub_order[: len(seq)]):
            return None
        return g2, h2

    # the seed's own path is never dropped, so the search ends with one subset left: all cores
    return _search(net, {0: (0, (), 0, sum(bound))}, keep, k, max_states, Chain(ub, ub_order, False, max_states))


def bottleneck_chain(
    x: str, y: str, core_axes: Sequence[str], weight: Mapping[str, int], *, max_states: int | None = None
) -> Chain:
    """The least possible largest step of a chain, with additive ``weight`` (exponents of d).

    As d grows, a chain's MACs are dominated by its largest step, so this is the leading exponent of
    the asymptotically cheapest chain (THEORY 3's nu and omega). ``cost`` is that largest step and
    ``order`` a chain attaining it; exact unless ``exact=False``. Every step of core i is at least its
    bound (:func:`step_bounds`), so a seed attaining the largest bound is optimal without a search.
    """
    k = len(core_axes)
    max_states = MAX_STATES if max_states is None else max_states
    net = _Net(x, y, core_axes, weight, product=False)
    seed = _improve(net, _greedy(net), lambda steps, order: (max(steps), sum(steps), order))
    best = max(net.steps(seed))
    if k == 1 or best == max(step_bounds(x, y, core_axes, weight, product=False)):
        return Chain(best, seed, True, 0)

    def keep(g, c, seq, i, h):
        g2 = max(g, c)
        return (g2, 0) if g2 < best else None  # only a chain whose every step is below the seed's can beat it

    return _search(net, {0: (0, (), 0, 0)}, keep, k, max_states, Chain(best, seed, False, max_states))


def _search(net: _Net, layer: dict, keep, k: int, max_states: int, seed: Chain) -> Chain:
    """Grow ``layer`` one core at a time (:func:`_frontier`); ``seed`` (marked inexact) if the room runs out,
    ``seed`` as exact if every subset was pruned (nothing beats it), else the one full chain left."""
    states = 0
    for _ in range(k):
        grown = _frontier(net, layer, keep, max_states - states)
        if grown is None:
            return seed
        layer = grown
        states += len(layer)
        if not layer:
            return Chain(seed.cost, seed.order, True, states)
    ((g, seq, _, _),) = layer.values()
    return Chain(g, seq, True, states)
