"""Whole-step compile against eager on this machine: `python -m benchmarks.compile_step`.

For each (structure, width) of the default search's trial sizes (regression task, batch 256), trains
``--steps`` steps eagerly and with ``train.run(compile="default")`` (torch.compile of forward + loss, the backward
compiled by AOTAutograd), then ``--repeats`` eager and compiled runs of the same shape interleaved (new models:
what the next trials of that shape pay), the best of each taken, and prints:

- ``eager ms``: ms per step of the eager run (construction and the one evaluation included, as in trials.csv);
- ``compiled ms``: ms per step of the compiled run after its first step;
- ``compile s``: the first compiled step's wall time (``Result.compile_seconds``) with a fresh inductor cache
  (``--warm`` keeps the on-disk cache, which holds the graphs of shapes compiled by earlier processes), and
  ``again s`` the most that any later run of that shape in the process paid (a new model reuses the graph);
- ``pays after``: the steps after which the compiled run has caught up, compile time included
  (compile s / (eager ms - compiled ms)); "never" when the compiled step is not faster.

``--device cuda --modes default reduce-overhead`` measures the same on a GPU (CUDA graphs for the second mode).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile

import einstruct as es

CASES = {
    "dense": None,
    "btt r=1": es.presets.btt(rank=1),
    "theta": es.theta(0.566, 0.075, 0.359, 0.159, 0.827, 0.014, 0.068),
}


def main(argv=None) -> int:
    from search import train
    from search.tasks import get

    p = argparse.ArgumentParser(prog="python -m benchmarks.compile_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=["dense:32", "theta:32", "btt r=1:128", "dense:256"])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--device", default="cpu")
    p.add_argument("--modes", nargs="+", default=["default"])
    p.add_argument("--repeats", type=int, default=3, help="eager and compiled runs, interleaved (best taken)")
    p.add_argument("--warm", action="store_true", help="keep inductor's on-disk cache (default: a fresh one)")
    args = p.parse_args(argv)
    if not args.warm:  # a cold compile, as a search's new shape gets it (the disk cache keeps compiled graphs)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor")
    task = get("regression")
    print("| structure | width | mode | eager ms | compiled ms | compile s | again s | pays after |")
    print("|---|---|---|---|---|---|---|---|")
    for case in args.cases:
        name, width = case.rsplit(":", 1)
        spec, width = CASES[name], int(width)
        _, per_step = train.plan(task, spec, width, 1.0)
        flops = per_step * args.steps
        kw = dict(seed=0, device=args.device, evals=1)
        train.run(task, spec, width, per_step * 10, **kw)  # warm-up
        for mode in args.modes:
            first = train.run(task, spec, width, flops, compile=mode, **kw)
            eager_ms, comp_ms, again_s = math.inf, math.inf, 0.0
            for _ in range(args.repeats):  # interleaved, the best of each: the machine may be shared
                eager = train.run(task, spec, width, flops, **kw)
                eager_ms = min(eager_ms, 1000 * eager.seconds / eager.steps)
                again = train.run(task, spec, width, flops, compile=mode, **kw)
                comp_ms = min(comp_ms, 1000 * (again.seconds - again.compile_seconds) / (again.steps - 1))
                again_s = max(again_s, again.compile_seconds)
            gain = eager_ms - comp_ms
            pays = f"{1000 * first.compile_seconds / gain:,.0f} steps" if gain > 0 else "never"
            print(
                f"| {name} | {width} | {mode} | {eager_ms:.3f} | {comp_ms:.3f} | {first.compile_seconds:.1f} "
                f"| {again_s:.2f} | {pays} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
