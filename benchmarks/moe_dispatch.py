"""The MoE dispatches side by side on this machine: `python -m benchmarks.moe_dispatch`.

For each case, one training step (forward, backward) of the layer on a batch, or a whole search training run
(``train.run`` on the regression task, the default search's trial sizes), with ``dispatch`` = ``sparse`` (tokens
grouped per expert; sizing the groups reads E counts back to the host, one device sync per layer on CUDA),
``tiled`` (the same grouping in fixed-size tiles: no host read, a few more rows computed) and ``dense`` (every
expert on every token), interleaved ``--repeats`` times, the best of each taken (the machine may be shared).
Prints ms per step, each path's ratio to sparse, and the forward FLOPs each path charges per step relative to
sparse (``layer.flops``: the tiles' padding for tiled, E / active for dense).

    python -m benchmarks.moe_dispatch --device cuda      # on a GPU, where tiled skips the per-layer sync
"""

from __future__ import annotations

import argparse
import time

import torch

import einstruct as es

PATHS = ("sparse", "tiled", "dense")

LAYERS = {  # name -> (make(dispatch), rows per step)
    "btt_moe 256 E=8 k=2, 256 rows": (lambda d: es.BTTMoE(256, 256, experts=8, active=2, dispatch=d), 256),
    "btt_moe 256 E=8 k=2, 4096 rows": (lambda d: es.BTTMoE(256, 256, experts=8, active=2, dispatch=d), 4096),
    "btt_moe 1024 E=16 k=2, 4096 rows": (lambda d: es.BTTMoE(1024, 1024, experts=16, active=2, dispatch=d), 4096),
    "moe 128 E=8 k=2 (hidden 512), 4096 rows": (
        lambda d: es.MoE(128, 128, experts=8, active=2, dispatch=d),
        4096,
    ),
}

TRAINS = {  # name -> (MoEConfig(dispatch), width): search trials on the regression task
    "regression btt_moe E=8 k=2 width 64": (lambda d: es.MoEConfig(experts=8, active=2, dispatch=d), 64),
    "regression btt_moe E=16 k=4 width 256": (lambda d: es.MoEConfig(experts=16, active=4, dispatch=d), 256),
}


def _layer_ms(make, rows: int, device, steps: int) -> tuple[float, int]:
    torch.manual_seed(0)
    layer = make().to(device)
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 0.5)  # a spread routing, not the zero router's ties
    x = torch.randn(rows, layer.in_features, device=device)
    layer(x).square().mean().backward()  # warm-up
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        (layer(x).square().mean() + layer.aux_loss()).backward()
    sync()
    return 1000 * (time.perf_counter() - t0) / steps, layer.flops(rows)


def _train_ms(make, width: int, device, steps: int) -> tuple[float, int]:
    from search import train
    from search.tasks import get

    task = get("regression")
    spec = make()
    _, per_step = train.plan(task, spec, width, 1.0)
    result = train.run(task, spec, width, per_step * steps, seed=0, device=device, evals=1)
    return 1000 * result.seconds / result.steps, per_step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.moe_dispatch", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=20, help="steps per timed layer run")
    p.add_argument("--train-steps", type=int, default=100, help="steps per timed training run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", choices=("layers", "train"), default=None, help="one table only")
    args = p.parse_args(argv)
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, best of {args.repeats}")
    print("| case | sparse ms | tiled ms | dense ms | tiled / sparse | dense / sparse | FLOPs tiled / sparse |")
    print("|---|---|---|---|---|---|---|")
    cases = []
    if args.only != "train":
        cases += [
            (name, lambda d, m=m, r=r: _layer_ms(lambda: m(d), r, args.device, args.steps))
            for name, (m, r) in LAYERS.items()
        ]
    if args.only != "layers":
        cases += [
            (name, lambda d, m=m, w=w: _train_ms(lambda: m(d), w, args.device, args.train_steps))
            for name, (m, w) in TRAINS.items()
        ]
    for name, measure in cases:
        best = {d: float("inf") for d in PATHS}
        flops = {}
        for _ in range(args.repeats):
            for d in PATHS:
                ms, flops[d] = measure(d)
                best[d] = min(best[d], ms)
        s = best["sparse"]
        print(
            f"| {name} | {s:.2f} | {best['tiled']:.2f} | {best['dense']:.2f} | {best['tiled'] / s:.2f} "
            f"| {best['dense'] / s:.2f} | {flops['tiled'] / flops['sparse']:.3f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
