"""One BTT-MoE layer: its three dispatch paths, their FLOPs (checked with FlopCounterMode), time, and equivalences.

    python examples/moe_layer.py                 # a few seconds on a CPU
    python examples/moe_layer.py --width 1024 --experts 16 --tokens 8192

Prints the layer's table (FLOPs per token of the dense all-experts path, of the sparse dispatch and of the
tiled one: sparse in fixed-size tiles, no host read), the FLOPs each path really runs for a batch next to what
FlopCounterMode counts, the time of a forward and backward pass on each, that the paths give the same output,
and that with every gate equal the layer is exactly a rank-E BTT whose slices are scaled by 1/E.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import einstruct as es


def counted(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def seconds(fn, reps: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--active", type=int, default=2)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    d, E, k, n = args.width, args.experts, args.active, args.tokens

    dense = es.BTTMoE(d, d, experts=E, active=k, dispatch="dense")
    with torch.no_grad():  # a trained-looking router, so tokens spread over the experts
        dense.router.weight.normal_(0.0, 1.0 / d**0.5)
    sparse = es.BTTMoE(d, d, experts=E, active=k, dispatch="sparse")
    sparse.load_state_dict(dense.state_dict())
    tiled = es.BTTMoE(d, d, experts=E, active=k, dispatch="tiled")
    tiled.load_state_dict(dense.state_dict())
    print(tiled.table(), "\n")

    x = torch.randn(n, d, requires_grad=True)
    print(f"{n} tokens, width {d}: forward FLOPs reported by flops(batch) and counted by FlopCounterMode")
    rows = []
    for name, layer in (("dense", dense), ("sparse", sparse), ("tiled", tiled)):
        fwd = counted(lambda layer=layer: layer(x))
        step = lambda layer=layer: layer(x).square().mean().backward()
        t = seconds(step, args.reps)
        rows.append((name, layer.flops(n), fwd, layer.train_flops(n), counted(step), t))
    for name, rep, cnt, train, train_cnt, t in rows:
        print(
            f"  {name:6s} forward {rep:.4g} (counted {cnt:.4g})  forward+backward {train:.4g} "
            f"(counted {train_cnt:.4g})  {t * 1e3:.1f} ms per forward+backward"
        )
    for i in (1, 2):
        print(f"  {rows[i][0]} / dense FLOPs: {rows[i][1] / rows[0][1]:.3f}; time: {rows[i][5] / rows[0][5]:.2f}")

    with torch.no_grad():
        ref = dense(x)
        diffs = [(ref - layer(x)).abs().max().item() for layer in (sparse, tiled)]
    print(f"\nmax |dense path - sparse path| over the batch: {diffs[0]:.2e}; tiled: {diffs[1]:.2e}")

    # All gates equal: active = E and the zero-initialised router give every expert 1/E.
    moe = es.BTTMoE(d, d, experts=E, active=E, bias=False)
    btt = es.StructuredLinear(d, d, es.presets.btt(rank=E), bias=False)
    with torch.no_grad():
        btt.R.copy_(moe.R)
        btt.L.copy_(moe.L / E)
        diff = (moe(x) - btt(x)).abs().max().item()
    print(f"all gates 1/E: max |BTT-MoE - rank-{E} BTT with slices scaled by 1/E| = {diff:.2e}")


if __name__ == "__main__":
    main()
