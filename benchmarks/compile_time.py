"""Compile + analysis time per spec, cold (all caches cleared) and warm: `python -m benchmarks.compile_time`.

Targets (issues: compiler; 14, defect 7): cold, under 5 ms for two cores, under 50 ms for three or four,
under 500 ms for a 12-core tensor train and under 5 s for a 16-core one (integer sizes and d_in^1/k
sizes); the butterflies have the tensor trains' targets by core count. Before issue 14 a cold compile
took 78-101 ms at 8 cores, 441-629 ms at 10 and 3.0-3.7 s at 12, and 13 or more cores were refused.
"""

from __future__ import annotations

import argparse
import statistics
import string
import time

import einstruct as es
from einstruct import analysis, compiler, resolve

LETTERS = string.ascii_letters


def tensor_train(k: int, in_size="d_in^1/{k}", out_size="d_out^1/{k}", rank: int = 4) -> es.Spec:
    """k cores in a path: core j reads input axis j, makes output axis j, bonds to cores j - 1 and j + 1."""
    a, e, b = LETTERS[:k], LETTERS[k : 2 * k], LETTERS[2 * k : 3 * k - 1]
    cores = [a[j] + e[j] + (b[j - 1] if j else "") + (b[j] if j < k - 1 else "") for j in range(k)]
    fmt = lambda s: s.format(k=k) if isinstance(s, str) else s
    sizes = {c: fmt(in_size) for c in a} | {c: fmt(out_size) for c in e} | {c: rank for c in b}
    return es.Spec(a + "," + ",".join(cores) + "->" + e, label=f"tt{k}", **sizes)


def butterfly(levels: int) -> es.Spec:
    """log2(d) cores of 2x2 blocks: core t mixes bit t (input a_t -> output b_t), batched over the others."""
    a, b = LETTERS[:levels], LETTERS[levels : 2 * levels]
    cores = [b[:t] + a[t] + b[t] + a[t + 1 :] for t in range(levels)]
    return es.Spec(a + "," + ",".join(cores) + "->" + b, label=f"butterfly{levels}", **{c: 2 for c in a + b})


def specs() -> dict:
    """name -> (spec, layer sizes d to compile at, cold target in ms)."""
    dims = (768, 1024, 3072, 4096)
    quarter = {a: "d_in^1/4" for a in "abcd"} | {a: "d_out^1/4" for a in "efgh"}
    out = {
        "dense (1 core)": (es.presets.dense(), dims, 5),
        "low_rank r=16 (2)": (es.presets.low_rank(rank=16), dims, 5),
        "kron (2)": (es.presets.kron(), dims, 5),
        "btt r=4 (2)": (es.presets.btt(rank=4), dims, 5),
        "monarch b=16 (2)": (es.presets.monarch(blocks=16), dims, 5),
        "theta generic rho (2)": (es.theta(0.5, 0.25, 0.25, 0.25, 0.5, 0.25, 0.25), dims, 5),
        "tt 3 cores": (
            es.Spec(
                "abc,aer,bfrs,cgs->efg",
                a="d_in^1/3",
                b="d_in^1/3",
                c="d_in^1/3",
                e="d_out^1/3",
                f="d_out^1/3",
                g="d_out^1/3",
                r=4,
                s=4,
            ),
            dims,
            50,
        ),
        "tt 4 cores": (es.Spec("abcd,aer,bfrs,cgst,dht->efgh", r=4, s=4, t=4, **quarter), dims, 50),
    }
    target = {8: 500, 10: 500, 12: 500, 16: 5000, 24: 5000}
    for k in (8, 10, 12, 16):
        out[f"tt {k} cores, sizes 2"] = (tensor_train(k, 2, 2), (2**k,), target[k])
        out[f"tt {k} cores, d^1/{k}"] = (tensor_train(k), (4096, 65536), target[k])
    for levels in (8, 12, 16, 24):
        out[f"butterfly {levels} cores"] = (butterfly(levels), (2**levels,), target[levels])
    return out


def clear() -> None:
    compiler._compile.cache_clear()
    resolve.best_split.cache_clear()
    analysis.taxonomy.cache_clear()


def measure(spec, dims, repeats: int) -> tuple[float, float, float]:
    """(median cold ms, worst cold ms, median warm us)."""
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
    return statistics.median(cold) * 1e3, max(cold) * 1e3, statistics.median(warm) * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--only", default="", help="run only the specs whose name contains this text")
    args = p.parse_args(argv)
    print(
        f"{'spec':28s} {'cores':>5s} {'cold ms':>8s} {'worst ms':>8s} {'warm us':>8s} {'target ms':>9s} "
        f"{'worst/target':>12s}"
    )
    for name, (spec, dims, target) in specs().items():
        if args.only not in name:
            continue
        cold, worst, warm = measure(spec, dims, args.repeats)
        flag = "ok" if worst < target else "SLOW"
        print(
            f"{name:28s} {len(spec.cores):5d} {cold:8.2f} {worst:8.2f} {warm:8.1f} {target:9d} "
            f"{worst / target:12.3f}  {flag}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
