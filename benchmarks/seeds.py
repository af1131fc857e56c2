"""Seeds trained together as one batched model against one at a time: `python -m benchmarks.seeds`.

The confirmation phase (search.confirm) trains every confirmed structure on several fresh seeds. This measures
whether training the seeds of one candidate together pays: ``--seeds`` models of the regression task's trial
model (muP init per seed), their parameters stacked (``torch.func.stack_module_state``) and the step run
under ``torch.func.vmap`` (per-seed batches, per-seed MSE, per-seed gradient clipping, one fused AdamW over
the stacked parameters at the task's rate: the muP groups' rates change no cost), against the search's own
step (search.step) on one model, ``--seeds`` times as many steps. Both sides alternate, ``--rounds`` rounds,
best of each; the ratio is batched / (seeds x single): below 1 the batched model saves wall time. One thread
(as the search runs small steps). Only ratios of one run mean anything on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

import einstruct as es
from search import step as stepmod
from search import train
from search.tasks import get

STRUCTURES = {
    "dense": None,
    "btt r=1": es.presets.btt(rank=1),
    "theta": es.theta(0.566, 0.075, 0.359, 0.159, 0.827, 0.014, 0.068),
}


def _batched(task, spec, width, seeds):
    meta, _ = train.shapes(task, spec, width)
    models = [task.build(spec, width, device="cpu", seed=s, shapes=meta) for s in range(seeds)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    plist = list(params.values())
    opt = torch.optim.AdamW(plist, lr=task.hyper.lr, fused=True)
    gen, cpu, clip = torch.Generator().manual_seed(0), torch.device("cpu"), task.hyper.clip

    def loss(p, b, x, y):
        return F.mse_loss(functional_call(base, (p, b), (x,)).float(), y)

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for i in range(n):
            xs, ys = zip(*(task.batch(i, gen, cpu) for _ in range(seeds)))
            total = vmap(loss)(params, buffers, torch.stack(xs), torch.stack(ys)).sum()
            for p in plist:
                p.grad = None
            total.backward()
            norms = torch.stack([p.grad.flatten(1).norm(dim=1) for p in plist], 1).norm(dim=1)
            scale = torch.clamp(clip / (norms + 1e-6), max=1.0)
            for p in plist:
                p.grad.mul_(scale.view(-1, *[1] * (p.dim() - 1)))
            opt.step()
        return (time.perf_counter() - t0) / n

    return run


def _single(task, spec, width):
    meta, _ = train.shapes(task, spec, width)
    model = task.build(spec, width, device="cpu", seed=0, shapes=meta)
    opt = stepmod.optimizer(task.param_groups(model, task.hyper.lr), task.hyper.lr, task.hyper)
    st = stepmod.Step(task.loss, model, model, opt, task.hyper.clip)
    gen, cpu = torch.Generator().manual_seed(0), torch.device("cpu")

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for i in range(n):
            st(task.batch(i, gen, cpu), 1.0, contextlib.nullcontext())
        return (time.perf_counter() - t0) / n

    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", default="32,128")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    task = get("regression")
    task.prepare(0)
    print(f"torch {torch.__version__}, 1 thread, {args.seeds} seeds; best of {args.rounds} x {args.steps} steps")
    print(
        f"| structure | width | single ms/step | batched ms/step ({args.seeds} seeds) | batched / {args.seeds} single |"
    )
    print("|---|---|---|---|---|")
    for name, spec in STRUCTURES.items():
        for w in (int(w) for w in args.widths.split(",")):
            batched, single = _batched(task, spec, w, args.seeds), _single(task, spec, w)
            best_b = best_s = float("inf")
            for _ in range(args.rounds):
                batched(3)
                best_b = min(best_b, batched(args.steps))
                single(3)
                best_s = min(best_s, single(args.steps))
            print(f"| {name} | {w} | {best_s * 1e3:.2f} | {best_b * 1e3:.2f} | {best_b / (args.seeds * best_s):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
