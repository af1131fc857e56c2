"""StructuredLinear: a compiled structure run as a fixed chain of batched matmuls, with muP init and weight norm.

The chain of :func:`einstruct.compile` is laid out once, at construction, as a list of steps. Each step
permutes the running activation to ``(batch, rows, contracted)`` (or ``(batch, contracted, rows)``),
reshapes it to a matrix per batch index, and multiplies it with the core reshaped to
``(batch, contracted, produced)``: one ``mm``/``bmm`` per core, so FLOP counters see exactly
``structure.flops`` per example. Rows are the leading dimensions of the input times the axes the core is
shared across. The memory order of every intermediate, and the form of each matmul, are chosen by a
small dynamic programme over the steps that minimises a measured cost of the permute copies and matmul
forms, so consecutive steps reuse each other's layout where they can.

Paths (all deterministic; DESIGN.md: ``flops(batch)`` reports the path that runs):

- Grad mode on (training), at most ``layer.builtin_rows`` rows (a forward materialising fewer than 2^22
  elements): a chain planned with plain matmul forms only, on torch's own ops (permute, reshape, matmul)
  and autograd; the Python cost of custom autograd Functions outweighs the copies they save there.
  Set ``layer.builtin_rows = 0`` to turn it off.
- Grad mode on (training), more rows: the planned chain with autograd. Where an activation's permute + reshape
  is a strided view BLAS can read in place (checked once at construction), it is not copied (n > 1
  rows); where y's memory order is a strided view of the last matmul's output, that matmul writes into
  y directly and the bias is added in place (``_MatmulInto``; not under autocast or torch.compile);
  a core whose permute is such a view is used as a view of its parameter. Otherwise the copies of
  ``_Relayout``. Autograd keeps each step's activation operand (a view of x for a viewed first step).
- Grad mode off (``torch.no_grad`` / ``torch.inference_mode``): the same chain without autograd, on the
  effective cores laid out per step from the live parameters at every call (no copy where a core's layout
  is already right). Nothing is cached implicitly, so every way a weight can change (optimizer steps,
  fused ones included, ``.data`` edits, ``load_state_dict``, ``.to()``) is seen by construction.
- Inside ``with es.inference_cache(model):`` (``einstruct.layers.inference``), no-grad forwards reuse the
  per-step cores and, for ``batch <= layer.dense_rows`` rows, the materialised (out, in) matrix through
  ``F.linear``, each built on first use in the scope and dropped when it ends: the scope's promise is
  that weights do not change inside it. ``dense_rows`` is 0 unless the structure has fewer FLOPs than
  dense and the weight has at most 2^18 elements; then min(16, 2^22 // (in * out)) (measured on CPU:
  below that the dense matmul costs less than the chain's fixed per-call cost). Set
  ``layer.dense_rows = 0`` to turn it off. Inside the scope the caches are also keyed by each core's
  ``data_ptr()`` and ``_version``, which catches ordinary in-place updates, but not fused optimizer steps
  or ``.data`` edits: do not train inside the scope. Caches are built with autocast off (exact, in the
  parameters' dtype) and are plain attributes, never in ``state_dict``.
- Under autocast every path runs its matmuls in the autocast dtype (outputs as ``nn.Linear``'s).

Contract details chosen here (DESIGN.md, THEORY 4-5):

- Cores are parameters named after the spec's cores (``layer.R``), stored in the spec's axis order.
- ``init_scale=None`` draws every core from N(0, core.init_std^2) (muP); a float replaces the std of
  every core. ``low_rank_init=True`` gives the first core of a low-rank structure std 1/sqrt(in_features)
  (ICML appendix). ``zero_init=True`` zeroes only the last core in execution order. Biases start at 0.
- ``normalize=True`` adds one learnable scalar gain per core, in the ``nn.ParameterDict`` ``layer.gains``
  keyed by core name (state_dict keys ``gains.<core>``), and uses
  ``M_eff = g * min(1, sigma / RMS(M)) * M`` with sigma the std that core was drawn with (the nominal one
  for a zero-initialised core).
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import limits
from ..compiler import Structure
from ..compiler import compile as compile_structure
from ..errors import SpecError

logger = logging.getLogger(__name__)

ROWS = "#"  # the flattened leading dimensions of the input, as a pseudo-axis of the layout
RMS_EPS = 1e-8
_MAX_PERMUTED = 4  # groups up to this many axes are tried in every order when planning layouts
# Planning costs, in units per element (measured on CPU, one thread, float32, 1024 rows): a permute
# copy runs at about memory speed (2) when it moves contiguous runs of >= 16 elements or when the axes
# it reorders form blocks that fit in cache (e.g. within one example); otherwise it scatters (5). A
# matmul in any form but (rows, K) @ (K, P) costs about half a copy of its input more (1).
_COPY, _SCATTERED, _FORM = 2, 5, 1
_CONTIGUOUS_RUN = 16
_CACHE_BLOCK = 16384
_ROWS_HINT = 256  # the batch is unknown when planning; assume at least this many rows
# Tie-break between the three other matmul forms (act_kr, core_left).
_FORM_ORDER = {(False, False): 0, (True, True): 1, (False, True): 2, (True, False): 3}
# Matmul forms also differ in speed, in proportion to their multiply-adds (fwd + both grads; measured on
# CPU, 2 threads, float32, over a grid of (M, K, P), and on whole layers): with both the activation and
# the output transposed, (P, M) = core (P, K) @ act (K, M), a step runs 1.3-2.5x slower than the plain
# form; with one of them transposed, up to 1.4x slower when M carries axes besides the input rows (its
# leading dimension is then rows * batch), and about as fast when M is the input rows alone (the BTT
# steps). Extra cost per multiply-add: _MAC_UNITS * _SLOW[form][M carries axes].
_MAC_UNITS = 0.1
_SLOW = {(False, False): (0, 0), (True, True): (0.3, 0.3), (False, True): (0, 0.1), (True, False): (0, 0.1)}


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
    cost: int  # planned cost per example of the copies and matmul forms (units of _COPY, _SCATTERED, _FORM)


class _Relayout(torch.autograd.Function):
    """``x.permute(perm).contiguous()`` whose backward returns a contiguous gradient as well.

    Plain permute + reshape can hand bmm a view whose batch axis is not outermost (in the forward, or
    as the gradient in the backward); CPU bmm then runs one small matrix at a time, orders of magnitude
    slower. Copying here, at the places the plan chose, keeps every bmm operand batch-major.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, perm, inverse):
        return x.permute(perm).contiguous()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.inverse = inputs[2]

    @staticmethod
    def backward(ctx, grad):
        return grad.permute(ctx.inverse).contiguous(), None, None


