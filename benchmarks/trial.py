"""Trial speed side by side with another checkout: `python -m benchmarks.trial --baseline PATH`.

Runs the default search (``python -m search.run --budget 2e10 --seed 0 --out DIR``, ``OMP_NUM_THREADS=1``) with
this checkout and with the checkout at PATH (a ``git archive`` of an older commit, say) on ``PYTHONPATH``,
alternately, ``--repeats`` times each, and prints for each run and for the better run of each side:

- ``ms/step``: the level-0 COMPLETE trials' sum(seconds) / sum(steps) from trials.csv (a trial's ``seconds``
  covers what its code version counts: since issue 19, model construction to the last evaluation);
- ``wall s``: the whole command's wall time;

and the ratios new / baseline. ``--profile DIR`` also runs each side once under cProfile (to DIR/new.prof and
DIR/baseline.prof) and prints the time per training step of the parts of a trial (``--profile-top N`` more
lines of each profile by internal time). ``--trial`` times one level-0-sized trial instead (theta at width 32,
88 steps, checkpoints every 50 steps, repeated in one process per side, alternating): a quick check of one
change. The machine may be shared: only ratios of runs taken side by side mean anything.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRIAL = r"""
import os, sys, tempfile, time
import einstruct as es
from search import train
from search.tasks import get
task = get("regression")
task.prepare(0)
spec = es.theta(0.566, 0.075, 0.359, 0.159, 0.827, 0.014, 0.068)
_, per = train.plan(task, spec, 32, 1.0)
folder = tempfile.mkdtemp()
def trial(steps):
    t0, c0 = time.perf_counter(), time.process_time()
    train.run(task, spec, 32, per * steps, seed=0, device="cpu", checkpoint=os.path.join(folder, "c.pt"),
              checkpoint_every=50, on_bound=lambda f: None, require_step=0)
    return time.perf_counter() - t0, time.process_time() - c0
