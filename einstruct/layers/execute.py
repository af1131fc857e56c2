"""Running a route of a LayerPlan: the graph-free forward and its backward, and the chain on torch's own ops.

:func:`forward` runs the chain without autograd: the no-grad path calls it directly, and the training
path through :class:`_Chain`, one autograd Function for the whole chain, whose backward is :func:`backward`.
Both read activations and cores as strided views where the plan says BLAS reads them in place, copy them
otherwise (keeping every bmm operand batch-major), and write the last matmul, or the final permute plus
bias in one pass, straight into y's memory order. :func:`run_ops` is the same chain on torch's autograd ops
(permute, reshape, matmul), for torch.compile, torch.func transforms and forward-mode AD, which trace it
like any torch code, and for double backward.

Shapes in a route keep ``None`` for the batch; :func:`~einstruct.layers.layout.fill` puts in the rows.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as _forward_ad

from .layerplan import Route
from .layout import fill

_functorch_active = torch._C._are_functorch_transforms_active  # vmap, grad, ...: one C call, no tensor read


def traced() -> bool:
    """Whether autograd must see torch's own ops: under torch.func transforms, or forward-mode AD (dual
    tensors), which custom Functions support only in the setup_context form with a jvp."""
    return _functorch_active() or _forward_ad._current_level >= 0


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would run a matmul of ``t`` in, or None outside autocast."""
    dev = t.device.type
    if dev not in ("cpu", "cuda") or t.dtype == torch.float64 or not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


def core_operands(route: Route, cores: tuple, copy: bool = False) -> tuple[torch.Tensor, ...]:
    """Each step's core as its matmul reads it: a strided view of the core where BLAS reads it in place,
    else a contiguous copy; ``copy=True`` copies every permuted core (to keep for a cache scope)."""
    out = []
    for s in route.steps:
        w = cores[s.core]
        if s.core_as_is:
            out.append(w)
        elif s.core_perm is None:
            out.append(w.view(s.core_shape) if w.is_contiguous() else w.reshape(s.core_shape).contiguous())
        elif s.core_view and not copy:
            out.append(w.permute(s.core_perm).view(s.core_shape))
        else:
            out.append(w.permute(s.core_perm).reshape(s.core_shape).contiguous())
    return tuple(out)


def forward(
    route: Route,
    x: torch.Tensor,
    n: int,
    bias: torch.Tensor | None,
    ws: tuple,
    saved: list | None = None,
    copied: bool = False,
) -> torch.Tensor:
    """(n, d_in) -> (n, d_out) through the route, plus ``bias``; no autograd. ``x`` is contiguous (``copied``:
    already permuted to the first step's layout) and every operand in one dtype. With ``saved``, appends each
    step's (activation, core) operands."""
    act = x if copied else x.view(fill(route.in_shape, n))
    steps = route.steps
    last = len(steps) - 1
    into = 0 < route.into_rows <= n
    for i, s in enumerate(steps):
        m = n * s.rows
        shape = fill(s.act_shape, m)
        if s.act_perm is None or (copied and i == 0):
            a = act.view(shape)
        elif s.act_view and n > 1:  # strided view read in place (one row: odd strides, copy)
            a = act.permute(s.act_perm).view(shape)
        else:
            a = act.permute(s.act_perm).contiguous().view(shape)
        w = ws[i]
        if saved is not None:
            saved += (a, w)
        if s.core_left:  # (P, M) = core (P, K) @ act (K, M)
            left, right = w, (a if s.act_kr else a.mT)
        else:  # (M, P) = act (M, K) @ core (K, P)
            left, right = (a.mT if s.act_kr else a), w
        mm = torch.bmm if s.batched else torch.mm  # matmul can pick a slow path for odd strides
        if i == last:
            if into:  # written straight into y's memory order: no final copy
                y = a.new_empty((n, route.d_out))
                into = y.view(fill(route.final_shape, n)).permute(route.final_inverse).view(fill(s.out_matrix, m))
                mm(left, right, out=into)
                return y if bias is None else y.add_(bias)
            if route.fuse_bias and bias is not None:  # as nn.Linear: one pass over y
                return torch.addmm(bias, left, right)
        act = mm(left, right).view(fill(s.out_shape, n))
    if route.final_perm is None:
        y = act.view(n, route.d_out)
        return y if bias is None else y.add_(bias)
    y = act.new_empty((n, route.d_out))  # the final permute and the bias in one pass
    view = y.view(fill(route.final_shape, n))
    if bias is None:
        view.copy_(act.permute(route.final_perm))
    else:
        torch.add(act.permute(route.final_perm), bias.view(route.final_shape[1:]), out=view)
    return y


