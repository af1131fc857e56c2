"""The frozen execution plan of a StructuredLinear (torch-free): routes through the chain, built once.

A :class:`Route` is a :class:`~einstruct.layers.layout.ChainLayout` with every decision the runners need
made ahead of time from shapes and strides alone (:mod:`einstruct.layers.strides`): inverse permutations,
which permute + reshape is a strided view BLAS reads in place (no copy), which gradient can be read the same
way in the backward, and whether the last matmul can write straight into y's memory order. Shapes keep
``None`` for the batch (``rows`` times the input rows). A :class:`LayerPlan` holds the two routes of a
layer (the cost-model layout and the plain-form one for small batches), the row thresholds between
paths and the cost table of the device it was planned for. Nothing here is recomputed per call.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass

from .. import rules
from ..compiler import Structure
from . import strides
from .costs import CPU, CostTable
from .layout import ChainLayout, fill, inverse, plan_chain

_PROBE = 3  # stand-in batch for stride decisions (any n > 1 gives the same; n = 1 makes every view legal)

# Training (grad mode) on small batches: when a forward materialises fewer than this many elements
# (rows x row_elems), the plain-form layout runs (matmuls in the (rows, K) @ (K, P) form only); larger ones
# use the cost-model layout, whose transposed forms and strided views save copies at large batches.
# Chosen when small batches ran on torch's own autograd ops (CPU, 2 threads, float32: BTT r=4 at d=1024,
# plain 1.26x faster at 128 rows, cost-model 1.22x faster at 512). With the chain as one autograd Function
# both layouts run in it, and the cost-model one measured faster from about 64 rows for BTT at d=1024
# (1 thread: 0.55-0.87x the time at 64-1024 rows, 1.1x at 16) and within 10% either way for Monarch, TT and
# Kronecker; the threshold is kept as it was (tests pin it), so lowering it is an open, measured option.
BUILTIN_MAX_ELEMS = 1 << 22

# Materialised path for small inference batches inside es.inference_cache: the dense matrix is used when
# the structure has fewer FLOPs than dense, the weight has at most DENSE_MAX_WEIGHT elements and the dense
# product at most DENSE_MAX_MACS multiply-adds: measured on CPU (1 thread, float32), below these a dense
# matmul of the cached matrix costs less than the fixed per-call cost of the factored chain.
# Writing the last matmul into a strided view of y (bmm out=) has a fixed cost of about 13 us on CPU; it
# saves the final permute copy only once y has about 2^17 elements (measured, 1 thread, float32: 16-2048
# rows, blocks of 16-64). Smaller outputs are permuted into y with the bias in one pass instead.
INTO_MIN_ELEMS = 1 << 17

DENSE_MAX_ROWS = 16
DENSE_MAX_WEIGHT = 1 << 18
DENSE_MAX_MACS = 1 << 22

# Small weights: at most DENSE_ANY_WEIGHT elements (128 x 128) and a chain that copies or uses a non-plain
# matmul form (its planned layout cost is above 0) run every cached no-grad batch on the materialised matrix.
# Measured on CPU (1 thread, float32, `python -m benchmarks.dense_rows`, 256 and 4096 rows; theta points of the
# search, BTT r=1, Monarch 4): the dense matmul took 0.09-0.55x the chain's time at d = 32, 0.23-1.05x at
# d = 64 and 0.52-0.86x at d = 128; a copy-free low rank chain was faster from d = 64 (dense 0.7-2x), and
# from d = 256 the chain was mostly faster (dense 0.57-5.7x), so those keep the small-batch rule above.
DENSE_ANY_WEIGHT = 1 << 14
ANY_BATCH = sys.maxsize  # dense_rows meaning every batch


@dataclass(frozen=True)
class StepRun:
    """One matmul of a route. Shapes with ``None`` stand for the batch: input rows x ``rows``."""

    core: int  # position of the core in execution order (the cores are passed as a tuple in that order)
    act_perm: tuple[int, ...] | None  # permute the activation first (None: its layout is already right)
    act_inverse: tuple[int, ...] | None
    act_dims: tuple[int | None, ...]  # shape of the permuted activation (None: input rows)
    act_shape: tuple[int | None, ...]  # the matrix: (B?, M, K), or (B?, K, M) when act_kr
    act_view: bool  # with more than one row, permute + view is read in place by BLAS: no copy
    rows: int
    act_kr: bool
    core_perm: tuple[int, ...] | None
    core_inverse: tuple[int, ...] | None
    core_dims: tuple[int, ...]  # shape of the permuted core
    core_shape: tuple[int, ...]  # (B?, K, P), or (B?, P, K) when core_left
    core_view: bool  # the permuted core is read in place by BLAS (used as a view of the parameter)
    core_as_is: bool  # the matmul reads the core itself (no permute, same shape): nothing to lay out
    core_left: bool  # output (B?, P, M) = core @ act, else (B?, M, P) = act @ core
    out_shape: tuple[int | None, ...]  # the output in the layout of the next step's input
    out_matrix: tuple[int | None, ...]  # the output as the matrix the matmul writes (None: input rows x rows)
    grad_view: bool  # the gradient of this step's activation, permuted back, is a BLAS-readable view of
    #                  the previous step's output matrix (more than one row): no copy in the backward

    @property
    def batched(self) -> bool:
        return len(self.core_shape) == 3


@dataclass(frozen=True)
class Route:
    """A chain layout with its per-step decisions; everything a forward or backward needs but the batch."""

    steps: tuple[StepRun, ...]
    in_shape: tuple[int | None, ...]  # the padded input in the first layout
    d_in: int  # padded
    d_out: int  # padded
    final_perm: tuple[int, ...] | None  # last layout -> y's memory order
    final_inverse: tuple[int, ...] | None
    final_shape: tuple[int | None, ...] | None  # y in its memory order, rows first (when final_perm)
    into_rows: int  # from this many rows on (0: never) the last matmul writes into y: y.view(final_shape)
    #                 .permute(final_inverse) viewed as the last out_matrix is BLAS-readable, y is large
    fuse_bias: bool  # the last step is a plain 2-D (rows, K) @ core giving y itself: bias via addmm
    layout: ChainLayout  # what the route was made from (costs, the planner's steps)


@dataclass(frozen=True)
class LayerPlan:
    """Both routes of a layer and the batch thresholds between its paths."""

    chain: Route  # the cost-model layout: larger training batches, no-grad forwards
    small: Route  # plain forms only: training batches of at most builtin_rows rows
    row_elems: int  # elements a forward materialises per input row (memory checks, builtin_rows)
    builtin_rows: int  # default largest training batch on the small route
    core_names: tuple[str, ...]  # execution order
    one_matmul: bool  # the whole chain is one plain 2-D matmul (nn.Linear's): torch's own autograd op for it
    flat: bool  # every step of the plain-form layout is a 2-D mm (no batch axes): small training batches run
    #             on torch's own ops (a few C++ autograd nodes cost less than one Python Function there)
    costs: CostTable  # the device's prices both layouts were planned with


def _matrix(s) -> tuple:
    """The output matrix of a layout step, lead + (P, M) or lead + (M, P)."""
    lead, (x, z) = s.core_shape[:-2], s.core_shape[-2:]
    return lead + ((x, None) if s.core_left else (None, z))


def _step(s, core: int, core_full: tuple[int, ...], src: tuple, prev_matrix: tuple, prev_rows: int) -> StepRun:
    act_dims = src if s.act_perm is None else tuple(src[p] for p in s.act_perm)
    n = _PROBE
    view = strides.permuted_view(fill(src, n), s.act_perm, fill(s.act_shape, n * s.rows))
    act_view = s.act_perm is not None and strides.blas_readable(view)
    core_dims = core_full if s.core_perm is None else tuple(core_full[p] for p in s.core_perm)
    core_view = s.core_perm is not None and strides.blas_readable(
        strides.permuted_view(core_full, s.core_perm, s.core_shape)
    )
    grad_view = False
    if s.act_perm is not None:  # gradient: contiguous in act_dims, permuted back to src, viewed as prev_matrix
        back = strides.permuted_view(fill(act_dims, n), inverse(s.act_perm), fill(prev_matrix, n * prev_rows))
        grad_view = strides.blas_readable(back)
    return StepRun(
        core=core,
        act_perm=s.act_perm,
        act_inverse=None if s.act_perm is None else inverse(s.act_perm),
        act_dims=act_dims,
        act_shape=s.act_shape,
        act_view=act_view,
        rows=s.rows,
        act_kr=s.act_kr,
        core_perm=s.core_perm,
        core_inverse=None if s.core_perm is None else inverse(s.core_perm),
        core_dims=core_dims,
        core_shape=s.core_shape,
        core_view=core_view,
        core_as_is=s.core_perm is None and tuple(s.core_shape) == tuple(core_full),
        core_left=s.core_left,
        out_shape=s.out_shape,
        out_matrix=_matrix(s),
        grad_view=grad_view,
    )


def route(chain: ChainLayout, st: Structure) -> Route:
    """The runners' view of ``chain`` for the compiled structure ``st``."""
    shapes = {c.name: tuple(c.shape) for c in st.cores}
    index = {c.name: i for i, c in enumerate(st.cores)}
    steps = []
    src, prev, rows = chain.in_shape, (None, st.d_in_padded), 1  # the padded input is the first "output"
    for s in chain.steps:
        steps.append(_step(s, index[s.core], shapes[s.core], src, prev, rows))
        src, prev, rows = s.out_shape, _matrix(s), s.rows
    last = chain.steps[-1]
    final_shape = final_inverse = None
    into_rows = 0
    if chain.final_perm is not None:
        final_inverse = inverse(chain.final_perm)
        final_shape = tuple(last.out_shape[i] for i in chain.final_perm)  # y's layout: rows first
        n = _PROBE
        if strides.blas_readable(
            strides.permuted_view(fill(final_shape, n), final_inverse, fill(_matrix(last), n * last.rows))
        ):
            into_rows = max(2, -(-INTO_MIN_ELEMS // st.d_out_padded))
    return Route(
        steps=tuple(steps),
        in_shape=chain.in_shape,
        d_in=st.d_in_padded,
        d_out=st.d_out_padded,
        final_perm=chain.final_perm,
        final_inverse=final_inverse,
        final_shape=final_shape,
        into_rows=into_rows,
        fuse_bias=chain.fuse_bias,
        layout=chain,
    )


def row_elements(chain: ChainLayout, st: Structure) -> int:
    """Elements per input row of the tensors a forward materialises: padded input, copies, step outputs."""
    prev = math.prod(s for s in chain.in_shape if s is not None)
    total = prev
    for s in chain.steps:
        out = math.prod(d for d in s.out_shape if d is not None)
        total += (prev if s.act_perm is not None else 0) + out
        prev = out
    return total + (prev if chain.final_perm is not None else 0) + st.d_out_padded


def build(st: Structure, costs: CostTable = CPU) -> LayerPlan:
    """The plan of a compiled structure on a device priced by ``costs``: both layouts planned, every
    per-step decision made. A plan is a frozen value, so layers of one structure on one table share it
    (planned once: the search builds each candidate twice, on the meta device and for real)."""
    return _build(st, costs)


@functools.lru_cache(maxsize=1024)
def _build(st: Structure, costs: CostTable) -> LayerPlan:
    chain = plan_chain(st, costs=costs)
    elems = row_elements(chain, st)
    small = route(plan_chain(st, plain=True, costs=costs), st)
    (first, *rest) = small.steps
    return LayerPlan(
        chain=route(chain, st),
        small=small,
        row_elems=elems,
        builtin_rows=(BUILTIN_MAX_ELEMS - 1) // elems,
        core_names=tuple(c.name for c in st.cores),
        one_matmul=not rest and not first.batched and first.act_perm is None and small.final_perm is None,
        flat=not any(s.batched for s in small.steps),
        costs=costs,
    )


def default_dense_rows(st: Structure, in_features: int, out_features: int, plan: LayerPlan | None = None) -> int:
    """Largest batch (rows) that runs on the materialised dense matrix in inference; 0 for never,
    ``ANY_BATCH`` for every batch. ``plan``: the layer's plan (default: planned with the CPU table)."""
    weight = in_features * out_features
    if st.flops >= rules.dense_flops(1, in_features, out_features) or weight > DENSE_MAX_WEIGHT:
        return 0
    if weight <= DENSE_ANY_WEIGHT and (plan if plan is not None else build(st)).chain.layout.cost > 0:
        return ANY_BATCH
    return min(DENSE_MAX_ROWS, DENSE_MAX_MACS // weight)