trial(10)
times = [trial(88) for _ in range(int(sys.argv[1]))]
print(1000 * min(t[0] for t in times) / 88, 1000 * min(t[1] for t in times) / 88)
"""

PARTS = {  # profile entries (file suffix, function) whose time per step is printed, in this order
    "trial (train._run)": ("search/train.py", "_run"),
    "model construction (task.build)": ("search/tasks/base.py", "build"),
    "parameter groups": ("search/tasks/base.py", "param_groups"),
    "forward + loss": ("search/tasks/regression.py", "loss"),
    "backward": ("torch/_tensor.py", "backward"),
    "optimizer step (torch)": ("torch/optim/optimizer.py", "wrapper"),
    "optimizer step (search.step)": ("search/step.py", "fused_step"),
    "clip (torch)": ("torch/nn/utils/clip_grad.py", "_no_grad_wrapper"),
    "clip (search.step)": ("search/step.py", "clip_"),
    "batch": ("search/tasks/regression.py", "batch"),
    "evaluation": ("search/tasks/regression.py", "eval_loss"),
    "checkpoint writes": ("search/train.py", "save_checkpoint"),
    "ledger bound writes": ("search/loop.py", "on_bound"),
}


def env_for(path: str) -> dict:
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
    env.pop("EINSTRUCT_FAULT", None)
    return env


def level0(folder: str) -> tuple[float, int, float]:
    """(sum of seconds, sum of steps, ms per step) of the level-0 COMPLETE trials in folder/trials.csv."""
    with open(os.path.join(folder, "trials.csv"), newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["level"] == "0" and r["state"] == "COMPLETE"]
    seconds = sum(float(r["seconds"]) for r in rows)
    steps = sum(int(r["steps"]) for r in rows)
    return seconds, steps, 1000 * seconds / max(steps, 1)


def search_once(path: str, budget: str, seed: int, profile: str | None = None) -> dict:
    out = tempfile.mkdtemp(prefix="trialbench")
    cmd = [sys.executable]
    if profile:
        cmd += ["-m", "cProfile", "-o", profile]
    cmd += ["-m", "search.run", "--budget", budget, "--seed", str(seed), "--out", out]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env_for(path), cwd=out, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"benchmarks.trial: the search with {path} failed:\n{done.stderr[-2000:]}")
    seconds, steps, ms = level0(out)
    return {"wall": wall, "ms": ms, "steps": steps, "seconds": seconds, "out": out}


def profile_parts(path: str, top: int) -> list[str]:
    import pstats

    stats = pstats.Stats(path)
    table = stats.stats  # (file, line, name) -> (cc, nc, tt, ct, callers)
    steps = 0
    for (file, _, name), (_, nc, *_rest) in table.items():
        if file.endswith("search/tasks/regression.py") and name == "loss":
            steps = max(steps, nc)
    lines = [f"{'part':36s} {'calls':>8s} {'ms/step':>8s}"]
    for label, (suffix, func) in PARTS.items():
        hits = [(v[1], v[3]) for (f, _, n), v in table.items() if f.endswith(suffix) and n == func]
        if hits:
            calls, cum = max(hits, key=lambda h: h[1])
            lines.append(f"{label:36s} {calls:8d} {1000 * cum / max(steps, 1):8.3f}")
    if top:
        ranked = sorted(table.items(), key=lambda kv: -kv[1][2])[:top]
        lines.append(f"top {top} by internal time (ms/step):")
        for (f, line, n), v in ranked:
            lines.append(f"  {1000 * v[2] / max(steps, 1):7.3f}  {os.path.basename(f)}:{line}({n})")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.trial", description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", required=True, help="another checkout (put on PYTHONPATH for its runs)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating (default 2)")
    p.add_argument("--budget", default="2e10")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", metavar="DIR", help="also profile one run of each side into DIR")
    p.add_argument("--profile-top", type=int, default=0, help="with --profile: this many top entries as well")
    p.add_argument("--trial", action="store_true", help="time one level-0-sized trial instead of the search")
    args = p.parse_args(argv)
    base = os.path.abspath(args.baseline)
    if not os.path.isdir(os.path.join(base, "search")):
        print(f"benchmarks.trial: {base} has no search/ package; give a checkout of this project", file=sys.stderr)
        return 2
    sides = {"baseline": base, "new": HERE}
    if args.trial:
        best = {}
        for _ in range(args.repeats):
            for name, path in sides.items():
                out = subprocess.run(
                    [sys.executable, "-c", TRIAL, "5"], env=env_for(path), capture_output=True, text=True, check=True
                )
                ms, cpu = map(float, out.stdout.split()[-2:])
                best[name] = min(best.get(name, ms), ms)
                best[name + " cpu"] = min(best.get(name + " cpu", cpu), cpu)
                print(f"{name:8s} {ms:7.3f} ms/step wall, {cpu:7.3f} CPU (construction included)", flush=True)
        print(
            f"best: baseline {best['baseline']:.3f}, new {best['new']:.3f} ms/step wall (ratio "
            f"{best['new'] / best['baseline']:.3f}); CPU time ratio {best['new cpu'] / best['baseline cpu']:.3f}"
        )
        return 0
    runs = {name: [] for name in sides}
    print(f"{'side':8s} {'ms/step':>8s} {'steps':>6s} {'wall s':>7s}")
    for _ in range(args.repeats):
        for name, path in sides.items():
            r = search_once(path, args.budget, args.seed)
            runs[name].append(r)
            print(f"{name:8s} {r['ms']:8.3f} {r['steps']:6d} {r['wall']:7.1f}", flush=True)
    ms = {n: min(r["ms"] for r in rs) for n, rs in runs.items()}
    wall = {n: min(r["wall"] for r in rs) for n, rs in runs.items()}
    print(
        f"best of {args.repeats}: level-0 ms/step baseline {ms['baseline']:.3f}, new {ms['new']:.3f} "
        f"(ratio {ms['new'] / ms['baseline']:.3f}); wall baseline {wall['baseline']:.1f} s, new {wall['new']:.1f} s "
        f"(ratio {wall['new'] / wall['baseline']:.3f})"
    )
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        for name, path in sides.items():
            prof = os.path.join(os.path.abspath(args.profile), f"{name}.prof")
            search_once(path, args.budget, args.seed, profile=prof)
            print(f"\n{name} profile ({prof}), per level-0..2 training step:")
            print("\n".join(profile_parts(prof, args.profile_top)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
