"""Budgeted training: train one structure on one task for an exact FLOP allowance.

    result = train.run(task, spec=es.presets.btt(rank=1), width=256, train_flops=2e11, seed=0)
    result.loss, result.curve, result.train_flops, result.steps, result.seconds

The number of steps is floor(allowance / FLOPs per step), so the FLOPs spent never exceed the
allowance; FLOPs per step come from the compiled structures (search.flops), not from tracing. AdamW
with the task's muP parameter groups; warmup then a constant rate by default (so intermediate points
are fair frontier points, THEORY 8), cosine to 0 as an option; gradient clipping; bf16 autocast on CUDA.
The held-out loss is measured at evenly spaced FLOP marks (evaluation FLOPs are not charged). A NaN or
a blow-up of the training loss stops the run with a reason instead of raising. The loss is read back
from the device only every ``check_every`` steps.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .errors import SearchError
from .tasks.base import Task, check_positive

BLOWUP = 10.0  # the training loss above BLOWUP x its first value counts as divergence


@dataclass(frozen=True)
class Result:
    loss: float  # held-out loss at the end (nan if the run diverged)
    curve: tuple[tuple[int, float], ...]  # (training FLOPs spent, held-out loss) at the evaluation marks
    train_curve: tuple[tuple[int, float], ...]  # (training FLOPs spent, mean training loss since last point)
    train_flops: int  # FLOPs actually spent: steps x flops_per_step <= the allowance
    steps: int
    seconds: float  # wall time of training and evaluation
    flops_per_step: int
    params: int
    width: int
    spec: str
    data_seconds: float = 0.0  # making data (reported, not charged)
    diverged: bool = False
    reason: str = ""
    settings: dict = field(default_factory=dict)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise SearchError(f"unknown device {device!r}; use auto, cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SearchError("device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    return dev


def plan(task: Task, spec, width: int, train_flops: float) -> tuple[int, int]:
    """(steps, FLOPs per step) for this allowance, from a model built on the meta device (no memory)."""
    model = task.build(spec, width, device="meta")
    per_step = task.flops_per_step(model)
    return int(train_flops // per_step), per_step


def lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def run(
    task: Task,
    spec=None,
    width: int = 128,
    train_flops: float = 1e11,
    seed: int = 0,
    *,
    lr: float | None = None,
    schedule: str = "constant",
    warmup: int | None = None,
    device: str = "auto",
    evals: int = 8,
    check_every: int = 10,
    callback: Callable[[dict], None] | None = None,
) -> Result:
    """Train ``spec`` (None or 'dense' for dense) at ``width`` on ``task`` for at most ``train_flops``."""
    check_positive("train_flops", train_flops, float)
    if schedule not in ("constant", "cosine"):
        raise SearchError(f"schedule {schedule!r} is not known; use 'constant' (warmup then flat) or 'cosine'")
    hp = task.hyper
    lr = hp.lr if lr is None else check_positive("lr", lr, float)
    dev = resolve_device(device)

    # 1. Data (reported, not charged) and the model with its muP parameter groups.
    data_seconds = task.prepare(seed)
    model = task.build(spec, width, device=dev, seed=seed)
    per_step = task.flops_per_step(model)
    steps = int(train_flops // per_step)
    label = getattr(spec, "label", None) or getattr(spec, "einsum", None) or str(spec or "dense")
    if steps < 1:
        raise SearchError(
            f"an allowance of {train_flops:.3g} FLOPs is less than one step of {label} at width {width} "
            f"({per_step:.3g} FLOPs); raise train_flops or lower the width"
        )
    warmup = min(hp.max_warmup, max(1, round(hp.warmup_frac * steps))) if warmup is None else max(1, int(warmup))
    opt = torch.optim.AdamW(task.param_groups(model, lr), lr=lr, betas=hp.betas, weight_decay=hp.weight_decay)
    base_lrs = [g["lr"] for g in opt.param_groups]
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext())
    marks = sorted({max(1, round(steps * k / evals)) for k in range(1, evals + 1)})

    # 2. The loop.
    gen = torch.Generator().manual_seed(seed)
    curve, train_curve = [], []
    running = torch.zeros((), device=dev)
    since, first_loss, reason = 0, None, ""
    t0 = time.perf_counter()
    done = 0
    for step in range(steps):
        f = lr_factor(step, steps, warmup, schedule)
        for g, base in zip(opt.param_groups, base_lrs):
            g["lr"] = base * f
        batch = task.batch(step, gen, dev)
        with autocast:
            loss = task.loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if hp.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), hp.clip)
        opt.step()
        done = step + 1
        running += loss.detach()
        since += 1
        if done % check_every == 0 or done in marks or done == steps:
            mean = float(running) / since  # one read-back every check_every steps
            running.zero_()
            since = 0
            if first_loss is None:
                first_loss = mean
            train_curve.append((done * per_step, mean))
            if not math.isfinite(mean):
                reason = f"training loss is {mean} at step {done}"
            elif first_loss > 0 and mean > BLOWUP * first_loss:
                reason = (f"training loss blew up to {mean:.4g} (> {BLOWUP:g}x its first value {first_loss:.4g}) "
                          f"at step {done}")
            if callback is not None:
                callback({"step": done, "steps": steps, "train_flops": done * per_step, "loss": mean})
            if reason:
                break
        if done in marks:
            model.eval()
            with autocast:
                ev = float(task.eval_loss(model, dev))
            model.train()
            curve.append((done * per_step, ev))
    seconds = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    return Result(
        loss=float("nan") if reason else (curve[-1][1] if curve else float("nan")),
        curve=tuple(curve),
        train_curve=tuple(train_curve),
        train_flops=done * per_step,
        steps=done,
        seconds=seconds,
        flops_per_step=per_step,
        params=params,
        width=width,
        spec=label,
        data_seconds=data_seconds,
        diverged=bool(reason),
        reason=reason,
        settings={"lr": lr, "schedule": schedule, "warmup": warmup, "seed": seed, "device": str(dev),
                  **task.describe()},
    )