class _RelayoutBias(torch.autograd.Function):
    """The chain's final permute into y's memory order with the bias added in the same pass.

    ``y.view(shape) = x.permute(perm) + bias`` written into a fresh contiguous y: one read of x, one write
    of y. (An in-place ``add_`` on a view of a relayout's output would make autograd rebuild the gradient
    through ``as_strided`` in the backward: a zero fill and two more copies of y.)
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, bias, perm, inverse, shape):
        if _batched(x):  # under vmap (no out= there): two passes
            return (x.permute(perm) + bias.view(shape[1:])).contiguous()
        y = x.new_empty(shape)
        torch.add(x.permute(perm), bias.view(shape[1:]), out=y)
        return y

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.inverse = inputs[3]

    @staticmethod
    def backward(ctx, grad):
        gx = grad.permute(ctx.inverse).contiguous() if ctx.needs_input_grad[0] else None
        gb = grad.flatten(1).sum(0) if ctx.needs_input_grad[1] else None
        return gx, gb, None, None, None


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(sorted(range(len(perm)), key=perm.__getitem__))


def _relayout(x: torch.Tensor, perm: tuple[int, ...] | None) -> torch.Tensor:
    if perm is None:
        return x
    return _Relayout.apply(x, perm, _inverse(perm))


class _MixedMatmul(torch.autograd.Function):
    """The two matmul forms with one operand transposed, with gradients laid out like their inputs.

    ``core_left``: out = w @ a^T with a (B?, M, K), w (B?, P, K); otherwise out = a^T @ w with a (B?, K, M),
    w (B?, K, P). Autograd's own bmm backward would return the gradient of a transposed operand in the
    transposed memory order, turning the mirrored copy of the backward into a scattered one.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(a, w, core_left):
        return torch.matmul(w, a.mT) if core_left else torch.matmul(a.mT, w)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, w, core_left = inputs
        ctx.save_for_backward(a, w)
        ctx.core_left = core_left

    @staticmethod
    def backward(ctx, grad):
        a, w = ctx.saved_tensors
        ga = gw = None
        if ctx.core_left:
            if ctx.needs_input_grad[0]:
                ga = torch.matmul(grad.mT, w)
            if ctx.needs_input_grad[1]:
                gw = torch.matmul(grad, a)
        else:
            if ctx.needs_input_grad[0]:
                ga = torch.matmul(w, grad.mT)
            if ctx.needs_input_grad[1]:
                gw = torch.matmul(a, grad)
        return ga, gw, None


