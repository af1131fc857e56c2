"""Budgeted training: train one structure on one task for an exact FLOP allowance.

    result = train.run(task, spec=es.presets.btt(rank=1), width=256, train_flops=2e11, seed=0)
    result.loss, result.curve, result.train_flops, result.steps, result.seconds

``result.seconds`` is the wall time from model construction (the memory check, the build, the muP groups and
the optimizer) to the last evaluation, checkpoint writes and compile time included; making data is not in it
(``result.data_seconds``). The step's optimizer, clipping and rate writes are in search.step (fused AdamW
called directly, one clip over a fixed parameter list); ``compile="default"`` or ``"reduce-overhead"`` (CUDA)
compiles forward and loss, its first step's time reported as ``result.compile_seconds`` and never charged as
FLOPs.

The number of steps is floor(allowance / FLOPs per step), so the FLOPs spent never exceed the
allowance; FLOPs per step come from the compiled structures (search.flops), not from tracing. AdamW
with the task's muP parameter groups; warmup then a constant rate by default (so intermediate points
are fair frontier points, THEORY 8), cosine to 0 as an option; gradient clipping; bf16 autocast on CUDA.
The held-out loss is measured at evenly spaced FLOP marks (evaluation FLOPs are not charged). A NaN or
a blow-up of the training loss stops the run with a reason instead of raising. The loss is read back
from the device only every ``check_every`` steps.

Checkpoints: with ``checkpoint=path`` and ``checkpoint_every=N`` the model, optimizer, step, generator and
curves are saved every N steps, packed into one flat tensor per dtype (search.checkpoints; written to a
temporary file, then renamed, so a file on disk is always whole), and a run that finds a matching
checkpoint continues from it with the same result as an uninterrupted run. ``on_bound(flops)`` is told,
before they are spent (the first time before the model is built), the FLOPs the run may have spent by its
next checkpoint: what a budget must charge if the process dies (it is told before the checkpoint is
written, so a run whose budget was revoked stops without writing one). ``require_step=s`` pins where the
run starts: 0 ignores any file, s > 0 resumes from a checkpoint at exactly step s or raises, so a caller
that reserved FLOPs for the steps after s never pays for more.

Several devices: under ``torchrun`` (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel and
every rank trains on its slice of the same global batch (search.distributed); FLOPs are summed over ranks.

    torchrun --nproc-per-node 2 -m search.train --task regression --spec btt --width 64 --train-flops 1e9
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import einstruct as es

from . import distributed
from . import threads as trial_threads
from .checkpoints import checkpoint_step, copy_checkpoint, load_checkpoint, pack  # noqa: F401  (train's names)
from .errors import SearchError
from .step import Step, check_compile, loss_function, optimizer
from .tasks.base import Task, check_positive

BLOWUP = 10.0  # the training loss above BLOWUP x its first value counts as divergence


@dataclass(frozen=True)
class Result:
    loss: float  # held-out loss at the end (nan if the run diverged)
    curve: tuple[tuple[int, float], ...]  # (training FLOPs spent, held-out loss) at the evaluation marks
    train_curve: tuple[tuple[int, float], ...]  # (training FLOPs spent, mean training loss since last point)
    train_flops: int  # FLOPs actually spent: steps x flops_per_step <= the allowance
    steps: int
    seconds: float  # wall time from model construction to the last evaluation (compile time included)
    flops_per_step: int
    params: int
    width: int
    spec: str
    data_seconds: float = 0.0  # making data (reported, not charged)
    diverged: bool = False
    reason: str = ""
    settings: dict = field(default_factory=dict)
    resumed_step: int = 0  # the step a checkpoint let this run start from (0: from scratch)
    ranks: int = 1  # processes that shared each step (torchrun)
    compile_seconds: float = 0.0  # the first step's wall time when compiling (in seconds too; never FLOPs)


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
    _, per_step = shapes(task, spec, width)
    return int(train_flops // per_step), per_step


_SHAPES: dict = {}  # (task, spec, width) -> (meta model, FLOPs per step): the last few candidates


def shapes(task: Task, spec, width: int) -> tuple[torch.nn.Module, int]:
    """The candidate built on the meta device, and its FLOPs per step: built once for plan() and for the
    memory check of the run that follows (a meta build costs as much as a real one on a small model)."""
    try:
        key = (id(task), spec, width)
        hit = _SHAPES.get(key)
    except TypeError:  # an unhashable spec: no cache
        key, hit = None, None
    if hit is not None and hit[0] is task:
        return hit[1], hit[2]
    model = task.build(spec, width, device="meta")
    per_step = task.flops_per_step(model)
    if key is not None:
        if len(_SHAPES) >= 16:
            _SHAPES.pop(next(iter(_SHAPES)))
        _SHAPES[key] = (task, model, per_step)  # the task is kept, so its id is not reused meanwhile
    return model, per_step


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
    checkpoint: str | None = None,
    checkpoint_every: int = 0,
    on_bound: Callable[[int], None] | None = None,
    require_step: int | None = None,
    compile: str = "off",
    threads: int | None = None,
) -> Result:
    """Train ``spec`` (None or 'dense' for dense) at ``width`` on ``task`` for at most ``train_flops``.

    ``threads``: None leaves torch's intra-op thread count as it is; else the search's ``--threads`` (0: one
    thread for a small step, else the count as it is; N: N threads on a CPU; search.threads), restored after."""
    check_positive("train_flops", train_flops, float)
    if schedule not in ("constant", "cosine"):
        raise SearchError(f"schedule {schedule!r} is not known; use 'constant' (warmup then flat) or 'cosine'")
    check_compile(compile)
    hp = task.hyper
    lr = hp.lr if lr is None else check_positive("lr", lr, float)
    world, dev = distributed.setup(resolve_device(device))
    try:
        n_threads = None
        if threads is not None:
            n_threads = trial_threads.for_trial(threads, shapes(task, spec, width)[1], dev, torch.get_num_threads())
        with trial_threads.used(n_threads):
            return _run(
                task,
                spec,
                width,
                train_flops,
                seed,
                lr,
                schedule,
                warmup,
                dev,
                evals,
                check_every,
                callback,
                checkpoint,
                checkpoint_every,
                on_bound,
                world,
                require_step,
                compile,
            )
    finally:
        distributed.teardown(world)


def _run(
    task,
    spec,
    width,
    train_flops,
    seed,
    lr,
    schedule,
    warmup,
    dev,
    evals,
    check_every,
    callback,
    checkpoint,
    checkpoint_every,
    on_bound,
    world,
    require_step=None,
    compile="off",
) -> Result:
    hp = task.hyper

    # 1. Data (reported, not charged); the plan from the candidate's meta-device build; a matching checkpoint; the
    # bound told before anything is built or spent.
    data_seconds = task.prepare(seed)
    meta, per_step = shapes(task, spec, width)
    task.check_memory(meta, dev)  # a model that cannot fit is refused first, whatever its allowance
    steps = int(train_flops // per_step)
    label = _label(spec)
    if steps < 1:
        raise SearchError(
            f"an allowance of {train_flops:.3g} FLOPs is less than one step of {label} at width {width} "
            f"({per_step:.3g} FLOPs); raise train_flops or lower the width"
        )
    warmup = _warmup(hp, steps, warmup)
    marks = sorted({max(1, round(steps * k / evals)) for k in range(1, evals + 1)})
    every = 0
    if checkpoint and checkpoint_every:
        every = -(-int(checkpoint_every) // check_every) * check_every  # saves fall on loss read-backs
    key = fingerprint(label, width, per_step, steps, seed, lr, schedule, warmup, world.size, task.describe())
    state = load_checkpoint(checkpoint, key) if every and require_step != 0 else None
    if require_step and (state is None or int(state["step"]) != int(require_step)):
        raise SearchError(f"checkpoint {checkpoint} is not the one at step {require_step} this run was planned from")
    start = int(state["step"]) if state is not None else 0
    if on_bound is not None and world.main:
        on_bound(min(steps, start + every if every else steps) * per_step)

    # 2. The model with its muP parameter groups and optimizer: the run's time starts here.
    t0 = time.perf_counter()
    model = task.build(spec, width, device=dev, seed=seed, shapes=meta)
    opt = optimizer(task.param_groups(model, lr), lr, hp)
    net = model
    if world.active:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    step_fn = Step(loss_function(task, compile, dev), net, model, opt, hp.clip, graphs=compile == "reduce-overhead")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()

    modes = mode_setter(model)

    # 3. The loop, from the checkpoint if there is one.
    gen = torch.Generator().manual_seed(seed)
    curve, train_curve = [], []
    running = torch.zeros((), device=dev)
    since, first_loss, reason = 0, None, ""
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"].clone())
        torch.set_rng_state(state["torch_rng"].clone())
        curve, train_curve = [tuple(p) for p in state["curve"]], [tuple(p) for p in state["train_curve"]]
        first_loss = state["first_loss"]
    done = start
    compile_seconds = 0.0
    for step in range(start, steps):
        batch = distributed.shard(task.batch(step, gen, dev), world, hp.batch)
        if compile != "off" and step == start:
            t1 = time.perf_counter()
            loss = step_fn(batch, lr_factor(step, steps, warmup, schedule), autocast)
            compile_seconds = time.perf_counter() - t1  # the first step: compiling, and one step of training
        else:
            loss = step_fn(batch, lr_factor(step, steps, warmup, schedule), autocast)
        done = step + 1
        running += loss.detach()
        since += 1
        if done % check_every == 0 or done in marks or done == steps:
            mean = float(distributed.all_sum(running, world)) / since / world.size  # one read-back per check
            running.zero_()
            since = 0
            if first_loss is None:
                first_loss = mean
            train_curve.append((done * per_step, mean))
            if not math.isfinite(mean):
                reason = f"training loss is {mean} at step {done}"
            elif first_loss > 0 and mean > BLOWUP * first_loss:
                reason = (
                    f"training loss blew up to {mean:.4g} (> {BLOWUP:g}x its first value {first_loss:.4g}) "
                    f"at step {done}"
                )
            if callback is not None:
                callback({"step": done, "steps": steps, "train_flops": done * per_step, "loss": mean})
            if reason:
                break
        if done in marks:
            modes(False)
            with autocast, es.inference_cache(model):  # weights are fixed while evaluating
                ev = float(task.eval_loss(model, dev))
            modes(True)
            curve.append((done * per_step, ev))
        if every and done % every == 0 and done < steps and not reason:
            if world.main:
                if on_bound is not None:  # before spending the next stretch, and before saving: a revoked run stops
                    on_bound(min(steps, done + every) * per_step)
                save_checkpoint(
                    checkpoint,
                    {
                        "key": key,
                        "step": done,
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "generator": gen.get_state(),
                        "torch_rng": torch.get_rng_state(),
                        "first_loss": first_loss,
                        "curve": [list(p) for p in curve],
                        "train_curve": [list(p) for p in train_curve],
                    },
                )
            distributed.barrier(world)
    seconds = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    return Result(
        loss=float("nan") if reason else (curve[-1][1] if curve else float("nan")),
        curve=tuple(curve),
        train_curve=tuple(train_curve),
        train_flops=_spent(done, per_step, world),
        steps=done,
        seconds=seconds,
        flops_per_step=per_step,
        params=params,
        width=width,
        spec=label,
        data_seconds=data_seconds,
        diverged=bool(reason),
        reason=reason,
        settings={
            "lr": lr,
            "schedule": schedule,
            "warmup": warmup,
            "seed": seed,
            "device": str(dev),
            "compile": compile,
            **task.describe(),
        },
        resumed_step=start,
        ranks=world.size,
        compile_seconds=compile_seconds,
    )


def mode_setter(model: torch.nn.Module) -> Callable[[bool], None]:
    """``set(training)``: what ``model.train(training)`` does, without walking the module tree at every call.

    ``Module.train`` sets ``training`` on the module and every descendant; where no module overrides
    ``train`` that is what the setter does, over a list of the modules taken once (the tree does not change
    during a run). A model with its own ``train`` gets ``model.train`` itself."""
    mods = list(model.modules())
    if any(type(m).train is not torch.nn.Module.train for m in mods):
        return model.train

    def set_training(training: bool) -> None:
        for m in mods:
            m.training = training

    return set_training


def _spent(done: int, per_step: int, world) -> int:
    """FLOPs of ``done`` global steps, summed over the ranks that each spent their slice of every step."""
    local = torch.tensor(done * per_step // world.size if world.active else done * per_step, dtype=torch.int64)
    return int(distributed.all_sum(local, world))


def fingerprint(*parts) -> str:
    """What a checkpoint must match to be resumed: the run's structure, size, schedule, seed and task."""
    return repr(parts)


