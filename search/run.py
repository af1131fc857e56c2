"""`python -m search.run`: a budgeted structure search (the project's main job).

python -m search.run                                   # embedded default: regression, minutes on a CPU
python -m search.run --budget 1e17 --task lm --data corpus.txt --device cuda --study owt-small
python -m search.run --study owt-small                 # the same command again resumes the study
python -m search.run --budget 1e17 --dry-run           # the plan and its estimated wall time only
python -m search.run --study s --workers 4             # four worker processes on this machine
python -m search.run --study s --storage postgresql://user:pass@db-host/einstruct   # on every machine
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys

from einstruct.cli import closed_pipe, run_command

from .budget import round_up
from .errors import SearchError


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"search.run: error: {message} (see --help)\n")


def parser() -> argparse.ArgumentParser:
    from .loop import DEFAULTS, SAMPLERS
    from .space import SPACES
    from .tasks import NAMES

    p = _Parser(prog="python -m search.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default="default", help="study name; runs/<study>/ holds everything (default: default)")
    p.add_argument("--task", choices=NAMES, help=f"task (default {DEFAULTS['task']})")
    p.add_argument("--data", help="data path for lm (text or .bin) and cifar (folder)")
    p.add_argument(
        "--budget", type=float, help=f"total training FLOPs over all trials (default {DEFAULTS['budget']:g})"
    )
    p.add_argument("--levels", type=int, help="compute levels, >= 3 (default 3)")
    p.add_argument("--ratio", type=float, help="compute factor between levels, >= 2 (default 3)")
    p.add_argument("--top-trials", type=int, help="trials at the top level (default 7; each level below x ratio)")
    p.add_argument("--sampler", choices=SAMPLERS, help="Optuna sampler (default tpe, multivariate)")
    p.add_argument("--seed", type=int, help="seed for sampling and training (default 0)")
    p.add_argument(
        "--space",
        choices=tuple(SPACES),
        help="search space: full, theta, btt (beta = delta = 0), moe (dense, BTT, BTT-MoE, MoE; opt-in)",
    )
    p.add_argument("--min-steps", type=int, help="reject candidates with fewer steps (default 20)")
    p.add_argument("--target-steps", type=int, help="steps the references' widths aim for (default 300)")
    p.add_argument("--device", help="auto, cpu or cuda (default auto)")
    p.add_argument(
        "--compile",
        choices=("off", "default", "reduce-overhead"),
        help="torch.compile each trial's training step: off (default; measured slower on CPU), default, "
        "reduce-overhead (CUDA graphs, CUDA only)",
    )
    p.add_argument(
        "--storage",
        help="Optuna storage URL (default: SQLite file in runs/<study>/); workers on "
        "several machines share one postgresql://user:pass@host/db",
    )
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default 1)")
    p.add_argument(
        "--heartbeat",
        type=int,
        help="seconds between a worker's heartbeats; a worker that misses 3 "
        "is taken for dead and its trial retried from its checkpoint; "
        "0: off (embedded storage only) (default 10)",
    )
    p.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)  # set for the processes --workers starts
    p.add_argument("--out", help="output folder (default runs/<study>)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and estimated wall time, train nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


class TqdmReporter:
    """Two progress bars: the budget spent, and the current trial's steps, with the best loss so far."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.total = self.trial = None

    def plan(self, info):
        from .budget import Level  # noqa: F401

        cfg, est = info["settings"], info["estimate"]
        print(f"study {info['study']} -> {info['folder']}")
        print(
            f"task {cfg['task']}, budget {cfg['budget']:.3g} training FLOPs, sampler {cfg['sampler']}, "
            f"seed {cfg['seed']}, space {cfg['space']}"
        )
        print(f"{'level':>5s} {'FLOPs per trial':>16s} {'trials':>7s} {'level FLOPs':>12s}")
        for lv in info["levels"]:
            print(f"{lv.index:5d} {lv.allowance:16.3e} {lv.trials:7d} {lv.planned_flops:12.3e}")
        print(f"references at every level: {', '.join(info['references'])}")
        for line in feasibility_warnings(info.get("feasibility")):
            print(line, file=sys.stderr)
        secs = est["seconds"]
        print(
            f"throughput probe: {est['flops_per_second']:.3g} FLOP/s, {est['seconds_per_trial']:.2f} s overhead "
            f"per trial -> estimated wall time {_human(secs)}"
        )
        if info["dry_run"]:
            print("dry run: nothing trained")
            return
        from tqdm import tqdm

        self.total = tqdm(
            total=float(cfg["budget"]),
            desc="budget",
            unit="FLOP",
            unit_scale=True,
            disable=not self.enabled,
            position=0,
            dynamic_ncols=True,
        )

    def level_start(self, level, done):
        if self.total is not None:
            self.total.set_description(f"budget (level {level.index})")

    def trial_start(self, level, label, steps):
        from tqdm import tqdm

        self.trial = tqdm(
            total=steps,
            desc=f"  L{level.index} {label}"[:40],
            unit="step",
            leave=False,
            disable=not self.enabled,
            position=1,
            dynamic_ncols=True,
        )

    def trial_step(self, info):
        if self.trial is not None:
            self.trial.n = info["step"]
            self.trial.set_postfix(loss=f"{info['loss']:.4g}", refresh=True)

    def trial_end(self, row, spent, best):
        if self.trial is not None:
            self.trial.close()
            self.trial = None
        if self.total is not None:
            self.total.n = min(spent, self.total.total)
            if best is not None:
                self.total.set_postfix(best=f"{best:.4g}")
            self.total.refresh()

    def close(self):
        if self.total is not None:
            self.total.close()


