"""`python -m search.run`: a budgeted structure search (the project's main job).

python -m search.run                                   # embedded default: regression, minutes on a CPU
python -m search.run --budget 1e17 --task lm --data corpus.txt --device cuda --study owt-small
python -m search.run --study owt-small                 # the same command again resumes the study
python -m search.run --budget 1e17 --dry-run           # the plan and its estimated wall time only
python -m search.run --study s --workers 4             # four worker processes on this machine
python -m search.run --study s --device cuda           # one worker per visible GPU
python -m search.run --study s --devices cuda:0,cuda:1,cuda:1   # worker i on the i-th device (one may repeat)
python -m search.run --study s --storage postgresql://user:pass@db-host/einstruct   # on every machine
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import fields

from einstruct.cli import closed_pipe, run_command

from . import settings
from .budget import round_up
from .errors import SearchError


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"search.run: error: {message} (see --help)\n")


def parser() -> argparse.ArgumentParser:
    """The command line: one option per search.settings.Settings field (its help and default from there), then
    the options of this process."""
    p = _Parser(prog="python -m search.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default="default", help="study name; runs/<study>/ holds everything (default: default)")
    for f in fields(settings.Settings):
        p.add_argument(settings.flag(f.name), dest=f.name, help=settings.help_text(f.name), **_kind(f))
    p.add_argument(
        "--storage",
        help="Optuna storage URL (default: SQLite file in runs/<study>/); workers on "
        "several machines share one postgresql://user:pass@host/db",
    )
    p.add_argument(
        "--workers",
        type=int,
        help="worker processes on this machine (default: one per --devices entry, one per visible GPU with "
        "--device cuda, else 1)",
    )
    p.add_argument(
        "--devices",
        help="the device of each worker, e.g. cuda:0,cuda:1 (one may repeat: cuda:0,cuda:0); each started worker "
        "sees only its GPU (CUDA_VISIBLE_DEVICES) and trains on cuda:0 there",
    )
    p.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)  # set for the processes --workers starts
    p.add_argument("--out", help="output folder (default runs/<study>)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and estimated wall time, train nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _kind(f) -> dict:
    """argparse's type (and choices) for a Settings field, from its annotation; the default is None, so that an
    option left out takes the stored study's value."""
    kind = {"float": float, "int": int, "dict": _json_object}.get(str(f.type), str)
    if f.metadata["choices"] is None:
        return {"type": kind}
    if f.metadata["open_choices"]:
        return {"type": _open_choice(f.name)}
    return {"type": kind, "choices": settings.choices(f.name)}


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}); give an object such as '{{\"batch\": 64}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object such as '{{\"batch\": 64}}', got {text!r}")
    return value


def _open_choice(name: str):
    """A value that is one of the option's choices, or names a file (``.toml``) or a Python object
    (``module:NAME``)."""

    def check(text: str) -> str:
        from .families.loader import is_user_space

        known = settings.choices(name)
        if text in known or is_user_space(text):
            return text
        shown = ", ".join(map(repr, known))
        raise argparse.ArgumentTypeError(
            f"invalid choice: {text!r} (choose from {shown}, or give a .toml file or package.module:NAME)"
        )

    return check


class TqdmReporter:
    """Two progress bars: the budget spent, and the current trial's steps, with the best loss so far."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.total = self.trial = None
        self.show_devices = False  # print which worker trains on which device (several workers, or --devices)

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
        share = info["settings"].get("confirm_share", 0)
        if share:
            print(
                f"then confirmation: {share:.0%} of the budget, {info['settings']['confirm_seeds']} fresh seeds at "
                "the same allowances (search.confirm)"
            )
        for line in feasibility_warnings(info.get("feasibility")):
            print(line, file=sys.stderr)
        secs = est["seconds"]
        print(
            f"throughput probe: {est['flops_per_second']:.3g} FLOP/s, {est['seconds_per_trial']:.2f} s overhead "
            f"per trial -> estimated wall time {_human(secs)}"
        )
        if self.show_devices:
            from .devices import describe

            for w in est["workers"]:
                print(
                    f"worker {w['worker']}: {w['device']} ({describe(w['worker'], w['device'])}), "
                    f"{w['flops_per_second']:.3g} FLOP/s, {w['seconds_per_trial']:.2f} s per trial"
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


def _internal_error(prog: str, e: BaseException, url: str | None) -> int:
    from .storage import redact

    why = redact((str(e).strip().splitlines() or [""])[0], url)
    print(
        f"{prog}: internal error: {type(e).__name__}: {why} (rerun with --debug for the traceback, and please "
        "report it)",
        file=sys.stderr,
    )
    return 1


def _check(args, given: dict) -> dict:
    """check_settings on the study's settings as the search will see them (stored ones for what is not given);
    returns them."""
    from .storage import study_dir

    settings.Settings.from_dict({k: v for k, v in given.items() if v is not None}).check()  # before a clash
    cfg = settings.for_study(args.study, study_dir(args.study, args.out), given)
    settings.check(cfg)
    return cfg


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


def _start_workers(args, given: dict, base: int, devices: list[str]) -> list:
    """Start ``--workers`` - 1 more processes on the same study (this one is the first), worker i pinned to
    ``devices[i]`` through its environment (search.devices); logs in the study folder."""
    import subprocess

    from .devices import pinned
    from .storage import create_storage_tables, study_dir

    if args.workers == 1:
        return []
    folder = study_dir(args.study, args.out)
    os.makedirs(folder, exist_ok=True)
    create_storage_tables(args.storage, folder)  # once, before several processes race to create them
    cmd = [sys.executable, "-m", "search.run", "--study", args.study, "--out", folder]
    env = dict(os.environ)
    cpu_workers = devices.count("cpu")
    if cpu_workers > 1:  # the cores split between the CPU workers of this machine (search.threads)
        import torch

        from .threads import share

        each = share(cpu_workers)
        env["OMP_NUM_THREADS"] = str(each)
        torch.set_num_threads(each)  # this process is one of them
    if args.storage:  # through the environment: a password on a command line is visible to every user (ps)
        env["EINSTRUCT_STORAGE"] = args.storage
    children = []
    for i in range(1, args.workers):
        pin, device = pinned(devices[i])
        argv = [*cmd, *settings.to_argv({**given, "device": device}), "--worker-index", str(base + i)]
        log = open(os.path.join(folder, f"worker-{i}.log"), "w")  # the child writes to it
        children.append((i, subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**env, **pin})))
        log.close()
    return children


def _devices(args, given: dict, cfg: dict) -> list[str]:
    """Each worker's device (search.devices.assign); sets ``args.workers`` to their count, and this process (worker
    0) to the first of them."""
    from .devices import assign

    devices = assign(args.devices, args.workers, given["device"], cfg["device"])
    args.workers = len(devices)
    if devices[0] != cfg["device"]:
        given["device"] = devices[0]
        settings.check({**cfg, "device": devices[0]})  # e.g. --compile reduce-overhead on cpu
    if devices[0].startswith("cuda:"):
        import torch

        torch.cuda.set_device(devices[0])  # this process's own default too: no stray context on another GPU
    return devices


def _stop(children) -> None:
    for _, p in children:
        p.terminate()
    for _, p in children:
        p.wait()


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    given = {k: getattr(args, k) for k in settings.Settings.names()}
    if args.workers is not None and args.workers < 1:
        print(f"search.run: error: --workers must be 1 or more, got {args.workers}", file=sys.stderr)
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
        devices = _devices(args, given, _check(args, given))  # before workers start: each would refuse the same
        rep.show_devices = len(devices) > 1 or args.devices is not None
        children = [] if args.dry_run else _start_workers(args, given, base, devices)
        from .loop import run_search

        result = run_search(
            args.study,
            storage=args.storage,
            out=args.out,
            dry_run=args.dry_run,
            reporter=rep,
            worker=base,
            devices=devices if rep.show_devices else None,
            **given,
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

    from .space import Candidate, make_space

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
        cand = Candidate.from_row(b, make_space(result.settings["space"], (1,)).by_name())
        spec = cand.structure_spec()
        print(f"\nbest structure at the top level, as a {b['width']}x{b['width']} layer:\n")
        print(es.compile(spec, int(b["width"])).table())


if __name__ == "__main__":
    run_command(main)