def _bmm(x: torch.Tensor, y: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """bmm for 3-D, mm for 2-D operands: torch.matmul can take a slow path on views with odd strides."""
    return (torch.bmm if x.dim() == 3 else torch.mm)(x, y, out=out)


def _operands(a: torch.Tensor, w: torch.Tensor, act_kr: bool, core_left: bool) -> tuple:
    """(left, right) of a step's matmul: out (B?, M, P) = a @ w, or (B?, P, M) = w @ a when core_left."""
    a = a.mT if act_kr else a  # (M, K)
    return (w, a.mT) if core_left else (a, w)


class _MatmulInto(torch.autograd.Function):
    """The last matmul of the chain written straight into y's memory order, with the bias added in place.

    ``into`` = (y shape in the chain's last layout, inverse of the final permutation, matrix shape of the
    step's output): ``y.view(shape).permute(inverse).view(matrix)`` is a strided view BLAS writes in place,
    so neither the forward nor the backward copies y. Used for n > 1 rows outside autocast.
    """

    @staticmethod
    def forward(a, w, bias, act_kr, core_left, into, n_out):
        layout, inverse, matrix = into
        y = a.new_empty((layout[0], n_out))
        left, right = _operands(a, w, act_kr, core_left)
        _bmm(left, right, out=y.view(layout).permute(inverse).view(matrix))
        return y if bias is None else y.add_(bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, w, bias, act_kr, core_left, into, _ = inputs
        ctx.save_for_backward(a, w)
        ctx.form = (act_kr, core_left)
        ctx.into = into
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad):
        a, w = ctx.saved_tensors
        act_kr, core_left = ctx.form
        layout, inverse, matrix = ctx.into
        g = grad if grad.is_contiguous() else grad.contiguous()
        g = g.view(layout).permute(inverse).view(matrix)  # the step's output gradient, strided as in forward
        ga = gw = gb = None
        if ctx.needs_input_grad[0]:  # laid out like a: (K, M) when act_kr, else (M, K)
            if act_kr:
                ga = _bmm(w.mT, g) if core_left else _bmm(w, g.mT)
            else:
                ga = _bmm(g.mT, w) if core_left else _bmm(g, w.mT)
        if ctx.needs_input_grad[1]:  # laid out like w: (P, K) when core_left, else (K, P)
            am = a.mT if act_kr else a  # (M, K)
            gw = _bmm(g, am) if core_left else _bmm(am.mT, g)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.sum(0)
        return ga, gw, gb, None, None, None, None


def _batched(t: torch.Tensor) -> bool:
    """Whether ``t`` is wrapped by a torch.func transform (vmap, grad): no ``out=`` matmuls there."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def _autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would run a matmul of ``t`` in, or None outside autocast."""
    dev = t.device.type
    if dev not in ("cpu", "cuda") or t.dtype == torch.float64 or not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


def _fill(shape: tuple, value: int) -> tuple[int, ...]:
    return tuple(value if s is None else s for s in shape)


def _perm(src: tuple, dst: tuple) -> tuple[int, ...] | None:
    p = tuple(src.index(a) for a in dst)
    return None if p == tuple(range(len(p))) else p


def _orders(axes: tuple) -> list[tuple]:
    """Orders of a group to try; the given order first."""
    return list(itertools.permutations(axes)) if len(axes) <= _MAX_PERMUTED else [axes]


def plan_chain(st: Structure, plain: bool = False) -> ChainLayout:
    """Lay out the compiled chain: memory order of each intermediate and matmul forms of least cost.

    ``plain=True`` allows only the plain form (rows, K) @ (K, P), as torch.einsum lays out its bmm.
    """
    transposes = (False,) if plain else (False, True)
    sizes = st.sizes

    def big(axes) -> tuple:
        return tuple(a for a in axes if sizes[a] > 1)

    def elems(layout) -> int:
        return math.prod(sizes[a] for a in layout if a != ROWS)

    def extent(axes) -> int:
        return math.prod(_ROWS_HINT if a == ROWS else sizes[a] for a in axes)

    def copy_cost(src, dst) -> int:
        if src == dst:
            return 0
        keep = 0  # outer axes that stay in place split the copy into independent blocks
        while src[keep] == dst[keep]:
            keep += 1
        run = 0  # inner axes that stay in place are copied as contiguous runs
        while src[len(src) - 1 - run] == dst[len(dst) - 1 - run]:
            run += 1
        fast = extent(src[keep:]) <= _CACHE_BLOCK or extent(src[len(src) - run :]) >= _CONTIGUOUS_RUN
        return elems(src) * (_COPY if fast else _SCATTERED)

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
                            slow = _SLOW[(act_kr, core_left)][len(r) > 1]  # r holds ROWS: > 1 carries axes
                            step_cost = elems(arr) * _FORM + round(_MAC_UNITS * slow * elems(arr) * elems(p))
                            key = (c + (step_cost if form else 0), pen + form)
                            if out not in nxt or key < nxt[out][:2]:
                                nxt[out] = (*key, hist + ((layout, arr, act_kr, core_left, b, r, k, p, out),))
        frontier = nxt
    final = (ROWS,) + big(st.spec.y)
    layout, (cost, _, hist) = min(
        frontier.items(), key=lambda kv: (kv[1][0] + copy_cost(kv[0], final), kv[1][1])
    )
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
        fuse_bias=len(steps[-1].core_shape) == 2 and steps[-1].rows == 1 and not steps[-1].core_left
        and layout == final,
        cost=cost + copy_cost(layout, final),
    )


def _row_elements(chain: ChainLayout, st: Structure) -> int:
    """Elements per input row of the tensors a forward materialises: padded input, copies, step outputs."""
    prev = math.prod(s for s in chain.in_shape if s is not None)
    total = prev
    for s in chain.steps:
        out = math.prod(d for d in s.out_shape if d is not None)
        total += (prev if s.act_perm is not None else 0) + out
        prev = out
    return total + (prev if chain.final_perm is not None else 0) + st.d_out_padded


