"""The search loop: per compute level, an Optuna study proposes candidates, which are trained for exactly
the level's FLOP allowance; invalid or unaffordable ones are rejected at zero cost with a reason.

Each level is its own Optuna study (``<study>.L<i>``) in one storage, because losses at different
compute are not comparable for a sampler. Reference structures are enqueued first at every level.
Re-running with the same study name resumes: finished trials stay, the budget counts what was spent.
The settings that define a study (KEYED) are stored in its database when it is created and read from
there afterwards; study.json is a copy for people and tools.

Any number of workers (processes, machines) may run the same study against one storage: the budget is
held by an atomic reservation per trial (search.ledger), a trial whose worker died is found (its process
gone, or its heartbeat stopped), charged what it may have spent and retried from its checkpoint, and a
trial that finished before its worker died is kept (search.recovery). A worker that runs out of new
trials waits for the other workers' trials to end, so that it can retry any of them that die; it
returns when no trial of the study is running.

The order of a trained trial's writes is what makes a kill anywhere safe: reserve (ledger) -> train,
raising the ledger's bound before each stretch -> record the result in the trial -> settle (ledger,
only if the reservation is still this trial's) -> tell Optuna -> remove the checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field

import einstruct as es

from . import confirm, faults, optuna_api, outputs, train
from . import ledger as ledger_mod
from . import settings as settings_mod
from . import space as space_mod
from .budget import Level, check_plan, plan_levels
from .devices import estimate as estimate_on
from .errors import SearchError
from .ledger import Ledger
from .outcomes import Refused, Rejected, Status
from .recovery import OWNER, Recoverer, TrialLost, Worker, checkpoint_path, clean_folder, retry_of, set_attrs, tell
from .storage import check_storage, check_study_name, default_url, open_storage, redact, study_dir
from .tasks import get as get_task

log = logging.getLogger(__name__)

DEFAULTS = settings_mod.DEFAULTS  # every option's default, by name: defined once, in search.settings
KEYED = settings_mod.KEYED  # the options that must match when a study is resumed
SAMPLERS = settings_mod.SAMPLERS


class Reporter:
    """Progress hooks; the command line prints through them, the library stays silent."""

    def plan(self, info: dict) -> None: ...
    def level_start(self, level: Level, done: int) -> None: ...
    def trial_start(self, level: Level, label: str, steps: int) -> None: ...
    def trial_step(self, info: dict) -> None: ...
    def trial_end(self, row: dict, spent: float, best: float | None) -> None: ...


@dataclass
class SearchStudy:
    """A search's settings, plan and per-level Optuna studies (empty for a dry run)."""

    name: str
    folder: str
    settings: dict
    levels: tuple[Level, ...]
    studies: list = field(default_factory=list)  # [(level index, optuna.Study)]
    estimate: dict = field(default_factory=dict)
    ledger: Ledger | None = None
    reader: outputs.TrialReader | None = None  # reads only the level studies that may have changed

    def read(self) -> tuple[dict | None, list]:
        """What the storage holds now: the ledger's charges, then every level study's trials (in that order: a
        trial charged in the first read is in the second)."""
        charges = self.ledger.charges() if self.ledger is not None else None
        trials = self.reader.read(self.studies) if self.reader is not None else outputs.read_trials(self.studies)
        return charges, trials

    def rows(self, read: tuple[dict | None, list] | None = None) -> list[dict]:
        """One row per trial (search.outputs.trial_rows), from ``read`` (what ``read()`` returned) or read now."""
        charges, trials = read if read is not None else self.read()
        return outputs.trial_rows(trials, charges)

    @property
    def spent(self) -> int:
        return _spent(self.rows())

    def best(self, level: int | None = None) -> dict | None:
        level = self.levels[-1].index if level is None else level
        done = [r for r in self.rows() if r["state"] == "COMPLETE" and r["level"] == level]
        return min(done, key=lambda r: float(r["loss"])) if done else None


def _spent(rows) -> int:
    return sum(int(r["train_flops"] or 0) for r in rows)