def _levels(shorts) -> str:
    names = [str(s.level) for s in shorts]
    return f"level {names[0]}" if len(names) == 1 else f"levels {', '.join(names[:-1])} and {names[-1]}"


def feasibility_warnings(f) -> list[str]:
    """One line per problem of a plan (a budget.Feasibility): levels that can train no candidate, and feasible
    levels where no reference structure gets --min-steps steps; each names the budget that would fix it."""
    out = []
    if f is None:
        return out
    low, n = f.cheapest, f.min_steps
    if f.infeasible:
        allow = ", ".join(f"{s.allowance:.3g}" for s in f.infeasible)
        fix = round_up(f.infeasible[0].budget)  # the lowest level needs the largest budget
        out.append(
            f"warning: {_levels(f.infeasible)} ({allow} FLOPs per trial) cannot train any candidate: the "
            f"cheapest, {low.label} at width {low.width}, needs {n} steps x {low.flops_per_step:.3g} = "
            f"{low.need(n):.3g} training FLOPs, so every trial there is rejected; --budget {fix:.3g} or more "
            f"makes {'it' if len(f.infeasible) == 1 else 'them'} feasible"
        )
    if f.no_references:
        ref, fix = f.cheapest_reference, round_up(f.no_references[0].budget)
        allow = ", ".join(f"{s.allowance:.3g}" for s in f.no_references)
        under = ", ".join(f"{s.allowance / n:.3g}" for s in f.no_references)
        out.append(
            f"warning: at {_levels(f.no_references)} ({allow} FLOPs per trial) no reference structure gets "
            f"{n} steps (the cheapest, {ref.label} at width {ref.width}, needs {ref.need(n):.3g}) and only "
            f"candidates under {under} training FLOPs per step can train: expect many rejected trials; "
            f"--budget {fix:.3g} or more lets the references train there"
        )
    return out


MAX_TRIALS = 100_000  # planned trials over all levels: more is a typo, or a study that cannot finish
MAX_SEED = 2**32 - 1  # seeds are 0 .. 2^32 - 1 (numpy's range); torch and Optuna take them all


def _plan_trials(top: int, levels: int, ratio: float, stop: int) -> int | None:
    """Trials the plan runs (the top level runs ``top``, each level below ``ratio`` times as many), or None when
    they are more than ``stop`` (counted without overflow: counting ends as soon as the sum passes it)."""
    total, n = 0, float(top)
    for _ in range(levels):
        if n > stop:
            return None
        total += math.floor(n + 1e-9)
        if total > stop:
            return None
        n *= ratio
    return total