def _act_views(chain: ChainLayout) -> tuple[bool, ...]:
    """Per step: the activation's permute + reshape is a view BLAS reads in place (no copy needed).

    True when the reshape after the permute is a view whose matrices have a unit stride in one of their
    two dimensions; the batch index may have any stride (bmm then runs one gemm per batch index, each
    with its own leading dimension). Checked once, on meta tensors, at construction.
    """
    out = []
    srcs = (chain.in_shape,) + tuple(s.out_shape for s in chain.steps[:-1])
    for s, src in zip(chain.steps, srcs):
        if s.act_perm is None:
            out.append(False)
            continue
        t = torch.empty(_fill(src, 3), device="meta").permute(s.act_perm)
        try:
            m = t.view(_fill(s.act_shape, 3 * s.rows))
        except RuntimeError:
            out.append(False)
            continue
        out.append(m.stride(-1) == 1 or m.stride(-2) == 1)
    return tuple(out)


def _core_views(chain: ChainLayout, core_shapes: dict) -> tuple[bool, ...]:
    """Per step: the core's permute + reshape is a BLAS-readable view (no copy, the parameter is saved)."""
    out = []
    for s in chain.steps:
        t = torch.empty(core_shapes[s.core], device="meta")
        if s.core_perm is not None:
            t = t.permute(s.core_perm)
        try:
            m = t.view(s.core_shape)
        except RuntimeError:
            out.append(False)
            continue
        out.append(s.core_perm is not None and (m.stride(-1) == 1 or m.stride(-2) == 1))
    return tuple(out)


def _final_into(chain: ChainLayout) -> tuple | None:
    """How the last step writes into y's memory order (see :class:`_MatmulInto`), or None when it can't."""
    if chain.final_perm is None:
        return None
    s = chain.steps[-1]
    inverse = _inverse(chain.final_perm)
    final_shape = tuple(s.out_shape[i] for i in chain.final_perm)  # y's layout: rows first
    lead, (x, z) = s.core_shape[:-2], s.core_shape[-2:]
    p = x if s.core_left else z
    matrix = lead + ((p, None) if s.core_left else (None, p))
    t = torch.empty(_fill(final_shape, 3), device="meta").permute(inverse)
    try:
        m = t.view(_fill(matrix, 3 * s.rows))
    except RuntimeError:
        return None
    if m.stride(-1) != 1 and m.stride(-2) != 1:
        return None
    return final_shape, inverse, matrix


# Training (grad mode) on small batches: when a forward materialises fewer than this many elements
# (rows x _row_elements), the plan runs on torch's own autograd ops. The custom Functions of the large-batch
# path save copies and keep the backward's operands batch-major, but each costs a Python call forward and
# backward; measured on CPU (2 threads, float32, d = 1024..4096, 16..2048 rows), they pay off above
# about 2^22 elements (BTT r=4 at d=1024: builtin 1.26x faster at 128 rows, custom 1.22x faster at 512).
_BUILTIN_MAX_ELEMS = 1 << 22

# Materialised path for small inference batches (see the module docstring): the dense matrix is used
# when no autograd graph is recorded, the structure has fewer FLOPs than dense, the weight has at most
# _DENSE_MAX_WEIGHT elements and the dense product at most _DENSE_MAX_MACS multiply-adds: measured on
# CPU (1 thread, float32), below these a dense matmul of the cached matrix costs less than the fixed
# per-call cost of the factored chain (tens of microseconds per step).
_DENSE_MAX_ROWS = 16
_DENSE_MAX_WEIGHT = 1 << 18
_DENSE_MAX_MACS = 1 << 22


