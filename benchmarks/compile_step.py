"""Whole-step compile against eager on this machine: `python -m benchmarks.compile_step`.

For each (structure, width) of the default search's trial sizes (regression task, batch 256), trains
``--steps`` steps eagerly and with ``train.run(compile="default")`` (torch.compile of forward + loss, the backward
compiled by AOTAutograd), then a second compiled run of the same shape (a new model: what the next trial of
that shape pays), and prints:

- ``eager ms``: ms per step of the eager run (construction and the one evaluation included, as in trials.csv);
- ``compiled ms``: ms per step of the compiled run after its first step;
- ``compile s``: the first compiled step's wall time (``Result.compile_seconds``), and ``again s`` the same for the
  second run of that shape;
- ``pays after``: the steps after which the compiled run has caught up, compile time included
  (compile s / (eager ms - compiled ms)); "never" when the compiled step is not faster.

``--device cuda --modes default reduce-overhead`` measures the same on a GPU (CUDA graphs for the second mode).
"""

from __future__ import annotations

import argparse

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
    args = p.parse_args(argv)
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
        eager = train.run(task, spec, width, flops, **kw)
        eager_ms = 1000 * eager.seconds / eager.steps
        for mode in args.modes:
            first = train.run(task, spec, width, flops, compile=mode, **kw)
            again = train.run(task, spec, width, flops, compile=mode, **kw)
            comp_ms = 1000 * (again.seconds - again.compile_seconds) / (again.steps - 1)
            gain = eager_ms - comp_ms
            pays = f"{1000 * first.compile_seconds / gain:,.0f} steps" if gain > 0 else "never"
            print(
                f"| {name} | {width} | {mode} | {eager_ms:.3f} | {comp_ms:.3f} | {first.compile_seconds:.1f} "
                f"| {again.compile_seconds:.2f} | {pays} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
