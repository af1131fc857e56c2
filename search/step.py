"""The parts of a training step that are not the model: the optimizer, gradient clipping, rate changes, compiling.

Small models are bound by per-call overhead, not FLOPs (a level-0 trial of the default search trains a
width-32 MLP), so each part does its work in as few calls as it can, with the same arithmetic as the plain
PyTorch calls it replaces:

- :func:`optimizer`: AdamW with ``fused=True`` (one kernel per parameter group instead of a dozen foreach calls;
  CPU and CUDA), ``foreach=True`` where this torch has no fused AdamW for the device.
- :class:`Step`: the fused AdamW update is called directly, one call per parameter group, as
  ``Optimizer.step`` calls it but without that method's per-step bookkeeping (a profiler record, hooks, lists
  rebuilt and grouped by device, which on a small model cost more than the update itself); the parameter
  list is built once; gradients are cleared by setting them to None, clipped as
  ``torch.nn.utils.clip_grad_norm_`` does (the norm of the per-tensor norms, scaled by
  min(1, max_norm / (norm + 1e-6))) without walking the module tree every step, and the learning rates are
  written only when the schedule's factor changes (during warmup, or every step of a cosine schedule).
- ``compile``: ``"off"`` (eager), ``"default"`` (``torch.compile`` of forward and loss; the backward is compiled
  with it by AOTAutograd) or ``"reduce-overhead"`` (the same with CUDA graphs on CUDA). The optimizer step stays
  eager (fused). Evaluation runs the eager model, so the compiled graph sees one grad mode only. Compile time
  is the wall time of the first step (its one step of training is negligible next to it), reported separately
  and never charged as FLOPs: the number of steps does not change.
"""

from __future__ import annotations

import torch

from .errors import SearchError

COMPILE_MODES = ("off", "default", "reduce-overhead")


def check_compile(mode: str) -> str:
    if mode not in COMPILE_MODES:
        raise SearchError(
            f"compile mode {mode!r} is not known; use off, default or reduce-overhead (CUDA graphs, CUDA only)"
        )
    return mode


def optimizer(groups: list[dict], lr: float, hp) -> torch.optim.AdamW:
    """AdamW over the task's parameter groups, fused where this torch has it for the parameters' device."""
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=hp.betas, weight_decay=hp.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # no fused AdamW here (an older torch, another device)
        return torch.optim.AdamW(groups, lr=lr, betas=hp.betas, weight_decay=hp.weight_decay, foreach=True)


def clip_(params: list[torch.Tensor], max_norm: float) -> None:
    """``torch.nn.utils.clip_grad_norm_(params, max_norm)`` for parameters on one device: the same arithmetic
    (a foreach norm per tensor, the norm of those, one foreach scale), without its per-call grouping."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, torch.clamp(max_norm / (total + 1e-6), max=1.0))


class Step:
    """One optimizer step of ``loss_fn(net, batch)``: ``step(batch, factor)`` returns the loss (not read back)."""

    def __init__(self, loss_fn, net, model, opt: torch.optim.Optimizer, clip: float, graphs: bool = False):
        self.loss_fn, self.net, self.opt, self.clip, self.graphs = loss_fn, net, opt, clip, graphs
        self.params = list(model.parameters())  # in the module tree's order, as clip_grad_norm_ walks it
        self.one_device = len({p.device for p in self.params}) <= 1
        self.base_lrs = [g["lr"] for g in opt.param_groups]
        plain = all(
            not g.get("amsgrad") and not g.get("capturable") and not g.get("differentiable") for g in opt.param_groups
        )
        self.fused = isinstance(opt, torch.optim.AdamW) and bool(opt.defaults.get("fused")) and plain
        self.fused = self.fused and hasattr(torch, "_fused_adamw_")
        self.factor: float | None = None

    def rates(self, factor: float) -> None:
        if factor != self.factor:
            for g, base in zip(self.opt.param_groups, self.base_lrs):
                g["lr"] = base * factor
            self.factor = factor

    def __call__(self, batch, factor: float, autocast) -> torch.Tensor:
        self.rates(factor)
        if self.graphs:  # CUDA graphs: this step's outputs may overwrite the last one's
            torch.compiler.cudagraph_mark_step_begin()
        with autocast:
            loss = self.loss_fn(self.net, batch)
        for p in self.params:
            p.grad = None
        loss.backward()
        if self.clip:
            if self.one_device:
                clip_(self.params, self.clip)
            else:  # parameters on several devices: torch's own grouping
                torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        if not (self.fused and self.fused_step()):
            self.opt.step()
        return loss

    def fused_step(self) -> bool:
        """AdamW's fused update, one call per group, without ``Optimizer.step``'s per-step bookkeeping (profiler
        record, hooks, rebuilding its lists, grouping by device): the same calls ``step()`` makes with
        ``fused=True`` (count the steps up, then ``torch._fused_adamw_``). False, having done nothing, when a
        parameter with a gradient has no optimizer state yet (the first step): ``step()`` then creates it."""
        state, work = self.opt.state, []
        for g in self.opt.param_groups:
            ps, gs, ms, vs, ss = [], [], [], [], []
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = state.get(p)
                if not st:
                    return False
                ps.append(p)
                gs.append(p.grad)
                ms.append(st["exp_avg"])
                vs.append(st["exp_avg_sq"])
                ss.append(st["step"])
            if ps:
                work.append((g, ps, gs, ms, vs, ss))
        for g, ps, gs, ms, vs, ss in work:
            beta1, beta2 = g["betas"]
            torch._foreach_add_(ss, 1)
            torch._fused_adamw_(
                ps,
                gs,
                ms,
                vs,
                [],
                ss,
                amsgrad=False,
                lr=g["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=g["weight_decay"],
                eps=g["eps"],
                maximize=g["maximize"],
                grad_scale=None,
                found_inf=None,
            )
        return True


_compiled: dict = {}  # (task class, mode) -> the compiled loss: one torch.compile per kind, reused across trials


def loss_function(task, mode: str, device: torch.device):
    """``task.loss`` eager, or compiled once per (task kind, mode) so that a shape seen before is not compiled
    again (dynamo caches graphs per function and guards on shapes; widths are few)."""
    check_compile(mode)
    if mode == "off":
        return task.loss
    if mode == "reduce-overhead" and device.type != "cuda":
        raise SearchError("compile mode reduce-overhead uses CUDA graphs and needs --device cuda; use default on CPU")
    key = (type(task), mode)
    fn = _compiled.get(key)
    if fn is None:
        loss = type(task).loss

        def step_loss(task_, net, batch):
            return loss(task_, net, batch)

        fn = _compiled[key] = torch.compile(step_loss, mode=mode, dynamic=False)
    return lambda net, batch: fn(task, net, batch)