def make_sampler(name: str, seed: int):
    import optuna

    s = optuna.samplers
    makers = {
        "tpe": lambda: s.TPESampler(multivariate=True, group=True, seed=seed, constant_liar=True),
        "random": lambda: s.RandomSampler(seed=seed),
        "qmc": lambda: s.QMCSampler(seed=seed, warn_independent_sampling=False),
        "cmaes": lambda: s.CmaEsSampler(seed=seed, warn_independent_sampling=False),
        "gp": lambda: s.GPSampler(seed=seed),
    }
    if name not in makers:
        raise SearchError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    with warnings.catch_warnings():  # multivariate/group TPE and GP are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return makers[name]()


def _sqlite_file(url: str) -> str | None:
    if not url.startswith("sqlite"):
        return None
    path = url.split(":///", 1)[1] if ":///" in url else ""
    return None if not path or path.startswith(":memory:") else path


def _stored_study(url: str, name: str):
    """(what the storage holds of study ``name``, the opened storage or None), creating no file: a missing or
    empty SQLite file is not opened (opening it would make it a new, empty study)."""
    nothing = {"settings": None, "budget": None, "studies": False}
    path = _sqlite_file(url)
    if path is not None and (not os.path.exists(path) or os.path.getsize(path) == 0):
        return {**nothing, "file": path, "empty": os.path.exists(path)}, None
    store = open_storage(url)
    return {**ledger_mod.stored(optuna_api.engine(store), name), "file": path, "empty": False}, store


def _known(stored: dict) -> bool:
    return stored["settings"] is not None or stored["budget"] is not None or stored["studies"]


def _check_records(name: str, folder: str, url: str, stored: dict) -> None:
    """Refuse to start afresh in a folder that records a study its storage does not hold (a lost or emptied
    study.db): starting would overwrite trials.csv, the only record left."""
    if _known(stored):
        return
    meta = os.path.join(folder, "study.json")
    csv_path = os.path.join(folder, "trials.csv")
    n, spent = 0, None
    if os.path.exists(csv_path):
        try:
            n = len(outputs.read_trials_csv(csv_path))
        except (OSError, ValueError, UnicodeDecodeError):
            n = 1
    if os.path.exists(meta):
        import json

        settings_mod.read_study_json(meta)  # an unreadable study.json is its own error
        with open(meta) as f:
            spent = json.load(f).get("spent")
    if not n and not os.path.exists(meta):
        return
    what = f"{n} trials in trials.csv" + (
        f", {spent:.4g} training FLOPs spent per study.json" if isinstance(spent, (int, float)) else ""
    )
    if stored.get("file"):
        db = stored["file"]
        state = (
            "is empty (0 bytes)"
            if stored.get("empty")
            else ("is missing" if not os.path.exists(db) else "holds no such study")
        )
        raise SearchError(
            f"{db} {state}, but {folder} records study {name!r} ({what}): restore study.db from a backup "
            f"(with its study.db-wal file, if any) and run again, or move {folder} away to start a new "
            "study; nothing was changed"
        )
    raise SearchError(
        f"storage {redact(url, url)} holds no study {name!r}, but {folder} records one ({what}): give "
        f"the --storage that holds it, or move {folder} away to start a new study; nothing was changed"
    )


def _point(cand, seed: int | None = None) -> str:
    """A digest of the candidate (family, arguments, width; and a confirmation run's seed): one training per point
    and level."""
    import hashlib
    import json

    what = cand.columns() if seed is None else {**cand.columns(), "seed": seed}
    return hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:40]


def reference_width(task, spec, widths, allowance: float, min_steps: int, target_steps: int) -> int:
    """The grid width whose step count at this allowance is closest (in log) to target_steps."""
    best, best_err = None, math.inf
    for w in widths:
        try:
            steps, _ = train.plan(task, spec, w, allowance)
        except (es.SpecError, SearchError):
            continue
        if steps < min_steps:
            continue
        err = abs(math.log(steps / target_steps))
        if err < best_err:
            best, best_err = w, err
    return best if best is not None else min(widths)