def backward(
    route: Route,
    saved: tuple,
    gy: torch.Tensor,
    n: int,
    need_x: bool,
    need_cores: tuple[bool, ...],
    copied: bool = False,
) -> tuple[torch.Tensor | None, list]:
    """Gradients of :func:`forward` for the output gradient ``gy``: (input, [core per execution index]); with
    ``copied``, the input's gradient is laid out like the permuted input the forward was given.

    Every gradient is laid out like the operand it belongs to; an activation gradient permuted back into the
    previous step's layout is read as a strided view where the plan says BLAS can, else copied.
    """
    steps = route.steps
    gy = gy if gy.is_contiguous() else gy.contiguous()
    s = steps[-1]
    mat = fill(s.out_matrix, n * s.rows)
    if route.final_perm is None:
        g = gy.view(mat)
    else:
        gp = gy.view(fill(route.final_shape, n)).permute(route.final_inverse)
        g = gp.view(mat) if 0 < route.into_rows <= n else gp.contiguous().view(mat)
    gcores = [None] * len(need_cores)
    gx = None
    for i in range(len(steps) - 1, -1, -1):
        s = steps[i]
        a, w = saved[2 * i], saved[2 * i + 1]
        mm = torch.bmm if s.batched else torch.mm
        if need_cores[s.core]:  # laid out like w: (P, K) when core_left, else (K, P)
            if s.core_left:
                gw = mm(g, a.mT if s.act_kr else a)
            else:
                gw = mm(a if s.act_kr else a.mT, g)
            if not s.core_as_is:
                gw = gw.view(s.core_dims)
            gcores[s.core] = gw if s.core_inverse is None else gw.permute(s.core_inverse)
        if i == 0 and not need_x:
            break
        if s.act_kr:  # laid out like a: (K, M) when act_kr, else (M, K)
            ga = mm(w.mT, g) if s.core_left else mm(w, g.mT)
        else:
            ga = mm(g.mT, w) if s.core_left else mm(g, w.mT)
        if i == 0:
            if copied:
                gx = ga.view(fill(s.act_dims, n))
            else:
                gx = ga if s.act_perm is None else ga.view(fill(s.act_dims, n)).permute(s.act_inverse)
                gx = gx.reshape(n, route.d_in)
            break
        gp = ga if s.act_perm is None else ga.view(fill(s.act_dims, n)).permute(s.act_inverse)
        prev = steps[i - 1]
        mat = fill(prev.out_matrix, n * prev.rows)
        if s.act_perm is None:
            g = ga.view(mat)
        elif s.grad_view and n > 1:
            g = gp.view(mat)
        else:
            g = gp.contiguous().view(mat)
    return gx, gcores


