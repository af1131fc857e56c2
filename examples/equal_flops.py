"""Dense against BTT at equal training FLOPs, on the regression task and on a text file.

    python examples/equal_flops.py                      # regression + a generated text (no download)
    python examples/equal_flops.py --text my_corpus.txt --flops 1e12
    python examples/equal_flops.py --tasks lm --flops 1e12         # the issue's check: BTT under unigram entropy

Prints, per task and structure: the held-out loss, the training FLOPs actually spent (and the papers'
forward-MACs x examples axis, 6x smaller), the steps and the wall time.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

import einstruct as es
from search import tasks, train


def generated_text(path: str, lines: int = 6000) -> str:
    rng = random.Random(0)
    subj = ["the cat", "a dog", "my friend", "the old man", "a bird", "the teacher"]
    verb = ["sat on", "ran to", "looked at", "jumped over", "walked past", "painted"]
    obj = ["the mat", "a tree", "the house", "the river", "a red car", "the garden"]
    with open(path, "w") as f:
        for _ in range(lines):
            f.write(f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)}.\n")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", help="a local text file (default: a generated one)")
    p.add_argument("--flops", type=float, default=3e11, help="training FLOPs per run (default 3e11)")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", default="regression,lm", help="comma-separated: regression, lm (default both)")
    args = p.parse_args()
    chosen = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not chosen or set(chosen) - {"regression", "lm"}:
        p.error(f"--tasks takes regression and/or lm, got {args.tasks!r}")
    folder = tempfile.mkdtemp(prefix="einstruct-text-")
    text = args.text or generated_text(os.path.join(folder, "generated.txt"))
    runs = [(n, tasks.get("regression") if n == "regression" else tasks.get("lm", data=text)) for n in chosen]
    specs = {"dense": None, "btt r=1": es.presets.btt(rank=1)}
    print(
        f"{'task':10s} {'structure':9s} {'loss':>8s} {'train FLOPs':>12s} {'fwd MACs x ex':>13s} "
        f"{'steps':>6s} {'seconds':>8s}"
    )
    for name, task in runs:
        for label, spec in specs.items():
            t0 = time.perf_counter()
            r = train.run(task, spec, width=args.width, train_flops=args.flops, seed=args.seed)
            status = f"  diverged: {r.reason}" if r.diverged else ""
            print(
                f"{name:10s} {label:9s} {r.loss:8.4f} {r.train_flops:12.3e} {r.train_flops / 6:13.3e} "
                f"{r.steps:6d} {time.perf_counter() - t0:8.1f}{status}"
            )
        if name == "lm":
            print(f"{'':10s} unigram entropy of the training text: {task.unigram_entropy():.4f} nats")


if __name__ == "__main__":
    main()