def checkpoint_key(
    task: Task,
    spec,
    width: int,
    train_flops: float,
    seed: int = 0,
    *,
    lr: float | None = None,
    schedule: str = "constant",
    warmup: int | None = None,
    ranks: int = 1,
) -> str:
    """The fingerprint ``run`` gives its checkpoints for these arguments (computed without training)."""
    steps, per_step = plan(task, spec, width, train_flops)
    hp = task.hyper
    lr = hp.lr if lr is None else lr
    warmup = _warmup(hp, steps, warmup)
    return fingerprint(_label(spec), width, per_step, steps, seed, lr, schedule, warmup, ranks, task.describe())


def _warmup(hp, steps: int, warmup) -> int:
    return min(hp.max_warmup, max(1, round(hp.warmup_frac * steps))) if warmup is None else max(1, int(warmup))


def _label(spec) -> str:
    return getattr(spec, "label", None) or getattr(spec, "einsum", None) or str(spec or "dense")


def save_checkpoint(path: str, state: dict) -> None:
    """Write ``state`` packed into a few flat tensors (search.checkpoints) to a temporary file, then rename: a
    checkpoint on disk is always complete."""
    from . import faults
    from .outputs import temp_path

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = temp_path(path)
    torch.save(pack(state), tmp)
    faults.point("checkpoint_before_rename")
    os.replace(tmp, path)
    faults.point("after_checkpoint")


def check_device(device) -> torch.device:
    """``resolve_device``, refusing also what cannot train: the meta device (shapes only, no data), a GPU index
    that is not there, and a device kind this torch cannot allocate on. For command lines."""
    dev = resolve_device(device)
    if dev.type == "meta":
        raise SearchError(
            f"device {device!r} holds tensor shapes only, no data, so nothing can be trained on it; "
            "use auto, cpu or cuda"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SearchError(
            f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered "
            f"from 0; use cuda or cuda:0 .. cuda:{torch.cuda.device_count() - 1}"
        )
    if dev.type not in ("cpu", "cuda"):
        try:
            torch.empty(1, device=dev)
        except Exception:  # whatever the backend says, it cannot train here
            raise SearchError(f"device {device!r} is not available here; use auto, cpu or cuda") from None
    return dev


def main(argv=None) -> int:
    """``python -m search.train`` (or under torchrun): one budgeted training run; rank 0 prints a JSON line."""
    from .train_cli import main as cli

    return cli(argv)


if __name__ == "__main__":
    distributed.exit_process(main())
