"""The GPU check in one command: `python -m benchmarks.gpu` (under 4 minutes on one GPU).

On a CUDA machine it prints, as markdown tables:

1. The layer table in bf16: dense, BTT r=1 and r=4, Monarch 4 and 16 blocks, low rank 64 at d = 4096 and 8192,
   batch 8192: forward + backward time (CUDA events, median of 20) and TFLOP/s (3 x forward FLOPs: the
   structure's own count), and the ratio to dense.
2. Training throughput: ``search.train.run`` on the regression task (batch 4096) at widths 256 to 2048, dense and
   BTT r=1, about 200 steps each: ms per step and training FLOP/s (FLOPs as the search charges them; bf16
   autocast on CUDA), plus the run's ``seconds`` (construction to last evaluation).
3. A short search (``python -m search.run --budget 2e10``) on the GPU: two workers on the one GPU
   (``--workers 2 --devices cuda:0,cuda:0``) when this checkout's search.run has ``--devices``, otherwise one
   worker on cuda:0 and a line saying that the two-worker form needs ``--devices``. Skipped with one line when
   optuna (or its dependencies) cannot be imported.

On a machine without CUDA it prints one line saying so and exits 0. ``--device cpu --small`` runs the same
parts on the CPU at small sizes (d = 256, batch 256, widths 32 and 64, a 2e9 search): a check of the script
itself. ``--skip-search`` leaves part 3 out; ``--compile MODE`` trains part 2 with ``train.run(compile=MODE)``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import einstruct as es

STRUCTURES = {
    "dense": lambda: es.presets.dense(),
    "btt r=1": lambda: es.presets.btt(rank=1),
    "btt r=4": lambda: es.presets.btt(rank=4),
    "monarch 4": lambda: es.presets.monarch(blocks=4),
    "monarch 16": lambda: es.presets.monarch(blocks=16),
    "low rank 64": lambda: es.presets.low_rank(rank=64),
}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _time(fn, dev: torch.device, repeats: int = 20) -> float:
    """Median seconds of ``fn()`` (CUDA events on a GPU, the wall clock on a CPU), after 3 warm-up calls."""
    for _ in range(3):
        fn()
    _sync(dev)
    times = []
    for _ in range(repeats):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def layer_table(dims, batch: int, dev: torch.device, dtype: torch.dtype) -> list[str]:
    lines = [
        f"| structure | d | ms (fwd+bwd, batch {batch}) | TFLOP/s | x dense time |",
        "|---|---|---|---|---|",
    ]
    for d in dims:
        dense_ms = None
        for name, make in STRUCTURES.items():
            spec = make()
            if name == "dense":
                layer = torch.nn.Linear(d, d, device=dev, dtype=dtype)
                flops = 2 * d * d
            else:
                layer = es.StructuredLinear(d, d, spec, device=dev, dtype=dtype)
                flops = layer.structure.flops
            x = torch.randn(batch, d, device=dev, dtype=dtype, requires_grad=True)
            g = torch.randn(batch, d, device=dev, dtype=dtype)

            def step(layer=layer, x=x, g=g):
                layer(x).backward(g)

            sec = _time(step, dev)
            ms = 1000 * sec
            dense_ms = ms if name == "dense" else dense_ms
            ratio = f"{ms / dense_ms:.2f}" if dense_ms else ""
            lines.append(
                f"| {name} | {d} | {ms:.3f} | {es.rules.train_flops(flops) * batch / sec / 1e12:.3g} | {ratio} |"
            )
            del layer, x, g
    return lines


def training_table(widths, batch: int, dev: torch.device, steps: int, compile: str) -> list[str]:
    from search import train
    from search.tasks import get

    task = get("regression", batch=batch, widths=tuple(widths))
    lines = [
        "| structure | width | steps | ms/step | training TFLOP/s | seconds | compile s | loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    _, per_step = train.plan(task, None, widths[0], 1.0)
    train.run(task, None, widths[0], per_step * 5, seed=0, device=str(dev), evals=1)  # warm-up: first-use costs
    for label, spec in (("dense", None), ("btt r=1", es.presets.btt(rank=1))):
        for w in widths:
            _, per_step = train.plan(task, spec, w, 1.0)
            r = train.run(task, spec, w, per_step * steps, seed=0, device=str(dev), compile=compile)
            run_s = max(r.seconds - r.compile_seconds, 1e-9)
            lines.append(
                f"| {label} | {w} | {r.steps} | {1000 * run_s / r.steps:.2f} | {r.train_flops / run_s / 1e12:.3g} "
                f"| {r.seconds:.2f} | {r.compile_seconds:.1f} | {r.loss:.4f} |"
            )
    return lines


def search_part(dev: torch.device, budget: str) -> list[str]:
    try:
        import optuna  # noqa: F401
    except Exception as e:  # not installed on this machine (the GPU hosts this was written for have torch only)
        return [f"search: skipped (optuna cannot be imported here: {type(e).__name__}: {e})"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    helps = subprocess.run(
        [sys.executable, "-m", "search.run", "--help"], env=env, capture_output=True, text=True
    ).stdout
    device = str(dev) if dev.type != "cuda" else f"cuda:{dev.index or 0}"
    cmd = [sys.executable, "-m", "search.run", "--budget", budget, "--seed", "0", "--no-progress"]
    lines = []
    if "--devices" in helps and dev.type == "cuda":
        cmd += ["--workers", "2", "--devices", f"{device},{device}"]
        what = f"two workers on one GPU (--workers 2 --devices {device},{device})"
    else:
        cmd += ["--device", device]
        what = f"one worker on {device}"
        if dev.type == "cuda":
            lines.append("search: the two-worker form (--devices cuda:0,cuda:0) needs search.run --devices (not here)")
    out = tempfile.mkdtemp(prefix="gpucheck")
    t0 = time.perf_counter()
    done = subprocess.run(cmd + ["--out", out], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        return lines + [f"search: {what} failed (exit {done.returncode}): {why}"]
    import csv

    with open(os.path.join(out, "trials.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    spent = sum(int(r["train_flops"] or 0) for r in rows)
    best = min((float(r["loss"]) for r in complete if r["level"] == max(x["level"] for x in complete)), default=None)
    lines.append(
        f"search: {what}, budget {budget}: {wall:.1f} s wall, {len(complete)} trials trained, "
        f"{spent:.3g} FLOPs charged, best top-level loss {best if best is None else round(best, 4)}"
    )
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu with --small (a check)")
    p.add_argument("--small", action="store_true", help="small sizes (for a CPU check of this script)")
    p.add_argument("--skip-search", action="store_true", help="leave out the short search")
    p.add_argument("--compile", default="off", help="train.run's compile mode for the throughput part")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print(f"benchmarks.gpu: no CUDA GPU here (torch {torch.__version__}); nothing measured")
        return 0
    t0 = time.perf_counter()
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"# GPU check: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}\n")
    else:
        print(f"# GPU check on {dev} (a check of the script, not a GPU figure), torch {torch.__version__}\n")
    dims, batch = ((256,), 256) if args.small else ((4096, 8192), 8192)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    print(f"## Layers ({str(dtype).removeprefix('torch.')})\n")
    print("\n".join(layer_table(dims, batch, dev, dtype)))
    widths, tbatch, steps = ((32, 64), 256, 40) if args.small else ((256, 512, 1024, 2048), 4096, 200)
    print(f"\n## Training throughput (regression, batch {tbatch}, compile {args.compile})\n")
    print("\n".join(training_table(widths, tbatch, dev, steps, args.compile)))
    if not args.skip_search:
        print("\n## Search\n")
        print("\n".join(search_part(dev, "2e9" if args.small else "2e10")))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
