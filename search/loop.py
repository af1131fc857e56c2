"""The search loop: per compute level, an Optuna study proposes candidates, which are trained for exactly
the level's FLOP allowance; invalid or unaffordable ones are rejected at zero cost with a reason.

Each level is its own Optuna study (``<study>.L<i>``) in one storage, because losses at different
compute are not comparable for a sampler. Reference structures are enqueued first at every level.
Re-running with the same study name resumes: finished trials stay, the budget counts what was spent.

Any number of workers (processes, machines) may run the same study against one storage: the budget is
held by an atomic reservation per trial (search.ledger), a trial whose worker died is found by its stale
heartbeat, charged what it may have spent and retried from its checkpoint (search.recovery). A worker
that runs out of new trials waits for the other workers' trials to end, so that it can retry any of them
that die; it returns when no trial of the study is running.
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

from . import outputs, train
from . import space as space_mod
from .budget import Level, check_plan, plan_levels
from .errors import SearchError
from .ledger import Ledger
from .recovery import Heartbeat, Recovery, TrialLost, checkpoint_path, recover, retry_of
from .storage import check_storage, check_study_name, default_url, open_storage, redact, study_dir
from .tasks import get as get_task

log = logging.getLogger(__name__)

DEFAULTS = {
    "task": "regression", "data": None, "budget": 6e10, "levels": 3, "ratio": 3.0, "top_trials": 7,
    "sampler": "tpe", "seed": 0, "space": "full", "min_steps": 20, "target_steps": 300, "device": "auto",
    "task_settings": {}, "heartbeat": 10, "checkpoints": 10, "checkpoint_steps": 50,
}
KEYED = ("task", "data", "budget", "levels", "ratio", "top_trials", "sampler", "seed", "space", "min_steps",
         "target_steps", "task_settings")  # must match when a study is resumed
SAMPLERS = ("tpe", "random", "qmc", "cmaes", "gp")
# heartbeat: seconds between a running trial's heartbeats (a dead worker's trial is retried after 3 missed);
# checkpoints: how many times a trial saves its state, so a retry repeats at most 1/checkpoints of it, but
# never more often than every checkpoint_steps steps (each save is a write to the storage).


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

    def rows(self) -> list[dict]:
        return outputs.trial_rows(self.studies, self.ledger.charges() if self.ledger is not None else None)

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


def settings_for(name: str, folder: str, given: dict) -> dict:
    """Defaults < stored settings < given ones; a given setting that contradicts the stored study is an error."""
    unknown = set(given) - set(DEFAULTS) - {"storage"}
    if unknown:
        raise SearchError(f"unknown setting(s) {', '.join(sorted(unknown))}; settings are {', '.join(DEFAULTS)}")
    path = os.path.join(folder, "study.json")
    stored = {}
    if os.path.exists(path):
        import json

        try:
            with open(path) as f:
                stored = json.load(f).get("settings", {})
            if not isinstance(stored, dict):
                raise ValueError("its settings are not a JSON object")
        except (OSError, ValueError, AttributeError) as e:
            raise SearchError(f"{path} cannot be read as this study's settings ({e}); restore it, or delete it to "
                              "start the study's settings afresh") from None
        for k in KEYED:
            if k in given and given[k] is not None and k in stored and _differs(given[k], stored[k]):
                raise SearchError(
                    f"study {name!r} already exists with {k}={stored[k]!r}, not {given[k]!r}; run it with the same "
                    "settings to resume, or pick a new --study name"
                )
    out = dict(DEFAULTS)
    out.update({k: v for k, v in stored.items() if k in DEFAULTS})
    out.update({k: v for k, v in given.items() if v is not None and k in DEFAULTS})
    return out


def _differs(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return not math.isclose(float(a), float(b), rel_tol=1e-9)
    return a != b


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


def probe(task, widths, device: str) -> dict:
    """Throughput of real steps and the fixed cost of a trial, for the wall-time estimate.

    Dense and BTT, each at the smallest and at a middle width of the grid; the slowest rate counts.
    Small models are overhead-bound (far fewer FLOP/s) and the search often favours them on a CPU
    (on the default study a middle-width-only probe was 4x optimistic).
    """
    ws = sorted(widths)
    rates = []
    for w in sorted({ws[0], ws[len(ws) // 2]}):
        for spec in (None, es.presets.btt(rank=1)):
            try:
                _, per_step = train.plan(task, spec, w, 1.0)
            except (es.SpecError, SearchError):
                continue
            train.run(task, spec, w, train_flops=per_step, seed=0, device=device, evals=1)  # warm-up
            r = train.run(task, spec, w, train_flops=per_step * 16, seed=0, device=device, evals=1)
            rates.append(r.train_flops / max(r.seconds, 1e-9))
    w = ws[len(ws) // 2]
    t0 = time.perf_counter()
    _, per_step = train.plan(task, None, w, 1.0)
    train.run(task, None, w, train_flops=per_step, seed=0, device=device, evals=1)
    overhead = time.perf_counter() - t0  # build, groups, one step, one evaluation
    return {"flops_per_second": min(rates), "seconds_per_trial": overhead, "probe_width": w}


def run_search(study: str = "default", *, storage: str | None = None, out: str | None = None,
               dry_run: bool = False, reporter: Reporter | None = None, worker: int = 0, estimate: bool = True,
               **given) -> SearchStudy:
    """Run (or resume, or join) a budgeted structure search; returns the SearchStudy. See search.run.

    ``worker`` tells workers of one study apart: it offsets the sampler's seed, so that workers do not
    propose the same points (training seeds stay ``seed``). ``estimate=False`` skips the throughput probe.
    """
    import optuna

    name = check_study_name(study)
    folder = study_dir(name, out)
    asked = {**DEFAULTS, **{k: v for k, v in given.items() if v is not None}}
    plan_levels(asked["budget"], asked["levels"], asked["ratio"], asked["top_trials"])  # a bad value before a clash
    cfg = settings_for(name, folder, given)
    rep = reporter or Reporter()
    if cfg["sampler"] not in SAMPLERS:
        raise SearchError(f"unknown sampler {cfg['sampler']!r}; choose one of {', '.join(SAMPLERS)}")
    task_kwargs = dict(cfg["task_settings"] or {})
    if cfg["data"] is not None:
        task_kwargs["data"] = cfg["data"]
    task = get_task(cfg["task"], **task_kwargs)
    search_space = space_mod.make_space(cfg["space"], task.widths)
    refs = space_mod.references(search_space)
    top = max(int(cfg["top_trials"]), len(refs) + 1)
    levels = plan_levels(float(cfg["budget"]), int(cfg["levels"]), float(cfg["ratio"]), top)
    train.resolve_device(cfg["device"])
    if storage is not None:
        check_storage(storage)  # before any data is read or anything trained: a bad URL fails in seconds
    if not dry_run:
        try:  # likewise an unusable output folder
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise SearchError(f"cannot create the study folder {folder!r}: {e.strerror or e}; give a writable "
                              "folder with --out") from None
    task.prepare(int(cfg["seed"]))
    feasible = check_plan(task, search_space, refs, float(cfg["budget"]), int(cfg["min_steps"]), int(cfg["levels"]),
                          float(cfg["ratio"]), top)  # SearchError when no level can train any candidate
    est = {}
    if estimate or dry_run:
        est = probe(task, task.widths, cfg["device"])
        trials = sum(lv.trials for lv in levels)
        est["seconds"] = float(cfg["budget"]) / est["flops_per_second"] + trials * est["seconds_per_trial"]
    result = SearchStudy(name, folder, cfg, levels, estimate=est)
    rep.plan({"study": name, "folder": folder, "settings": cfg, "levels": levels, "estimate": est,
              "references": [r.label for r in refs], "dry_run": dry_run, "feasibility": feasible})
    if dry_run:
        return result

    os.makedirs(folder, exist_ok=True)
    url = storage or default_url(folder)
    heartbeat = int(cfg["heartbeat"]) if cfg["heartbeat"] else None
    recovery = Recovery()
    store = open_storage(url, heartbeat=heartbeat, on_stale=recovery)
    ledger = result.ledger = recovery.ledger = Ledger(store.engine, name, float(cfg["budget"]))
    meta = {"settings": cfg, "storage": redact(url) if storage else "default (study.db in this folder)",
            "levels": [{"index": lv.index, "allowance": lv.allowance, "trials": lv.trials} for lv in levels],
            "version": es.__version__}
    outputs.write_json(os.path.join(folder, "study.json"), meta)
    csv_path = os.path.join(folder, "trials.csv")
    seed = int(cfg["seed"])
    grace = 3 * heartbeat if heartbeat else None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ctx = _Context(task, cfg, folder, ledger, rep, store, heartbeat)

    def one(st, lv, explore) -> None:
        with warnings.catch_warnings():  # Optuna expects heartbeats with optimize(); ask() + Heartbeat does the same
            warnings.simplefilter("ignore", UserWarning)
            trial = st.ask()
        with Heartbeat(store, trial._trial_id, heartbeat):
            cand = search_space.suggest(trial)
            row = _evaluate(trial, st, cand, lv, ctx)
        if str(row.get("reason", "")).startswith("same as trial"):  # the sampler is stuck on a point: explore once
            st.enqueue_trial(search_space.random_params(explore), user_attrs={"exploration": True})
        rows = result.rows()
        outputs.write_trials_csv(csv_path, rows)
        done = [float(r["loss"]) for r in rows if r["level"] == lv.index and r["state"] == "COMPLETE"]
        rep.trial_end(row, _spent(rows), min(done) if done else None)

    explorers = {}
    for lv in levels:
        sampler = make_sampler(cfg["sampler"], (seed * 1000 + lv.index + 7919 * int(worker)) % 2**32)
        st = optuna.create_study(study_name=f"{name}.L{lv.index}", storage=store, direction="minimize",
                                 sampler=sampler, load_if_exists=True)
        result.studies.append((lv.index, st))
        ledger.adopt((t._trial_id, lv.index, t.user_attrs["train_flops"]) for t in st.get_trials(deepcopy=False)
                     if t.state.is_finished() and t.user_attrs.get("train_flops", 0) > 0)
        recover(st, grace)
        if not st.user_attrs.get("references_enqueued") and ledger.claim(f"{name}.L{lv.index}.references"):
            for ref in refs:  # one worker enqueues them (the claim is atomic); every worker may run them
                w = reference_width(task, ref.spec(), task.widths, lv.allowance, cfg["min_steps"], cfg["target_steps"])
                cand = space_mod.Candidate(ref.family, w, ref.theta, ref.blocks, ref.rank)
                st.enqueue_trial(search_space.params_for(cand), user_attrs={"reference": True})
            st.set_user_attr("references_enqueued", True)
        rep.level_start(lv, ledger.used_slots(lv.index))
        explore = explorers[lv.index] = random.Random(seed * 1000 + lv.index + 7919 * int(worker))
        while (ledger.used_slots(lv.index) < lv.trials or _waiting(st)) and len(st.trials) < 5 * lv.trials + len(refs):
            one(st, lv, explore)
            recover(st, grace)
    while True:  # out of new work: retry trials of workers that die, until no trial is running
        busy = False
        for (_, st), lv in zip(result.studies, levels):
            recover(st, grace)
            while _waiting(st):
                one(st, lv, explorers[lv.index])
            busy = busy or bool(st.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))
        if not busy:
            break
        time.sleep(heartbeat or 1)
    outputs.write_trials_csv(csv_path, result.rows())
    meta["spent"] = result.spent
    outputs.write_json(os.path.join(folder, "study.json"), meta)
    return result


@dataclass
class _Context:
    """What evaluating a trial needs besides the trial: the task, settings, folder, ledger and hooks."""

    task: object
    cfg: dict
    folder: str
    ledger: Ledger
    rep: Reporter
    storage: object
    heartbeat: int | None


def _waiting(st) -> bool:
    from optuna.trial import TrialState

    return bool(st.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def _twin(st, trial, cand):
    """A finished, trained trial of this level with exactly the same candidate, if any."""
    from optuna.trial import TrialState

    cols = cand.columns()
    for t in st.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        rec = t.user_attrs.get("record", {})
        if t.number != trial.number and t.user_attrs.get("train_flops", 0) > 0 and all(
            rec.get(k) == v for k, v in cols.items()
        ):
            return t
    return None


def _evaluate(trial, st, cand, lv: Level, ctx: _Context) -> dict:
    """Reject for free, or reserve the FLOPs, train (from a checkpoint for a retry), settle; returns the row."""
    from optuna.trial import TrialState

    task, cfg, ledger, rep = ctx.task, ctx.cfg, ctx.ledger, ctx.rep
    attrs = {"level": lv.index, "allowance": int(lv.allowance), "train_flops": 0, **cand.columns()}
    tid = trial._trial_id

    def finish(state, value=None, **more):
        from optuna.exceptions import UpdateFinishedTrialError

        attrs.update(more)
        try:
            trial.set_user_attr("train_flops", attrs["train_flops"])  # read alone by the budget and resume logic
            trial.set_user_attr("record", attrs)  # the rest in one write
            st.tell(trial, value, state=state) if state != TrialState.COMPLETE else st.tell(trial, value)
        except UpdateFinishedTrialError:  # another worker took this one for dead (a late heartbeat) and failed it
            log.warning("trial %s was failed by another worker before it finished", trial.number)
            return {**attrs, "state": "FAIL", "loss": "", "reason": "failed by another worker (late heartbeat)"}
        return {**attrs, "state": state.name, "loss": value if value is not None else attrs.get("loss", "")}

    twin = _twin(st, trial, cand)
    if twin is not None:
        # The same point again (common with categorical widths): spend nothing, and tell the sampler PRUNED,
        # not COMPLETE: a repeated value would only sharpen TPE's belief in that point and bring it back,
        # while a pruned trial counts as a poor outcome there and pushes the next proposals elsewhere. The
        # row keeps the twin's loss for reading; the report counts it as a duplicate, never as a point.
        rec = twin.user_attrs.get("record", {})
        attrs.update({k: rec.get(k, "") for k in ("steps", "params", "omega", "psi", "nu", "seconds")})
        return finish(TrialState.PRUNED, loss=twin.value, reason=f"same as trial {twin.number}: not retrained")
    try:
        spec = cand.spec()
        layer = es.compile(cand.structure_spec(), cand.width)
        steps, per_step = train.plan(task, spec, cand.width, lv.allowance)
    except (es.SpecError, SearchError) as e:
        return finish(TrialState.PRUNED, reason=f"invalid at width {cand.width}: {e}")
    attrs.update(omega=layer.omega, psi=layer.psi, nu=layer.nu)
    if steps < cfg["min_steps"]:
        return finish(TrialState.PRUNED, reason=f"width {cand.width} gets only {steps} steps of {per_step:.3g} FLOPs "
                                                 f"within the allowance (minimum {cfg['min_steps']})")
    seed = int(cfg["seed"])
    first = retry_of(st, trial)
    ckpt = checkpoint_path(ctx.folder, lv.index, trial.number if first is None else first)
    start = 0
    if first is not None:
        start = train.checkpoint_step(ckpt, train.checkpoint_key(task, spec, cand.width, lv.allowance, seed))
    need = (steps - start) * per_step  # a retry pays only for what its checkpoint leaves
    every = max(int(cfg["checkpoint_steps"]), math.ceil(steps / max(1, int(cfg["checkpoints"] or 1))), 1)
    bound = min(steps - start, every) * per_step
    # Charged as if its worker died now (overwritten when it finishes): the mirror of the ledger's bound.
    trial.set_user_attr("train_flops", bound)
    trial.set_user_attr("record", {**attrs, "train_flops": bound, "reason": "lost: its worker stopped during "
                                   "training; charged the FLOPs it may have spent, retried with the same parameters"})
    why = ledger.reserve(tid, lv.index, need, None if first is not None else lv.trials, bound)
    if why.startswith("budget"):
        left = ledger.budget - ledger.spent()
        return finish(TrialState.PRUNED, train_flops=0,
                      reason=f"allowance {need:.3g} does not fit the {left:.3g} FLOPs left in the budget")
    if why:
        return finish(TrialState.PRUNED, train_flops=0, reason=f"{why.split(': ', 1)[1]} (other workers took them)")

    def on_bound(flops: int) -> None:  # before the run spends them (a lost trial's row shows the ledger's charge)
        if not ledger.raise_bound(tid, flops - start * per_step):
            raise TrialLost(f"trial {trial.number} was taken for dead by another worker")

    rep.trial_start(lv, cand.label, steps)
    try:
        r = train.run(task, spec, cand.width, lv.allowance, seed=seed, device=cfg["device"], callback=rep.trial_step,
                      checkpoint=ckpt, checkpoint_every=every, on_bound=on_bound)
    except TrialLost:  # charged its bound already, retried elsewhere: spend nothing more
        log.warning("trial %s was taken for dead by another worker; stopped", trial.number)
        return {**attrs, "state": "FAIL", "loss": "", "reason": "failed by another worker (late heartbeat)"}
    except Exception as e:  # a crash in one candidate must not lose the study
        log.exception("trial %s failed", trial.number)
        ledger.settle(tid, need)  # unknown spend: charged everything it reserved
        return finish(TrialState.FAIL, train_flops=need, reason=f"crashed: {type(e).__name__}: {e}")
    spent = r.train_flops - r.resumed_step * per_step
    note = "" if first is None else f"retry of trial {first}, resumed from step {r.resumed_step} of {steps}"
    attrs.update(train_flops=spent, steps=r.steps, params=r.params, seconds=round(r.seconds, 3),
                 curve=[list(p) for p in r.curve], reason=note)
    ledger.settle(tid, spent)
    if os.path.exists(ckpt):
        os.remove(ckpt)
    if r.diverged:
        return finish(TrialState.FAIL, reason=f"diverged: {r.reason}" + (f"; {note}" if note else ""), loss="")
    attrs["loss"] = r.loss
    return finish(TrialState.COMPLETE, r.loss)