def run_ops(route: Route, x: torch.Tensor, n: int, bias: torch.Tensor | None, cores: tuple) -> torch.Tensor:
    """The chain on torch's own autograd ops in the route's layouts and matmul forms; ``x`` is (n, d_in), the
    result (n, d_out) plus ``bias``."""
    act = x.reshape(fill(route.in_shape, n))
    last = len(route.steps) - 1
    for i, s in enumerate(route.steps):
        a = (act if s.act_perm is None else act.permute(s.act_perm)).reshape(fill(s.act_shape, n * s.rows))
        w = cores[s.core]
        w = (w if s.core_perm is None else w.permute(s.core_perm)).reshape(s.core_shape)
        a = a.mT if s.act_kr else a  # (M, K)
        if s.core_left:  # (P, M) = core (P, K) @ act^T
            out = torch.matmul(w, a.mT)
        elif i == last and bias is not None and route.fuse_bias:  # a 2-D (M, P) product: bias via addmm
            out, bias = torch.addmm(bias.to(a.dtype), a, w), None
        else:  # (M, K) @ (K, P)
            out = torch.matmul(a, w)
        act = out.view(fill(s.out_shape, n))
    if route.final_perm is not None:
        act = act.permute(route.final_perm)
    act = act.reshape(n, route.d_out)
    return act if bias is None else act + bias.to(act.dtype)


def train(route: Route, x: torch.Tensor, n: int, bias: torch.Tensor | None, cores: tuple) -> torch.Tensor:
    """The chain for autograd: one :class:`_Chain` node. A first step that copies ``x`` into its layout does
    it in the graph, before the node, so the node keeps that copy and not ``x`` as well."""
    s = route.steps[0]
    copied = s.act_perm is not None and not (s.act_view and n > 1)
    if copied:
        x = torch.permute_copy(x.view(fill(route.in_shape, n)), s.act_perm)  # one node: cheaper than two
    return _Chain.apply(x, bias, route, n, copied, *cores)


class _Chain(torch.autograd.Function):
    """The whole chain as one autograd node: ``_Chain.apply(x, bias, route, n, copied, *cores)`` -> (n, d_out).

    The classic ``forward(ctx, ...)`` form, which binds several times faster per call than the
    ``setup_context`` form; that form is what torch.func transforms need, so under them (and under
    torch.compile and forward-mode AD: :func:`traced`) the layer runs :func:`run_ops` instead. The forward
    saves its inputs and each step's operands as it used them (views of ``x`` and of the cores where no copy
    was needed, so in-place changes to those are caught); the backward writes no Python-side state and reads
    no tensor values. A backward that records a graph (``create_graph=True``: double backward)
    differentiates :func:`run_ops` on the saved inputs instead, so higher derivatives are exact.
    """

    @staticmethod
    def forward(ctx, x, bias, route, n, copied, *cores):
        saved = [x, bias, *cores]  # the inputs (for double backward; x is the first operand or its base)
        y = forward(route, x, n, bias, core_operands(route, cores), saved, copied)
        ctx.save_for_backward(*saved)
        ctx.route, ctx.copied = route, copied
        return y

    @staticmethod
    def backward(ctx, gy):
        needs = ctx.needs_input_grad
        route, copied = ctx.route, ctx.copied
        k = len(needs) - 3  # x, bias and the cores come first, then the step operands
        saved = ctx.saved_tensors
        if torch.is_grad_enabled():
            return tuple(_recorded_backward(route, saved[:k], gy, needs, copied))
        gx, gcores = backward(route, saved[k:], gy, gy.shape[0], needs[0], needs[5:], copied)
        gb = gy.sum(0) if needs[1] else None
        return (gx, gb, None, None, None, *gcores)


def _recorded_backward(route: Route, inputs: tuple, gy: torch.Tensor, needs: tuple, copied: bool) -> list:
    """Gradients of the chain with a graph of their own (double backward): autograd through :func:`run_ops`."""
    x, bias, *cores = inputs
    wrt = [t for t, need in zip((x, bias, None, None, None, *cores), needs) if need]
    n = gy.shape[0]
    with torch.enable_grad():
        xin = x.permute(route.steps[0].act_inverse).reshape(n, route.d_in) if copied else x
        y = run_ops(route, xin, n, bias, tuple(cores))
        grads = iter(torch.autograd.grad(y, wrt, gy, create_graph=True, allow_unused=True))
    return [next(grads) if need else None for need in needs]
