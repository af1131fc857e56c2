"""One intra-op thread against several, side by side: `python -m benchmarks.threads`.

For each (structure, width) of the regression task's grid it builds the search's trial model (muP groups,
fused AdamW, clipping: search.step), then times training steps alternately on 1 thread and on ``--threads``
threads (default: this machine's cores), ``--rounds`` rounds of ``--steps`` steps each, and prints the best
ms per step of each side, their ratio, and the step's training FLOPs, against which search.threads'
``SMALL_STEP_FLOPS`` is chosen (the search runs steps below it on one thread). Optionally ``--busy N`` starts
N processes that spin on a core each for the run's length, to measure a machine whose cores are taken
(other workers, other users). Only the ratios of one run mean anything on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import time

import torch

import einstruct as es
from search import step as stepmod
from search import threads, train
from search.tasks import get

STRUCTURES = {"dense": None, "btt r=1": es.presets.btt(rank=1), "monarch 4": es.presets.monarch(blocks=4)}


def _spin(stop) -> None:
    while not stop.is_set():
        pass


def _stepper(task, spec, width):
    meta, per = train.shapes(task, spec, width)
    model = task.build(spec, width, device="cpu", seed=0, shapes=meta)
    opt = stepmod.optimizer(task.param_groups(model, task.hyper.lr), task.hyper.lr, task.hyper)
    st = stepmod.Step(task.loss, model, model, opt, task.hyper.clip)
    gen = torch.Generator().manual_seed(0)
    cpu = torch.device("cpu")

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for i in range(n):
            st(task.batch(i, gen, cpu), 1.0, contextlib.nullcontext())
        return (time.perf_counter() - t0) / n

    return run, per


def measure(widths, many: int, steps: int, rounds: int) -> list[dict]:
    task = get("regression")
    task.prepare(0)
    rows = []
    for name, spec in STRUCTURES.items():
        for w in widths:
            run, per = _stepper(task, spec, w)
            best = {1: float("inf"), many: float("inf")}
            for _ in range(rounds):
                for n in (1, many):
                    with threads.used(n):
                        run(3)  # warm: this thread count's pools
                        best[n] = min(best[n], run(steps))
            rows.append({"structure": name, "width": w, "flops": per, "one": best[1] * 1e3, "many": best[many] * 1e3})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", default="32,64,128,256,512")
    p.add_argument("--threads", type=int, default=threads.cores(), help="the many-thread side (default: the cores)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--busy", type=int, default=0, help="processes spinning on a core each while measuring")
    args = p.parse_args(argv)
    widths = [int(w) for w in args.widths.split(",")]
    stop, spinners = mp.Event(), []
    for _ in range(args.busy):
        spinners.append(mp.Process(target=_spin, args=(stop,), daemon=True))
        spinners[-1].start()
    try:
        rows = measure(widths, args.threads, args.steps, args.rounds)
    finally:
        stop.set()
        for s in spinners:
            s.join()
    print(
        f"torch {torch.__version__}, {threads.cores()} cores, {args.busy} busy; "
        f"best of {args.rounds} x {args.steps} steps"
    )
    print(f"| structure | width | train FLOPs/step | 1 thread ms | {args.threads} threads ms | {args.threads} / 1 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['structure']} | {r['width']} | {r['flops']:.3g} | {r['one']:.2f} | {r['many']:.2f} | "
            f"{r['many'] / r['one']:.2f} |"
        )
    print(f"search.threads.SMALL_STEP_FLOPS = {threads.SMALL_STEP_FLOPS:.3g} (steps below it run on one thread)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
