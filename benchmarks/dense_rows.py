"""Where cached inference should run on the materialised matrix: `python -m benchmarks.dense_rows`.

Times, side by side in one process (alternating, best of ``--repeats`` rounds of ``--calls`` calls), a no-grad
forward of a StructuredLinear inside ``es.inference_cache`` on its factored chain (``dense_rows = 0``) and on
the cached dense matrix (every batch), for the search's kinds of structure at square widths 32-512 and batches
of 256 (a training batch) and 4096 (the regression task's evaluation set), and prints the ratio dense / chain
with the batch limit the default rule gives (``einstruct.layers.layerplan.default_dense_rows``: ``any``, a
number, or 0). Both paths compute the same function; only their time differs. One intra-op thread by default,
as the search's small trials run.
"""

from __future__ import annotations

import argparse
import time

import torch

import einstruct as es
from einstruct.layers.layerplan import ANY_BATCH

STRUCTURES = {
    "theta (search, psi 0.8)": lambda: es.theta(0.93, 0.011, 0.059, 0.114, 0.793, 0.093, 0.05),
    "theta (search, psi 0.9)": lambda: es.theta(0.763, 0.161, 0.076, 0.041, 0.875, 0.08, 0.1),
    "btt r=1": lambda: es.presets.btt(rank=1),
    "monarch 4": lambda: es.presets.monarch(blocks=4),
    "low rank d/4": lambda: es.theta(1, 0, 0, 0, 1, 0, 0.5),
}


def best(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def measure(layer, x: torch.Tensor, repeats: int, calls: int) -> tuple[float, float]:
    """(chain seconds, dense seconds) per call, alternating the two paths every round."""
    default = layer.dense_rows
    times: dict[str, list[float]] = {"chain": [], "dense": []}
    with torch.no_grad(), es.inference_cache(layer):
        for _ in range(repeats):
            for path, rows in (("chain", 0), ("dense", ANY_BATCH)):
                layer.dense_rows = rows
                layer(x)  # warm (and the dense matrix built)
                times[path].append(best(lambda: layer(x), calls))
    layer.dense_rows = default
    return min(times["chain"]), min(times["dense"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    ap.add_argument("--batches", type=int, nargs="+", default=[256, 4096])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{'structure':24s} {'d':>5s} {'rows':>5s} {'chain us':>9s} {'dense us':>9s} {'dense/chain':>11s}  rule")
    for d in args.widths:
        for name, make in STRUCTURES.items():
            layer = es.StructuredLinear(d, d, make())
            rule = layer.dense_rows
            for n in args.batches:
                chain, dense = measure(layer, torch.randn(n, d), args.repeats, args.calls)
                picks = "any" if rule == ANY_BATCH else str(rule)
                runs = "dense" if n <= rule else "chain"
                times = f"{1e6 * chain:9.1f} {1e6 * dense:9.1f} {dense / chain:11.2f}"
                print(f"{name:24s} {d:5d} {n:5d} {times}  {picks} ({runs})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