def _number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def check_settings(cfg: dict) -> None:
    """Refuse settings that cannot make sense, with one line naming the option, before anything is built.

    ``cfg``: the study's settings (defaults < stored < given, as loop.settings_for merges them). Covers what
    the plan's own checks cannot reach: numbers so large or small that arithmetic on them overflows or
    underflows, plans of more than MAX_TRIALS trials, seeds outside 0 .. 2^32 - 1, step counts below 1, and
    devices that cannot train (the meta device, a GPU index that is not there).
    """
    from .budget import plan_levels

    budget, levels, ratio, top = cfg["budget"], cfg["levels"], cfg["ratio"], cfg["top_trials"]
    if _number(budget) and 0 < budget < 1:
        raise SearchError(
            f"--budget {budget!r} is less than one FLOP; it is the total training FLOPs of all "
            "trials, e.g. --budget 1e13"
        )
    if _number(ratio) and ratio >= 2 and isinstance(levels, int) and levels >= 3 and isinstance(top, int) and top >= 1:
        n = _plan_trials(top, levels, ratio, MAX_TRIALS)  # at least: search.loop raises top to the references + 1
        if n is None:
            raise SearchError(
                f"--top-trials {top} with --levels {levels} and --ratio {ratio:g} plans more than the {MAX_TRIALS:,} "
                f"trials a study may run (the top level runs {top}, each level below {ratio:g} times as many as the "
                "one above); lower --top-trials, --levels or --ratio"
            )
    plan_levels(budget, levels, ratio, top)  # each value's type and range; nothing overflows any more
    seed = cfg["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise SearchError(f"--seed must be an integer from 0 to {MAX_SEED}, got {seed!r}")
    for key in ("min_steps", "target_steps"):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            what = (
                "candidates with fewer steps are rejected"
                if key == "min_steps"
                else "the references' widths aim for this many steps"
            )
            raise SearchError(
                f"--{key.replace('_', '-')} must be a whole number of steps, 1 or more ({what}), got {v!r}"
            )
    from .train import check_device

    dev = check_device(cfg["device"])
    if cfg.get("compile") == "reduce-overhead" and dev.type != "cuda":
        raise SearchError("--compile reduce-overhead uses CUDA graphs and needs --device cuda; use --compile default")


def _internal_error(prog: str, e: BaseException, url: str | None) -> int:
    from .storage import redact

    why = redact((str(e).strip().splitlines() or [""])[0], url)
    print(
        f"{prog}: internal error: {type(e).__name__}: {why} (rerun with --debug for the traceback, and please "
        "report it)",
        file=sys.stderr,
    )
    return 1


def _check(args, given: dict) -> None:
    """check_settings on the study's settings as the search will see them (stored ones for what is not given)."""
    from .loop import DEFAULTS, settings_for
    from .storage import study_dir

    check_settings({**DEFAULTS, **{k: v for k, v in given.items() if v is not None}})  # a bad value before a clash
    check_settings(settings_for(args.study, study_dir(args.study, args.out), given))


def _failed(e: BaseException, args) -> int:
    """Exit code and one line on stderr for an exception: 2 for bad input and for a machine's failures (a full
    disk, a damaged database, memory run out), 1 for a bug; with --debug, the traceback instead."""
    from .errors import machine_problem
    from .storage import redact, study_dir

    if args.debug:
        raise e
    if isinstance(e, SearchError):
        print(f"search.run: error: {redact(str(e), args.storage)}", file=sys.stderr)
        return 2
    try:
        folder = study_dir(args.study, args.out)
    except SearchError:
        folder = args.out or "runs"
    why = machine_problem(e, folder, args.storage)
    if why:
        print(f"search.run: error: {redact(why, args.storage)}", file=sys.stderr)
        return 2
    if isinstance(e, OSError):  # a folder or file the study needs: a setup problem, not a bug
        print(
            f"search.run: error: {redact(e, args.storage)}; check the paths given to --out and --data", file=sys.stderr
        )
        return 2
    return _internal_error("search.run", e, args.storage)


def _human(s: float) -> str:
    for unit, n in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if s >= 2 * n:
            return f"{s / n:.1f} {unit}"
    return f"{s:.0f} seconds"


def _start_workers(args, given: dict, base: int) -> list:
    """Start ``--workers`` - 1 more processes on the same study (this one is the first); logs in the study folder."""
    import subprocess

    from .storage import create_storage_tables, study_dir

    if args.workers == 1:
        return []
    folder = study_dir(args.study, args.out)
    os.makedirs(folder, exist_ok=True)
    create_storage_tables(args.storage, folder)  # once, before several processes race to create them
    cmd = [sys.executable, "-m", "search.run", "--study", args.study, "--out", folder]
    env = dict(os.environ)
    if args.storage:  # through the environment: a password on a command line is visible to every user (ps)
        env["EINSTRUCT_STORAGE"] = args.storage
    for k, v in given.items():
        if v is not None:
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    children = []
    for i in range(1, args.workers):
        log = open(os.path.join(folder, f"worker-{i}.log"), "w")  # the child writes to it
        children.append(
            (
                i,
                subprocess.Popen(
                    [*cmd, "--worker-index", str(base + i)], stdout=log, stderr=subprocess.STDOUT, env=env
                ),
            )
        )
        log.close()
    return children


def _stop(children) -> None:
    for _, p in children:
        p.terminate()
    for _, p in children:
        p.wait()


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    given = {
        k: getattr(args, k)
        for k in (
            "task",
            "data",
            "budget",
            "levels",
            "ratio",
            "top_trials",
            "sampler",
            "seed",
            "space",
            "min_steps",
            "target_steps",
            "device",
            "heartbeat",
            "compile",
        )
    }
    if args.workers < 1:
        print(f"search.run: error: --workers must be 1 or more, got {args.workers}", file=sys.stderr)
        return 2
    if args.heartbeat is not None and args.heartbeat < 0:
        print(
            f"search.run: error: --heartbeat must be a number of seconds >= 1 (0: off), got {args.heartbeat}",
            file=sys.stderr,
        )
        return 2
    if args.storage is None:  # the URL may come from the environment, keeping its password off command lines
        args.storage = os.environ.get("EINSTRUCT_STORAGE") or None
    if args.worker_index is not None:  # one of the processes --workers started: no bars, no report
        from .loop import Reporter, run_search

        try:
            _check(args, given)
            r = run_search(
                args.study,
                storage=args.storage,
                out=args.out,
                worker=args.worker_index,
                estimate=False,
                reporter=Reporter(),
                **given,
            )
        except Exception as e:
            return _failed(e, args)
        except KeyboardInterrupt:
            print(f"\nworker {args.worker_index} interrupted: finished trials are stored", file=sys.stderr)
            return 130
        print(f"worker {args.worker_index}: study spent {r.spent:.4g} training FLOPs")
        return 0
    # Workers sharing a storage that may have other machines on it sample with seeds of their own.
    base = 0 if args.storage is None else int.from_bytes(os.urandom(2), "little")
    rep = TqdmReporter(enabled=not args.no_progress)
    children = []
    try:
        _check(args, given)  # before workers start: each would refuse the same settings
        children = [] if args.dry_run else _start_workers(args, given, base)
        from .loop import run_search

        result = run_search(
            args.study, storage=args.storage, out=args.out, dry_run=args.dry_run, reporter=rep, worker=base, **given
        )
    except BrokenPipeError:  # the reader of stdout went away (`... | head`): not a bug, end quietly
        _stop(children)
        return closed_pipe()
    except Exception as e:
        _stop(children)
        return _failed(e, args)
    except KeyboardInterrupt:
        _stop(children)
        print("\ninterrupted: finished trials are stored; run the same command to resume", file=sys.stderr)
        return 130
    finally:
        rep.close()
    if args.dry_run:
        return 0
    try:
        return _finish(result, children)
    except KeyboardInterrupt:  # the study is stored: only the summary or the report was cut short
        _stop(children)
        print(
            f"\ninterrupted: the study is stored; write its report with python -m search.report --study "
            f"{result.name} --out {result.folder}",
            file=sys.stderr,
        )
        return 130


def _finish(result, children) -> int:
    """After the search: wait for the workers, print the summary, write the report; the exit code."""
    if children:
        failed = [i for i, p in children if p.wait() != 0]
        if failed:
            print(
                f"warning: worker(s) {', '.join(map(str, failed))} stopped with an error; see worker-<i>.log in "
                f"{result.folder}",
                file=sys.stderr,
            )
        from . import outputs

        outputs.write_trials_csv(os.path.join(result.folder, "trials.csv"), result.rows())  # every worker's trials
    code = 0
    try:
        _summary(result)
    except BrokenPipeError:  # the reader went away: the report is still written, below
        code = closed_pipe()
    try:  # the study is stored already: a failing report must not lose it
        from .report import write_report

        path = write_report(result.folder, result.name)
    except Exception as e:
        why = (str(e).splitlines() or [""])[0]
        print(
            f"warning: no report ({type(e).__name__}: {why}); retry with python -m search.report --study "
            f"{result.name} --out {result.folder}",
            file=sys.stderr,
        )
        return code
    try:
        print(f"\nreport: {path}")
    except BrokenPipeError:
        code = closed_pipe()
    return code


def _summary(result) -> None:
    """What a finished search prints: the budget spent, each level's best trial, the winner's einstruct table."""
    import einstruct as es

    from .space import Candidate

    print(
        f"\nspent {result.spent:.4g} of {result.settings['budget']:.4g} training FLOPs; "
        f"trials in {result.folder}/trials.csv"
    )
    for lv in result.levels:
        b = result.best(lv.index)
        if b:
            print(
                f"level {lv.index} ({lv.allowance:.3g} FLOPs): best {b['structure']} width {b['width']} "
                f"loss {float(b['loss']):.4g}"
            )
    b = result.best()
    if b:
        cand = Candidate.from_row(b)
        spec = cand.structure_spec()
        print(f"\nbest structure at the top level, as a {b['width']}x{b['width']} layer:\n")
        print(es.compile(spec, int(b["width"])).table())


if __name__ == "__main__":
    run_command(main)
