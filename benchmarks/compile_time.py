"""Compile + analysis time per spec, cold (all caches cleared) and warm: `python -m benchmarks.compile_time`.

Targets (issue: compiler): under 5 ms for two cores, under 50 ms for four, cold.
"""

from __future__ import annotations

import argparse
import statistics
import time

import einstruct as es
from einstruct import analysis, compiler, resolve


def specs() -> dict:
    quarter = {a: "d_in^1/4" for a in "abcd"} | {a: "d_out^1/4" for a in "efgh"}
    return {
        "dense (1 core)": es.presets.dense(),
        "low_rank r=16 (2)": es.presets.low_rank(rank=16),
        "kron (2)": es.presets.kron(),
        "btt r=4 (2)": es.presets.btt(rank=4),
        "monarch b=16 (2)": es.presets.monarch(blocks=16),
        "theta generic rho (2)": es.theta(0.5, 0.25, 0.25, 0.25, 0.5, 0.25, 0.25),
        "tt 3 cores": es.Spec("abc,aer,bfrs,cgs->efg", a="d_in^1/3", b="d_in^1/3", c="d_in^1/3",
                              e="d_out^1/3", f="d_out^1/3", g="d_out^1/3", r=4, s=4),
        "tt 4 cores": es.Spec("abcd,aer,bfrs,cgst,dht->efgh", r=4, s=4, t=4, **quarter),
    }


def clear() -> None:
    compiler._compile.cache_clear()
    resolve.best_split.cache_clear()
    analysis.taxonomy.cache_clear()


def measure(spec, dims, repeats: int) -> tuple[float, float]:
    cold, warm = [], []
    for _ in range(repeats):
        for d in dims:
            clear()
            t = time.perf_counter()
            es.compile(spec, d)
            cold.append(time.perf_counter() - t)
            t = time.perf_counter()
            es.compile(spec, d)
            warm.append(time.perf_counter() - t)
    return statistics.median(cold) * 1e3, statistics.median(warm) * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    dims = (768, 1024, 3072, 4096)
    print(f"{'spec':24s} {'cores':>5s} {'cold ms':>8s} {'warm us':>8s} {'target ms':>9s}")
    for name, spec in specs().items():
        cold, warm = measure(spec, dims, args.repeats)
        k = len(spec.cores)
        target = 5 if k <= 2 else 50
        flag = "ok" if cold < target else "SLOW"
        print(f"{name:24s} {k:5d} {cold:8.2f} {warm:8.1f} {target:9d}  {flag}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