def default_dense_rows(st: Structure, in_features: int, out_features: int) -> int:
    """Largest batch (rows) that runs on the materialised dense matrix in inference; 0 for never."""
    weight = in_features * out_features
    if st.flops >= 2 * weight or weight > _DENSE_MAX_WEIGHT:
        return 0
    return min(_DENSE_MAX_ROWS, _DENSE_MAX_MACS // weight)


def _is_low_rank(st: Structure) -> bool:
    """Two cores joined only through bond axes (x -> bond -> y), like ``i,ir,ro->o``."""
    if len(st.cores) != 2:
        return False
    return all(st.spec.role(a) == "bond" for a in st.cores[0].step.after if st.sizes[a] > 1)


def _check_features(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpecError(f"StructuredLinear: {name} must be a positive integer, got {value!r}")
    return value


class StructuredLinear(nn.Module):
    """A drop-in for nn.Linear whose weight is a structured einsum (a plain nn.Module, not a subclass).

    >>> layer = StructuredLinear(1024, 4096, es.presets.btt(rank=4))
    >>> y = layer(torch.randn(8, 1024))          # (8, 4096)

    Args:
        spec: an :class:`einstruct.Spec` or a preset name, compiled with ``es.compile(spec, in_features,
            out_features, pad_tolerance=...)``; the result is ``layer.structure``.
        zero_init: zero the last core in execution order, so the layer starts at 0 (THEORY 4).
        init_scale: None for each core's muP std ``core.init_std``; a float is the std of every core.
        low_rank_init: give the first core of a low-rank structure std 1/sqrt(in_features).
        normalize: weight normalisation with one learnable scalar gain per core in ``layer.gains``.
        pad_tolerance: how much in/out may be padded to split into the axis sizes (inputs are padded
            with zeros, outputs sliced).

    ``layer.init_stds`` holds the std each core was drawn with (and the weight-norm cap).
    """

    def __init__(
        self,
        in_features,
        out_features,
        spec,
        bias: bool = True,
        *,
        zero_init: bool = False,
        init_scale: float | None = None,
        low_rank_init: bool = False,
        normalize: bool = False,
        pad_tolerance: float = 0.15,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.in_features = _check_features(in_features, "in_features")
        self.out_features = _check_features(out_features, "out_features")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise SpecError(f"StructuredLinear: dtype must be a floating-point torch.dtype, got {dtype!r}")
        if init_scale is not None and (
            isinstance(init_scale, bool) or not isinstance(init_scale, (int, float)) or not math.isfinite(init_scale)
            or init_scale <= 0
        ):
            raise SpecError(
                f"StructuredLinear: init_scale must be None (muP std per core) or a std > 0, got {init_scale!r}; "
                "use zero_init=True for a zero start"
            )
        self.structure = compile_structure(spec, in_features, out_features, pad_tolerance=pad_tolerance)
        self.spec = self.structure.spec
        self.zero_init = bool(zero_init)
        self.normalize = bool(normalize)
        self.low_rank_init = bool(low_rank_init)
        if self.low_rank_init and not _is_low_rank(self.structure):
            raise SpecError(
                f"low_rank_init=True needs a low-rank structure (two cores joined by a bond, e.g. "
                f"es.presets.low_rank(rank=8)); {self.spec.label or self.spec.einsum!r} is not one"
            )
        std = {c.name: (c.init_std if init_scale is None else float(init_scale)) for c in self.structure.cores}
        if self.low_rank_init:
            std[self.structure.cores[0].name] = 1.0 / math.sqrt(self.in_features)
        self.init_stds: dict[str, float] = std  # metadata on the module, never on tensors
        factory = {"device": device, "dtype": dtype}
        self._check_parameter_memory(bias, device, dtype)
        for c in self.structure.cores:
            if hasattr(self, c.name):
                raise SpecError(
                    f"core name {c.name!r} clashes with an attribute of StructuredLinear; rename the core "
                    f"(e.g. '{c.name}_core:{c.axes}' in the einsum)"
                )
            self.register_parameter(c.name, nn.Parameter(torch.empty(c.shape, **factory)))
        if self.normalize:
            clash = [c.name for c in self.structure.cores if hasattr(nn.ParameterDict(), c.name)]
            if clash:
                raise SpecError(f"core name {clash[0]!r} clashes with an nn.ParameterDict method; rename the core")
            self.gains = nn.ParameterDict(
                {c.name: nn.Parameter(torch.ones((), **factory)) for c in self.structure.cores}
            )
        else:
            self.gains = None
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self._names = tuple(c.name for c in self.structure.cores)
        self._chain = plan_chain(self.structure)
        self._small_chain = plan_chain(self.structure, plain=True)  # builtin path (see builtin_rows)
        self._act_views = _act_views(self._chain)
        self._core_views = _core_views(self._chain, {c.name: c.shape for c in self.structure.cores})
        self._into = _final_into(self._chain)
        self._final_inverse = None if self._chain.final_perm is None else _inverse(self._chain.final_perm)
        self.dense_rows = default_dense_rows(self.structure, self.in_features, self.out_features)
        self._cache: dict[str, tuple] = {}  # inference-only copies of the weights, only inside inference_cache()
        self._cache_depth = 0  # nesting depth of es.inference_cache scopes over this layer
        self._row_elems = _row_elements(self._chain, self.structure)
        self.builtin_rows = (_BUILTIN_MAX_ELEMS - 1) // self._row_elems
        logger.debug("%s: planned layout cost %d per example", self.spec.einsum, self._chain.cost)
        self.reset_parameters()

    # ---- memory limits ---------------------------------------------------------------------
    def _describe(self) -> str:
        name = self.spec.label or self.spec.einsum
        return f"StructuredLinear({self.in_features} -> {self.out_features}, {name})"

    def _check_parameter_memory(self, bias: bool, device, dtype) -> None:
        """Refuse parameters that cannot fit on their device, before any is allocated."""
        dev = torch.device(device) if device is not None else torch.get_default_device()
        itemsize = (dtype or torch.get_default_dtype()).itemsize
        n = self.structure.params + (self.out_features if bias else 0) + (len(self.structure.cores) * self.normalize)
        limits.check_fits(
            f"the parameters of {self._describe()} ({limits.count(n)} elements)", n * itemsize, dev,
            "use smaller dimensions or a structure with fewer parameters (e.g. a lower rank)",
        )

    def _check_forward_memory(self, rows: int, x: torch.Tensor, what: str = "the forward") -> None:
        limits.check_fits(
            lambda: f"the intermediates of {what} of {self._describe()} for {rows} rows",
            rows * self._row_elems * x.element_size(), x.device,
            "use a smaller batch (or accumulate gradients over several)",
        )

    # ---- parameters ----------------------------------------------------------------------
    @property
    def core_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.structure.cores)

    def reset_parameters(self) -> None:
        last = self.core_names[-1]
        with torch.no_grad():
            for name in self.core_names:
                w = getattr(self, name)
                if self.zero_init and name == last:
                    w.zero_()
                else:
                    w.normal_(0.0, self.init_stds[name])
            if self.gains is not None:
                for g in self.gains.values():
                    g.fill_(1.0)
            if self.bias is not None:
                self.bias.zero_()

    def effective_cores(self) -> dict[str, torch.Tensor]:
        """The cores the chain multiplies with: the parameters, weight-normalised when ``normalize``."""
        cores = {name: getattr(self, name) for name in self.core_names}
        if self.gains is None:
            return cores
        out = {}
        for name, w in cores.items():
            acc = torch.float64 if w.dtype == torch.float64 else torch.float32
            rms = torch.sqrt(w.to(acc).square().mean() + RMS_EPS)
            sigma = self.init_stds[name]
            scale = self.gains[name].to(acc) * (sigma / torch.clamp(rms, min=sigma))  # = g * min(1, sigma/rms)
            out[name] = w * scale.to(w.dtype)
        return out

    # ---- running the chain ---------------------------------------------------------------
    def _run(self, act: torch.Tensor, n: int, bias: torch.Tensor | None = None) -> torch.Tensor:
        """(n, d_in_padded) -> (n, d_out_padded) through the planned chain, plus ``bias`` if given."""
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            ws = self._cached("chain", self._step_cores) if self._cache_depth else self._step_cores(copy=False)
            return self._run_plain(act, n, bias, ws)
        if n <= self.builtin_rows and not torch.compiler.is_compiling():
            return self._run_builtin(act, n, bias)
        cores = self.effective_cores()
        chain = self._chain
        act = act.reshape(_fill(chain.in_shape, n))
        last = len(chain.steps) - 1
        into = self._into  # not under autocast (bmm out=) nor torch.compile (no strided out= there)
        if n == 1 or _autocast_dtype(act) is not None or torch.compiler.is_compiling() or _batched(act):
            into = None
        for i, s in enumerate(chain.steps):
            if self._act_views[i] and n > 1:  # strided view read in place by bmm (n = 1: odd strides)
                a = act.permute(s.act_perm).view(_fill(s.act_shape, n * s.rows))
            elif len(s.core_shape) == 2 and s.act_perm is not None:  # plain mm: any grad layout will do
                a = act.permute(s.act_perm).reshape(_fill(s.act_shape, n * s.rows))
            else:
                a = _relayout(act, s.act_perm).reshape(_fill(s.act_shape, n * s.rows))
            if self._core_views[i]:  # a view of the parameter: nothing copied, nothing extra saved
                w = cores[s.core].permute(s.core_perm).view(s.core_shape)
            else:
                w = _relayout(cores[s.core], s.core_perm).reshape(s.core_shape)
            if i == last and into is not None:  # written straight into y's order: no final copy
                layout, inverse, matrix = into
                y = _MatmulInto.apply(
                    a, w, None if bias is None else bias.to(a.dtype), s.act_kr, s.core_left,
                    (_fill(layout, n), inverse, _fill(matrix, n * s.rows)), self.structure.d_out_padded,
                )
                return y
            if s.core_left != s.act_kr:  # one operand transposed: keep the backward's layouts too
                dt = _autocast_dtype(a)
                if dt is not None:  # a custom Function's backward runs outside autocast: cast here
                    a, w = a.to(dt), w.to(dt)
                out = _MixedMatmul.apply(a, w, s.core_left)
            elif s.core_left:  # out (P, M) = core (P, K) @ act (K, M)
                out = torch.matmul(w, a)
            elif i == last and bias is not None and chain.fuse_bias:
                out, bias = torch.addmm(bias.to(a.dtype), a, w), None  # as nn.Linear: one pass over y
            else:  # out (M, P) = act (M, K) @ core (K, P)
                out = torch.matmul(a, w)
            act = out.view(_fill(s.out_shape, n))
        if chain.final_perm is not None:
            if bias is not None and not torch.compiler.is_compiling():  # one pass, into y's memory order
                perm = chain.final_perm
                shape = tuple(act.shape[i] for i in perm)  # y's layout, rows first
                y = _RelayoutBias.apply(act, bias.to(act.dtype), perm, self._final_inverse, shape)
                return y.view(n, self.structure.d_out_padded)
            act = _relayout(act, chain.final_perm)
        act = act.reshape(n, self.structure.d_out_padded)
        return act if bias is None else act + bias.to(act.dtype)

    def _run_builtin(self, act: torch.Tensor, n: int, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The chain with torch's own autograd ops only (no custom Functions), in plain matmul forms: for
        small batches, where the per-call cost of a Python ``autograd.Function`` outweighs the copies it
        saves, and where transposed forms measured slower than einsum's layouts."""
        cores = self.effective_cores()
        chain = self._small_chain
        act = act.reshape(_fill(chain.in_shape, n))
        last = len(chain.steps) - 1
        for i, s in enumerate(chain.steps):
            a = (act if s.act_perm is None else act.permute(s.act_perm)).reshape(_fill(s.act_shape, n * s.rows))
            w = cores[s.core]
            w = (w if s.core_perm is None else w.permute(s.core_perm)).reshape(s.core_shape)
            if i == last and bias is not None and chain.fuse_bias:  # a 2-D (M, P) product: bias via addmm
                out, bias = torch.addmm(bias.to(a.dtype), a, w), None
            else:  # plain form only (plan_chain(plain=True)): (M, K) @ (K, P)
                out = torch.matmul(a, w)
            act = out.view(_fill(s.out_shape, n))
        if chain.final_perm is not None:
            act = act.permute(chain.final_perm)
        act = act.reshape(n, self.structure.d_out_padded)
        return act if bias is None else act + bias.to(act.dtype)

    def _run_plain(self, act: torch.Tensor, n: int, bias: torch.Tensor | None, ws: tuple) -> torch.Tensor:
        """The chain without autograd (grad mode off), on cores already laid out per step (``ws``).

        Under autocast the activation and the cores are cast to the autocast dtype first, so every matmul
        (and the ``out=`` one into y) sees one dtype, as autocast would give them.
        """
        chain = self._chain
        dt = _autocast_dtype(act)
        if dt is not None:
            act, ws = act.to(dt), tuple(w.to(dt) for w in ws)
        act = act.reshape(_fill(chain.in_shape, n))
        last = len(chain.steps) - 1
        for i, (s, w) in enumerate(zip(chain.steps, ws)):
            a = act if s.act_perm is None else act.permute(s.act_perm)
            shape = _fill(s.act_shape, n * s.rows)
            a = a.view(shape) if self._act_views[i] and n > 1 else a.reshape(shape)
            if s.act_kr:
                a = a.mT
            if i == last and self._into is not None and n > 1:  # write straight into y's memory order
                layout, inverse, matrix = self._into
                y = a.new_empty((n, self.structure.d_out_padded))
                _bmm(*_operands(a.mT if s.act_kr else a, w, s.act_kr, s.core_left),
                     out=y.view(_fill(layout, n)).permute(inverse).view(_fill(matrix, n * s.rows)))
                return y if bias is None else y.add_(bias.to(y.dtype))
            mm = torch.bmm if w.dim() == 3 else torch.mm  # matmul can pick a slow path for odd strides
            if s.core_left:
                out = mm(w, a.mT)
            elif i == last and bias is not None and chain.fuse_bias:
                out, bias = torch.addmm(bias.to(a.dtype), a, w), None
            else:
                out = mm(a, w)
            act = out.view(_fill(s.out_shape, n))
        if chain.final_perm is not None:
            act = act.permute(chain.final_perm).reshape(n, self.structure.d_out_padded)
            return act if bias is None else act.add_(bias.to(act.dtype))
        act = act.reshape(n, self.structure.d_out_padded)
        return act if bias is None else act + bias.to(act.dtype)

    # ---- inference caches ----------------------------------------------------------------
    def _cache_key(self) -> tuple:
        """Identity and in-place version of every core and gain: changes whenever a weight changes."""
        params = self._parameters  # not getattr: nn.Module.__getattr__ costs a microsecond per call
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in map(params.__getitem__, self._names))
        if self.gains is not None:
            key += tuple((p.data_ptr(), p._version) for p in self.gains._parameters.values())
        return key  # .to(), load_state_dict and optimizer steps change these; reading them never syncs

    def _cached(self, what: str, build):
        """``build()``, kept for the rest of the enclosing ``es.inference_cache`` scope (autocast off)."""
        key = self._cache_key()
        hit = self._cache.get(what)
        if hit is not None and hit[0] == key:
            return hit[1]
        with torch.autocast(self._device_type(), enabled=False):
            value = build()
        self._cache[what] = (key, value)
        return value

    def _step_cores(self, copy: bool = True) -> tuple[torch.Tensor, ...]:
        """The effective cores as each step multiplies them, without a graph: contiguous copies (to keep), or
        with ``copy=False`` strided views of the parameters where BLAS reads them in place (used once)."""
        cores = self.effective_cores()
        out = []
        for s, view in zip(self._chain.steps, self._core_views):
            w = cores[s.core] if s.core_perm is None else cores[s.core].permute(s.core_perm)
            if view and not copy:
                out.append(w.view(s.core_shape))
            else:
                out.append(w.reshape(s.core_shape).contiguous())
        return tuple(out)

    def _dense_weight(self) -> torch.Tensor:
        return self.to_dense()

    def _device_type(self) -> str:
        return getattr(self, self._names[0]).device.type

    def drop_caches(self) -> None:
        """Forget the inference caches (``es.inference_cache`` does this when its scope ends)."""
        self._cache.clear()

    def uses_dense(self, batch: int, *, training: bool | None = None, cached: bool | None = None) -> bool:
        """Whether ``batch`` rows run on the materialised dense matrix: grad mode off (``training=False``),
        inside an ``es.inference_cache`` scope (``cached=True``) and ``batch <= dense_rows``. The defaults
        read the current grad mode and scope."""
        if training is None:
            training = torch.is_grad_enabled()
        if cached is None:
            cached = self._cache_depth > 0
        return batch <= self.dense_rows and cached and not training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise SpecError(
                f"StructuredLinear({self.in_features} -> {self.out_features}) expects input of shape "
                f"(..., {self.in_features}), got {tuple(x.shape)}"
            )
        lead = x.shape[:-1]
        n = math.prod(lead)
        if self._cache_depth and self.uses_dense(n) and not torch.compiler.is_compiling():
            return F.linear(x, self._cached("dense", self._dense_weight), self.bias)
        if not torch.compiler.is_compiling():  # plain integer arithmetic on shapes: no tensor reads
            self._check_forward_memory(n, x)
        flat = x.dim() == 2  # (rows, in): no reshape nodes in the graph (they cost microseconds per call)
        x2 = x if flat and x.is_contiguous() else x.reshape(n, self.in_features).contiguous()
        pad_in = self.structure.d_in_padded - self.in_features
        if pad_in:
            x2 = F.pad(x2, (0, pad_in))
        pad_out = self.structure.d_out_padded - self.out_features
        if pad_out:
            y = self._run(x2, n)[:, : self.out_features]
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        else:
            y = self._run(x2, n, self.bias)
        return y if flat else y.reshape(*lead, self.out_features)

    @property
    def weight(self) -> torch.Tensor:
        """The (out_features, in_features) matrix the layer applies, computed from the cores on every read.

        A read-only copy for client code that reads ``.weight`` (shape checks, tied-embedding helpers):
        it costs a forward of ``in_features`` rows (``structure.flops * in_features`` FLOPs and an
        (out, in) tensor); differentiable under grad mode. Writing to it changes nothing in the layer.
        """
        return self.to_dense()

    @weight.setter
    def weight(self, value) -> None:
        raise AttributeError(
            f"{self._describe()}.weight is computed from the cores ({', '.join(self.core_names)}) and cannot be "
            "set; load a dense matrix with es.from_dense(W, spec) or set the cores"
        )

    def to_dense(self) -> torch.Tensor:
        """The (out_features, in_features) matrix the layer applies (weight norm included, bias not).

        Exact in the parameters' dtype: autocast is turned off while it is built."""
        ref = getattr(self, self.core_names[0])
        d_in = self.structure.d_in_padded
        limits.check_fits(
            f"the dense matrix of {self._describe()} and its intermediates",
            (d_in * d_in + d_in * self._row_elems) * ref.element_size(), ref.device,
            "to_dense() materialises the full matrix: use it on smaller layers",
        )
        eye = torch.eye(d_in, device=ref.device, dtype=ref.dtype)
        with torch.autocast(ref.device.type, enabled=False):
            cols = self._run(eye, d_in)  # row i is W e_i
        return cols[: self.in_features, : self.out_features].transpose(0, 1).contiguous()

    # ---- reporting -----------------------------------------------------------------------
    def flops(self, batch: int, *, training: bool | None = None, cached: bool | None = None) -> int:
        """FLOPs (2 x MACs) of the forward path for ``batch`` rows: by default the one that runs now.

        The factored chain (``structure.flops`` per row), or, when :meth:`uses_dense` (grad mode off,
        inside ``es.inference_cache`` and ``batch <= dense_rows``), the materialised matrix:
        ``2 * in_features * out_features`` per row. ``training=`` and ``cached=`` ask about another mode
        than the current one (``flops(b, training=True)`` is the training forward wherever it is called).
        """
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
            raise SpecError(f"flops(batch) needs a non-negative integer number of rows, got {batch!r}")
        if self.uses_dense(batch, training=training, cached=cached):
            return 2 * self.in_features * self.out_features * batch
        return self.structure.flops * batch

    def extra_repr(self) -> str:
        st = self.structure
        name = f"{self.spec.label} " if self.spec.label else ""
        parts = [
            f"{name}{self.spec.einsum}",
            f"in_features={self.in_features}",
            f"out_features={self.out_features}",
            f"bias={self.bias is not None}",
            f"params={st.params}",
            f"flops_per_example={st.flops}",
        ]
        if st.padded:
            parts.append(f"padded=({st.d_in_padded}, {st.d_out_padded})")
        if self.normalize:
            parts.append("normalize=True")
        if self.zero_init:
            parts.append("zero_init=True")
        return ", ".join(parts)