def probe(task, widths, device: str, threads: int | None = None) -> dict:
    """Throughput of real steps and the fixed cost of a trial, for the wall-time estimate.

    Dense and BTT, each at the smallest and at a middle width of the grid; the slowest rate counts.
    Small models are overhead-bound (far fewer FLOP/s) and the search often favours them on a CPU
    (on the default study a middle-width-only probe was 4x optimistic). ``threads``: the search's --threads,
    so that the probe runs each step on the threads the trials will.
    """
    ws = sorted(widths)
    rates = []
    for w in sorted({ws[0], ws[len(ws) // 2]}):
        for spec in (None, es.presets.btt(rank=1)):
            try:
                _, per_step = train.plan(task, spec, w, 1.0)
            except (es.SpecError, SearchError):
                continue
            train.run(task, spec, w, train_flops=per_step, seed=0, device=device, evals=1, threads=threads)  # warm-up
            r = train.run(task, spec, w, train_flops=per_step * 16, seed=0, device=device, evals=1, threads=threads)
            rates.append(r.train_flops / max(r.seconds, 1e-9))
    w = ws[len(ws) // 2]
    t0 = time.perf_counter()
    _, per_step = train.plan(task, None, w, 1.0)
    train.run(task, None, w, train_flops=per_step, seed=0, device=device, evals=1, threads=threads)
    overhead = time.perf_counter() - t0  # build, groups, one step, one evaluation
    return {"flops_per_second": min(rates), "seconds_per_trial": overhead, "probe_width": w}


def run_search(
    study: str = "default",
    *,
    storage: str | None = None,
    out: str | None = None,
    dry_run: bool = False,
    reporter: Reporter | None = None,
    worker: int = 0,
    estimate: bool = True,
    settings: settings_mod.Settings | None = None,
    devices: list[str] | None = None,
    **given,
) -> SearchStudy:
    """Run (or resume, or join) a budgeted structure search; returns the SearchStudy. See search.run.

    The options are ``settings`` (a search.settings.Settings: every field counts as given) and keyword
    arguments of the same names, which take precedence; an option left out takes the stored study's value, or
    its default. They are checked as the command line checks them: a SearchError with one line naming the
    option, before anything is read or trained.

    ``worker`` is kept for callers that number their processes; workers tell themselves apart through the
    study's worker table (each live worker gets its own ordinal, which offsets its sampler's seed, so that
    workers started in any way do not propose the same points; training seeds stay ``seed``).
    ``estimate=False`` skips the throughput probe. ``devices``: the device of each worker search.run starts
    (search.devices), for a wall-time estimate that probes each of them; the default, this process's device only.
    """
    import optuna

    name = check_study_name(study)
    folder = study_dir(name, out)
    given = settings_mod.normal({**(settings.as_dict() if settings is not None else {}), **given})
    settings_mod.Settings.from_dict({k: v for k, v in given.items() if v is not None or k not in DEFAULTS}).check()
    url = storage or default_url(folder)
    if storage is not None:
        check_storage(storage)  # before anything is read or trained: a bad URL fails in seconds
    known, store = _stored_study(url, name)
    _check_records(name, folder, url, known)
    cfg = settings_mod.for_study(name, folder, given, known["settings"])
    if (
        known["settings"] is None
        and known["budget"] is not None
        and not os.path.exists(os.path.join(folder, "study.json"))
    ):
        raise SearchError(
            f"study {name!r} exists in its storage from before settings were kept there, and its "
            f"study.json is missing from {folder}: restore study.json from a backup to resume it"
        )
    settings_mod.check(cfg)  # the study's own settings, as stored
    rep = reporter or Reporter()
    heartbeat = int(cfg["heartbeat"]) if cfg["heartbeat"] else 0
    if not heartbeat and _sqlite_file(url) is None:
        raise SearchError(
            "--heartbeat 0 (off) needs the embedded SQLite storage: without heartbeats a worker on "
            "another machine that dies is never found, and its trial would hold its budget forever; "
            "give --heartbeat 1 or more with --storage"
        )
    task_kwargs = dict(cfg["task_settings"] or {})
    if cfg["data"] is not None:
        task_kwargs["data"] = cfg["data"]
    task = get_task(cfg["task"], **task_kwargs)
    search_space = space_mod.make_space(cfg["space"], task.widths)
    refs = space_mod.references(search_space)
    top = max(int(cfg["top_trials"]), len(refs) + 1)
    explore_budget = float(cfg["budget"]) * (1 - float(cfg["confirm_share"]))  # the rest: confirmation
    levels = plan_levels(explore_budget, int(cfg["levels"]), float(cfg["ratio"]), top)
    train.resolve_device(cfg["device"])
    if not dry_run:
        try:  # likewise an unusable output folder
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise SearchError(
                f"cannot create the study folder {folder!r}: {e.strerror or e}; give a writable folder with --out"
            ) from None
    task.prepare(int(cfg["seed"]))
    feasible = check_plan(
        task,
        search_space,
        refs,
        float(cfg["budget"]),
        int(cfg["min_steps"]),
        int(cfg["levels"]),
        float(cfg["ratio"]),
        top,
        1 - float(cfg["confirm_share"]),
    )  # SearchError when no level can train any candidate
    est = {}
    if estimate or dry_run:
        trials = sum(lv.trials for lv in levels)
        on = devices or [cfg["device"]]
        est = estimate_on(lambda d: probe(task, task.widths, d, cfg["threads"]), on, float(cfg["budget"]), trials)
    result = SearchStudy(name, folder, cfg, levels, estimate=est)
    rep.plan(
        {
            "study": name,
            "folder": folder,
            "settings": cfg,
            "levels": levels,
            "estimate": est,
            "references": [r.label for r in refs],
            "dry_run": dry_run,
            "feasibility": feasible,
        }
    )
    if dry_run:
        return result

    os.makedirs(folder, exist_ok=True)
    store = store or open_storage(url)
    keyed = {k: cfg[k] for k in KEYED}
    engine = optuna_api.engine(store)
    ledger = result.ledger = Ledger(engine, name, float(cfg["budget"]), keyed)  # refuses another stored budget
    result.reader = outputs.TrialReader(engine)
    settings_mod.check_same(name, ledger.store_settings(keyed), keyed)  # the first worker's settings are the study's
    me = Worker(ledger, heartbeat)
    try:
        _work(
            result,
            ctx := _Context(task, cfg, folder, ledger, rep, store, heartbeat, me, Recoverer(ledger, me)),
            url,
            storage,
            search_space,
            refs,
            levels,
            optuna,
        )
    finally:
        me.end()
    del ctx
    return result


def _work(result, ctx, url, storage, search_space, refs, levels, optuna) -> None:
    cfg, folder, ledger, rep, store, me, recover = (
        ctx.cfg,
        ctx.folder,
        ctx.ledger,
        ctx.rep,
        ctx.storage,
        ctx.worker,
        ctx.recover,
    )
    name, task = result.name, ctx.task
    meta = {
        "settings": cfg,
        "storage": redact(url) if storage else "default (study.db in this folder)",
        "levels": [{"index": lv.index, "allowance": lv.allowance, "trials": lv.trials} for lv in levels],
        "version": es.__version__,
    }
    outputs.write_json(os.path.join(folder, "study.json"), meta)
    clean_folder(folder, [], ledger)  # temporary files left by killed processes
    csv_path = os.path.join(folder, "trials.csv")
    seed = int(cfg["seed"])
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def one(st, lv, explore, seen=None) -> list | None:
        """Ask, evaluate and record one trial; returns the study's trials as read after this worker's last write to
        the storage (None when it did not read them). ``seen``: the study's trials as read since this worker's last
        write to them, which the check for a trained twin takes instead of reading them again (see _trials)."""
        with optuna_api.one_sampling_read(st):  # the sampler's reads of this ask and its suggestions: one
            with warnings.catch_warnings():  # Optuna expects heartbeats with optimize(); ours are the worker's
                warnings.simplefilter("ignore", UserWarning)
                with me.asking():
                    trial = st.ask()
                    optuna_api.set_system_attr(st, optuna_api.trial_id(trial), OWNER, me.token)
            faults.point("after_ask")
            cand = search_space.suggest(trial)
        row = _evaluate(trial, st, cand, lv, ctx, seen)
        if row is None:
            return None
        if explore is not None and row.get("rejected") is not None and Rejected(row["rejected"]).duplicate:
            # the sampler is stuck on a point: explore once
            st.enqueue_trial(search_space.random_params(explore), user_attrs={"exploration": True})
        read = result.read()
        rows = result.rows(read)
        outputs.write_trials_csv(csv_path, rows)
        done = [
            float(r["loss"])
            for r in rows
            if r["level"] == lv.index % outputs.CONFIRM and r["phase"] == row.get("phase") and r["state"] == "COMPLETE"
        ]
        rep.trial_end(row, _spent(rows), min(done) if done else None)
        return next(trials for level, trials in read[1] if level == lv.index)

    def references(st, lv) -> bool:
        """Queue the level's references once, over all workers; a kill halfway is finished by the next worker."""
        if st.user_attrs.get("references_enqueued"):
            return True
        live = recover.live
        if not ledger.claim(f"{name}.L{lv.index}.references", me.token, lambda o: (live.refresh(), live.dead(o))[1]):
            return False  # a live worker is queueing them
        have = [
            optuna_api.queued_params(t) or t.params
            for t in st.get_trials(deepcopy=False)
            if t.user_attrs.get("reference")
        ]
        for ref in refs:
            w = reference_width(task, ref.spec(), task.widths, lv.allowance, cfg["min_steps"], cfg["target_steps"])
            params = search_space.params_for(ref.at(w))
            if not any(all(h.get(k) == v for k, v in params.items()) for h in have):
                st.enqueue_trial(params, user_attrs={"reference": True})
                faults.point("after_reference_enqueued")
        st.set_user_attr("references_enqueued", True)
        return True

    explorers = {}
    for lv in levels:
        offset = seed * 1000 + lv.index + 7919 * me.ordinal
        st = optuna.create_study(
            study_name=f"{name}.L{lv.index}",
            storage=store,
            direction="minimize",
            sampler=make_sampler(cfg["sampler"], offset % 2**32),
            load_if_exists=True,
        )
        result.studies.append((lv.index, st))
        ledger.adopt(
            (optuna_api.trial_id(t), lv.index, t.user_attrs["train_flops"])
            for t in st.get_trials(deepcopy=False)
            if t.state.is_finished() and t.user_attrs.get("train_flops", 0) > 0
        )
        recover(st, lv.index)
        queued = references(st, lv)  # once True, it stays True (the study attribute is never removed)
        rep.level_start(lv, ledger.used_slots(lv.index))
        explore = explorers[lv.index] = random.Random(offset)
        cap = 5 * lv.trials + len(refs)
        seen = None  # the study's trials, read since this worker's last write to the storage
        while True:
            now = None if ledger.used_slots(lv.index) < lv.trials else _trials(st, seen)
            if now is not None and not _waiting(now):
                break
            now = now if now is not None else _trials(st, seen)
            if len(now) >= cap:
                break
            seen = one(st, lv, explore, now)
            if recover(st, lv.index, seen):
                seen = None
            if not queued:
                queued, seen = references(st, lv), None

    def drain(pairs, queue) -> None:
        """Out of new work: finish the trials of workers that die, until no trial is running."""
        while True:
            busy = False
            for st, lv in pairs:
                recover(st, lv.index)
                busy = not queue(st, lv) or busy
                seen = None
                while _waiting(now := _trials(st, seen)):
                    seen = one(st, lv, explorers.get(lv.index), now)
                    if recover(st, lv.index, seen):
                        seen = None
                busy = busy or any(t.state == optuna.trial.TrialState.RUNNING for t in now)
            if not busy:
                break
            time.sleep(min(ctx.heartbeat, 1) if ctx.heartbeat else 0.5)

    drain([(st, lv) for (_, st), lv in zip(result.studies, levels)], references)
    if float(cfg["confirm_share"]) > 0:
        runs = _confirmation(result, ctx, search_space, levels, optuna, meta)

        def queue(st, clv) -> bool:
            """Queue the level's confirmation runs once, over all workers (as the references are)."""
            if st.user_attrs.get("confirm_enqueued"):
                return True
            live = recover.live
            if not ledger.claim(f"{name}.L{clv.index}.confirm", me.token, lambda o: (live.refresh(), live.dead(o))[1]):
                return False
            have = {t.user_attrs.get("confirm") for t in st.get_trials(deepcopy=False)}
            for cand, s in runs[clv.index]:
                key = f"{cand.label}|{cand.width}|{s}"
                if key not in have:
                    st.enqueue_trial(search_space.params_for(cand), user_attrs={"confirm": key, "seed": s})
            st.set_user_attr("confirm_enqueued", True)
            return True

        pairs = [(st, _level(levels, i, runs)) for i, st in result.studies if i >= outputs.CONFIRM]
        for st, clv in pairs:
            recover(st, clv.index)
            queue(st, clv)
            rep.level_start(clv, ledger.used_slots(clv.index))
            seen = None
            while _waiting(now := _trials(st, seen)):
                seen = one(st, clv, None, now)
                if recover(st, clv.index, seen):
                    seen = None
        drain(pairs, queue)
    clean_folder(folder, result.studies, ledger)  # checkpoints of finished trials a kill left behind
    outputs.write_trials_csv(csv_path, result.rows())
    meta["spent"] = result.spent
    outputs.write_json(os.path.join(folder, "study.json"), meta)


def _level(levels, index: int, runs: dict) -> Level:
    """The confirmation level of ledger level ``index`` (CONFIRM + i): level i's allowance, its planned runs."""
    return Level(index, levels[index - outputs.CONFIRM].allowance, len(runs[index]))


def _confirmation(result, ctx, search_space, levels, optuna, meta) -> dict:
    """Plan the confirmation phase from the finished exploration (search.confirm), record the plan in study.json
    and open its level studies; the (candidate, seed) runs by ledger level."""
    cfg, task = ctx.cfg, ctx.task

    def fallback(structure, i):
        spec = structure.at(min(task.widths)).spec()
        return reference_width(task, spec, task.widths, levels[i].allowance, cfg["min_steps"], cfg["target_steps"])

    entries = confirm.plan(
        result.rows(), search_space.by_name(), [lv.index for lv in levels], task.widths, cfg, fallback
    )
    seed_list = confirm.seeds(int(cfg["seed"]), int(cfg["confirm_seeds"]))
    meta["confirmation"] = confirm.public(entries, seed_list, task.widths)
    outputs.write_json(os.path.join(ctx.folder, "study.json"), meta)
    runs = {}
    for lv in levels:
        index = outputs.CONFIRM + lv.index
        runs[index] = confirm.runs(entries, lv.index, seed_list)
        st = optuna.create_study(
            study_name=f"{result.name}.L{index}",
            storage=ctx.storage,
            direction="minimize",
            sampler=optuna.samplers.RandomSampler(seed=int(cfg["seed"])),  # asks only enqueued runs
            load_if_exists=True,
        )
        result.studies.append((index, st))
    return runs


@dataclass
class _Context:
    """What evaluating a trial needs besides the trial: the task, settings, folder, ledger and hooks."""

    task: object
    cfg: dict
    folder: str
    ledger: Ledger
    rep: Reporter
    storage: object
    heartbeat: int
    worker: Worker
    recover: Recoverer


def _trials(st, seen: list | None) -> list:
    """The study's trials: ``seen`` when given, else read now.

    ``seen`` is a read of this study that this worker made after its own last write to the storage (one() returns
    its read of the trials.csv rows; a recovery that may have written drops it). Taking it instead of a new read
    is what a new read would give if the other workers had been a few milliseconds slower, which they may always
    be: every decision made from it is one the loop could have made anyway, and each of them is checked again
    where it matters (the ledger's reservation, the recovery's claims and its own fresh reads).
    """
    return seen if seen is not None else st.get_trials(deepcopy=False)


def _waiting(trials: list) -> bool:
    from optuna.trial import TrialState

    return any(t.state == TrialState.WAITING for t in trials)


_NEWER_COLUMNS = ("family_params", "group")  # a record from before them matches without them


def _twin(st, trial, cand, seen: list | None = None):
    """A finished, trained trial of this level with exactly the same candidate, if any (from ``seen``, the study's
    trials as read since this worker's last write to them other than asking for ``trial``, when given)."""
    from optuna.trial import TrialState

    cols = cand.columns()
    for t in _trials(st, seen):
        if t.state != TrialState.COMPLETE:
            continue
        rec = t.user_attrs.get("record", {})
        if (
            t.number != trial.number
            and t.user_attrs.get("train_flops", 0) > 0
            and all(rec.get(k) == v for k, v in cols.items() if k in rec or k not in _NEWER_COLUMNS)
        ):
            return t
    return None


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _evaluate(trial, st, cand, lv: Level, ctx: _Context, seen: list | None = None) -> dict | None:
    """Reject for free, or reserve the FLOPs, train (a retry: from its predecessor's checkpoint), record the result,
    settle, tell; returns the row (None if another worker holds this trial). ``seen``: see _twin."""
    from optuna.trial import TrialState

    task, cfg, ledger, rep = ctx.task, ctx.cfg, ctx.ledger, ctx.rep
    phase = "confirm" if lv.index >= outputs.CONFIRM else "explore"
    seed = int(trial.user_attrs.get("seed", cfg["seed"]))  # a confirmation run's fresh seed
    attrs = {
        "level": lv.index % outputs.CONFIRM,
        "allowance": int(lv.allowance),
        "train_flops": 0,
        **cand.columns(),
        "phase": phase,
        "seed": seed,
    }
    tid = optuna_api.trial_id(trial)
    pred = trial.user_attrs.get("retry_of_id")  # the lost trial this one continues
    history = list(trial.user_attrs.get("retry_history", []))
    first = retry_of(trial) if pred is not None else None
    lost_row = {
        **attrs,
        "state": "FAIL",
        "loss": "",
        "reason": "lost: taken for dead by another worker (its "
        "heartbeat stopped); its work is discarded and the charge is what that worker recorded",
    }

    def finish(state, value=None, **more):
        """Record the outcome in the trial (what recovery completes it from after a kill), then tell Optuna."""
        attrs.update(more)
        if not set_attrs(st, tid, train_flops=attrs["train_flops"], record={**attrs, "outcome": state.name}):
            return None
        faults.point("after_outcome")
        return state

    def told(state, value=None):
        if not tell(st, trial.number, state, value):  # another worker took this one for dead and failed it
            log.warning("trial %s was failed by another worker before it finished", trial.number)
            return lost_row
        faults.point("after_tell")
        return {**attrs, "state": state.name, "loss": value if value is not None else attrs.get("loss", "")}

    def reject(kind: Rejected, reason: str, **more):
        more = {"rejected": kind.value, **more}
        return told(TrialState.PRUNED) if finish(TrialState.PRUNED, reason=reason, **more) else lost_row

    if phase == "confirm" and "seed" not in trial.user_attrs:  # asked when another worker took the last run
        return reject(Rejected.LEVEL, "not a planned confirmation run (the level's runs are taken)")
    if pred is None and phase == "explore":  # confirmation runs repeat a point on purpose, each on its own seed
        twin = _twin(st, trial, cand, seen)
        if twin is not None:
            # The same point again (common with categorical widths): spend nothing, and tell the sampler PRUNED,
            # not COMPLETE: a repeated value would only sharpen TPE's belief in that point and bring it back,
            # while a pruned trial counts as a poor outcome there and pushes the next proposals elsewhere. The
            # row keeps the twin's loss for reading; the report counts it as a duplicate, never as a point.
            rec = twin.user_attrs.get("record", {})
            attrs.update({k: rec.get(k, "") for k in ("steps", "params", "omega", "psi", "nu", "seconds")})
            return reject(
                Rejected.REPEAT,
                f"same as trial {twin.number}: not retrained",
                loss=twin.value,
                duplicate_of=twin.number,
            )
    try:
        spec = cand.spec()
        layer = es.compile(cand.structure_spec(), cand.width)
        steps, per_step = train.plan(task, spec, cand.width, lv.allowance)
    except (es.SpecError, SearchError) as e:
        return reject(Rejected.INVALID, f"invalid at width {cand.width}: {e}")
    attrs.update(omega=layer.omega, psi=layer.psi, nu=layer.nu)
    if steps < cfg["min_steps"]:
        return reject(
            Rejected.STEPS,
            f"width {cand.width} gets only {steps} steps of {per_step:.3g} FLOPs within the allowance "
            f"(minimum {cfg['min_steps']})",
        )
    ckpt = checkpoint_path(ctx.folder, lv.index, trial.number)  # this attempt's own file
    start = 0
    if pred is not None and history:  # continue from a copy of the lost attempt's checkpoint, if there is one
        try:
            if train.copy_checkpoint(checkpoint_path(ctx.folder, lv.index, history[-1]), ckpt):
                start = train.checkpoint_step(ckpt, train.checkpoint_key(task, spec, cand.width, lv.allowance, seed))
        except OSError as e:
            log.warning("trial %s cannot copy its predecessor's checkpoint (%s); starts from step 0", trial.number, e)
    need = (steps - start) * per_step  # a retry pays only for what its checkpoint leaves
    every = max(int(cfg["checkpoint_steps"]), math.ceil(steps / max(1, int(cfg["checkpoints"] or 1))), 1)
    bound = min(steps - start, every) * per_step
    if not set_attrs(st, tid, record=attrs):  # what the trial is, for its row if its worker dies while training
        return lost_row
    why = ledger.reserve(
        tid,
        lv.index,
        need,
        None if pred is not None else lv.trials,
        bound,
        number=trial.number,
        owner=ctx.worker.token,
        point=_point(cand) if phase == "explore" else _point(cand, seed),
        retry_of=pred,
    )
    faults.point("after_reserve")
    if why is not None:
        _remove(ckpt)
        if why.kind is Refused.BUDGET:
            return reject(
                Rejected.BUDGET, f"allowance {need:.3g} does not fit the {why.left:.3g} FLOPs left in the budget"
            )
        if why.kind is Refused.LEVEL:
            return reject(Rejected.LEVEL, f"{why.detail} (other workers took them)")
        if why.kind is Refused.SAME:
            return reject(
                Rejected.CONCURRENT,
                f"duplicate of trial {why.trial}: the same point is trained there already (by "
                "another worker, at the same time); not trained twice",
            )
        if why.kind is Refused.RETRIED:
            return reject(
                Rejected.RETRY_TAKEN, f"duplicate retry of trial {first}: another retry continues it; not trained"
            )
        log.warning("trial %s is held by another worker; left to it", trial.number)  # TAKEN: it runs this very trial
        return None
    if pred is not None:  # taken over: the predecessor's checkpoint has served (this attempt has its own copy)
        _remove(checkpoint_path(ctx.folder, lv.index, history[-1]))

    def on_bound(flops: int) -> None:  # before the run spends them (a lost trial is charged the ledger's bound)
        if flops - start * per_step > need:
            raise SearchError(f"trial {trial.number} would spend more than it reserved")
        if not ledger.raise_bound(tid, flops - start * per_step):
            raise TrialLost(f"trial {trial.number} was taken for dead by another worker")
        faults.point("after_bound")

    rep.trial_start(lv, cand.label, steps)
    try:
        r = train.run(
            task,
            spec,
            cand.width,
            lv.allowance,
            seed=seed,
            device=cfg["device"],
            compile=cfg["compile"],
            threads=cfg["threads"],
            callback=rep.trial_step,
            checkpoint=ckpt,
            checkpoint_every=every,
            on_bound=on_bound,
            require_step=start,
        )
    except TrialLost:  # charged its bound already, retried elsewhere: spend nothing more, leave the checkpoint
        log.warning("trial %s was taken for dead by another worker; stopped", trial.number)
        return lost_row
    except Exception as e:  # a crash in one candidate must not lose the study
        log.exception("trial %s failed", trial.number)
        state = finish(TrialState.FAIL, train_flops=need, reason=f"crashed: {type(e).__name__}: {e}")
        if state is None or ledger.settle(tid, need) != Status.DONE:  # unknown spend: charged everything it reserved
            return lost_row
        _remove(ckpt)
        return told(state)
    faults.point("after_train")
    spent = r.train_flops - r.resumed_step * per_step
    note = "" if first is None else f"retry of trial {first}, resumed from step {r.resumed_step} of {steps}"
    attrs.update(
        train_flops=spent,
        steps=r.steps,
        params=r.params,
        seconds=round(r.seconds, 3),
        **({"compile_seconds": round(r.compile_seconds, 3)} if r.compile_seconds else {}),
        curve=[list(p) for p in r.curve],
        reason=note,
    )
    if r.diverged:
        state = finish(TrialState.FAIL, reason=f"diverged: {r.reason}" + (f"; {note}" if note else ""), loss="")
    else:
        state = finish(TrialState.COMPLETE, loss=r.loss)
    if state is None:
        return lost_row
    settled = ledger.settle(tid, spent)  # only if the reservation is still this trial's
    faults.point("after_settle")
    if settled != Status.DONE:
        log.warning(
            "trial %s was taken for dead by another worker while it trained; its result is discarded", trial.number
        )
        return lost_row
    row = told(state, None if r.diverged else r.loss)
    _remove(ckpt)
    return row
