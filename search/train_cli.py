"""The command line of one budgeted training run: ``python -m search.train`` (search.train.main calls this).

python -m search.train --task regression --spec btt --width 64 --train-flops 1e9 [--compile default]
torchrun --nproc-per-node 2 -m search.train --task regression --spec btt --width 64 --train-flops 1e9
"""

from __future__ import annotations

import os

from . import train  # train.run looked up at call time (tests replace it)
from .errors import SearchError
from .settings import MAX_SEED, default
from .step import COMPILE_MODES


def main(argv=None) -> int:
    """``python -m search.train`` (or under torchrun): one budgeted training run; rank 0 prints a JSON line."""
    import argparse
    import json
    import sys

    import einstruct as es

    from .tasks import NAMES
    from .tasks import get as get_task

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            self.exit(2, f"search.train: error: {message} (see --help)\n")

    p = Parser(prog="python -m search.train", description=main.__doc__)
    p.add_argument("--task", choices=NAMES, default=default("task"))
    p.add_argument("--data", help="data path for lm and cifar")
    p.add_argument("--task-settings", default="{}", help="task overrides as JSON, e.g. '{\"batch\": 64}'")
    p.add_argument("--spec", default="dense", help="a preset name: dense, low_rank, kron, tt, btt, monarch, block_diag")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--train-flops", type=float, default=1e9)
    p.add_argument("--seed", type=int, default=default("seed"), help=f"0 to {MAX_SEED} (default {default('seed')})")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--checkpoint", help="checkpoint file: continue from it if it matches, save to it")
    p.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints")
    p.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        default=default("compile"),
        help=f"torch.compile the step (default {default('compile')})",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)

    def fail(message: str, code: int = 2) -> int:
        label = {2: "error: ", 1: "internal error: "}.get(code, "")
        print(f"search.train: {label}{message}", file=sys.stderr)
        return code

    try:
        if not 0 <= args.seed <= MAX_SEED:
            raise SearchError(f"--seed must be an integer from 0 to {MAX_SEED}, got {args.seed}")
        if args.checkpoint_every < 0:
            raise SearchError(
                f"--checkpoint-every must be a number of steps >= 1 (0: never), got {args.checkpoint_every}"
            )
        train.check_device(args.device)
        try:
            kwargs = json.loads(args.task_settings)
        except ValueError as e:
            raise SearchError(
                f"--task-settings is not JSON ({e}); give an object such as '{{\"batch\": 64}}'"
            ) from None
        if not isinstance(kwargs, dict):
            raise SearchError(
                f"--task-settings must be a JSON object such as '{{\"batch\": 64}}', got {args.task_settings!r}"
            )
        if args.data:
            kwargs["data"] = args.data
        task = get_task(args.task, **kwargs)
        spec = None if args.spec == "dense" else es.presets.get(args.spec)
        r = train.run(
            task,
            spec,
            args.width,
            args.train_flops,
            args.seed,
            device=args.device,
            checkpoint=args.checkpoint,
            checkpoint_every=args.checkpoint_every,
            compile=args.compile,
        )
    except KeyboardInterrupt:
        return fail(
            "interrupted"
            + (
                f"; the run continues from {args.checkpoint} when started again"
                if args.checkpoint and args.checkpoint_every
                else ""
            ),
            130,
        )
    except Exception as e:  # bad input, a machine's failure or a bug: one line each
        if args.debug:
            raise
        if isinstance(e, (SearchError, es.EinstructError)):
            return fail(str(e))
        from .errors import disk_full, out_of_memory

        full, oom = disk_full(e), out_of_memory(e)
        if full:
            where = os.path.dirname(os.path.abspath(args.checkpoint)) if args.checkpoint else "the working folder"
            return fail(
                f"the disk holding {where} is full ({full}); free some space there, then run the same command again"
            )
        if oom:
            return fail(f"out of memory ({oom[:200]}); use a smaller --width, or a smaller batch in --task-settings")
        if isinstance(e, OSError):
            return fail(f"{e}; check the paths given to --data and --checkpoint")
        why = (str(e).strip().splitlines() or [""])[0]
        return fail(f"{type(e).__name__}: {why} (rerun with --debug for the traceback, and please report it)", 1)
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            json.dumps(
                {
                    "loss": r.loss,
                    "train_flops": r.train_flops,
                    "steps": r.steps,
                    "ranks": r.ranks,
                    "flops_per_step": r.flops_per_step,
                    "resumed_step": r.resumed_step,
                    "curve": [list(c) for c in r.curve],
                    "seconds": round(r.seconds, 3),
                    "compile_seconds": round(r.compile_seconds, 3),
                }
            )
        )
    return 0
