"""The search loop: per compute level, an Optuna study proposes candidates, which are trained for exactly
the level's FLOP allowance; invalid or unaffordable ones are rejected at zero cost with a reason.

Each level is its own Optuna study (``<study>.L<i>``) in one storage, because losses at different
compute are not comparable for a sampler. Reference structures are enqueued first at every level.
Re-running with the same study name resumes: finished trials stay, the budget counts what was spent,
and a trial left RUNNING by a killed process is failed and charged its full allowance.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import dataclass, field

import einstruct as es

from . import outputs, train
from . import space as space_mod
from .budget import Level, plan_levels
from .errors import SearchError
from .storage import check_study_name, check_url, default_url, open_storage, redact, study_dir
from .tasks import get as get_task

log = logging.getLogger(__name__)

DEFAULTS = {
    "task": "regression", "data": None, "budget": 1.5e11, "levels": 3, "ratio": 3.0, "top_trials": 7,
    "sampler": "tpe", "seed": 0, "space": "full", "min_steps": 20, "target_steps": 100, "device": "auto",
    "task_settings": {},
}
KEYED = ("task", "data", "budget", "levels", "ratio", "top_trials", "sampler", "seed", "space", "min_steps",
         "target_steps", "task_settings")  # must match when a study is resumed
SAMPLERS = ("tpe", "random", "qmc", "cmaes", "gp")


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

    def rows(self) -> list[dict]:
        return outputs.trial_rows(self.studies)

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
        "tpe": lambda: s.TPESampler(multivariate=True, group=True, seed=seed),
        "random": lambda: s.RandomSampler(seed=seed),
        "qmc": lambda: s.QMCSampler(seed=seed, warn_independent_sampling=False),
        "cmaes": lambda: s.CmaEsSampler(seed=seed, warn_independent_sampling=False),
        "gp": lambda: s.GPSampler(seed=seed),
    }
    if name not in makers:
        raise SearchError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    import warnings

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

        with open(path) as f:
            stored = json.load(f).get("settings", {})
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
    """Throughput of real steps (dense and BTT at a middle width) and the fixed cost of a trial."""
    w = sorted(widths)[len(widths) // 2]
    rates = []
    for spec in (None, es.presets.btt(rank=1)):
        _, per_step = train.plan(task, spec, w, 1.0)
        train.run(task, spec, w, train_flops=per_step, seed=0, device=device, evals=1)  # warm-up
        r = train.run(task, spec, w, train_flops=per_step * 8, seed=0, device=device, evals=1)
        rates.append(r.train_flops / max(r.seconds, 1e-9))
    t0 = time.perf_counter()
    _, per_step = train.plan(task, None, w, 1.0)
    train.run(task, None, w, train_flops=per_step, seed=0, device=device, evals=1)
    overhead = time.perf_counter() - t0  # build, groups, one step, one evaluation
    return {"flops_per_second": min(rates), "seconds_per_trial": overhead, "probe_width": w}


def run_search(study: str = "default", *, storage: str | None = None, out: str | None = None,
               dry_run: bool = False, reporter: Reporter | None = None, **given) -> SearchStudy:
    """Run (or resume) a budgeted structure search; returns the SearchStudy. See search.run for settings."""
    import optuna

    name = check_study_name(study)
    folder = study_dir(name, out)
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
        check_url(storage)
    task.prepare(int(cfg["seed"]))
    est = probe(task, task.widths, cfg["device"])
    trials = sum(lv.trials for lv in levels)
    est["seconds"] = float(cfg["budget"]) / est["flops_per_second"] + trials * est["seconds_per_trial"]
    result = SearchStudy(name, folder, cfg, levels, estimate=est)
    rep.plan({"study": name, "folder": folder, "settings": cfg, "levels": levels, "estimate": est,
              "references": [r.label for r in refs], "dry_run": dry_run})
    if dry_run:
        return result

    os.makedirs(folder, exist_ok=True)
    url = storage or default_url(folder)
    store = open_storage(url)
    meta = {"settings": cfg, "storage": redact(url) if storage else "default (study.db in this folder)",
            "levels": [{"index": lv.index, "allowance": lv.allowance, "trials": lv.trials} for lv in levels],
            "version": es.__version__}
    outputs.write_json(os.path.join(folder, "study.json"), meta)
    csv_path = os.path.join(folder, "trials.csv")
    budget = float(cfg["budget"])
    seed = int(cfg["seed"])
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    for lv in levels:
        st = optuna.create_study(study_name=f"{name}.L{lv.index}", storage=store, direction="minimize",
                                 sampler=make_sampler(cfg["sampler"], seed * 1000 + lv.index), load_if_exists=True)
        result.studies.append((lv.index, st))
        _fail_interrupted(st, lv)
        if not st.user_attrs.get("references_enqueued"):
            for ref in refs:
                w = reference_width(task, ref.spec(), task.widths, lv.allowance, cfg["min_steps"], cfg["target_steps"])
                cand = space_mod.Candidate(ref.family, w, ref.theta, ref.blocks, ref.rank)
                st.enqueue_trial(search_space.params_for(cand), user_attrs={"reference": True})
            st.set_user_attr("references_enqueued", True)
        rep.level_start(lv, _trained(st))
        rows = result.rows()
        explore = random.Random(seed * 1000 + lv.index)
        while _trained(st) < lv.trials and len(st.trials) < 5 * lv.trials + len(refs):
            trial = st.ask()
            cand = search_space.suggest(trial)
            row = _evaluate(trial, st, cand, lv, task, cfg, budget - _spent(rows), rep)
            if str(row.get("reason", "")).startswith("same as trial"):  # the sampler is stuck on a point: explore once
                st.enqueue_trial(search_space.random_params(explore), user_attrs={"exploration": True})
            rows = result.rows()
            outputs.write_trials_csv(csv_path, rows)
            done = [float(r["loss"]) for r in rows if r["level"] == lv.index and r["state"] == "COMPLETE"]
            rep.trial_end(row, _spent(rows), min(done) if done else None)
    outputs.write_trials_csv(csv_path, result.rows())
    meta["spent"] = result.spent
    outputs.write_json(os.path.join(folder, "study.json"), meta)
    return result


def _trained(st) -> int:
    """Trials that spent compute (COMPLETE, or FAIL after training); zero-cost rejections do not count."""
    return sum(1 for t in st.get_trials(deepcopy=False) if t.user_attrs.get("train_flops", 0) > 0)


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


def _fail_interrupted(st, lv: Level) -> None:
    from optuna.trial import TrialState

    for t in st.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        tid = t._trial_id
        st._storage.set_trial_user_attr(tid, "train_flops", int(lv.allowance))  # charged in full: unknown spend
        rec = {"level": lv.index, "allowance": int(lv.allowance), "train_flops": int(lv.allowance),
               "reason": "interrupted (its process stopped); charged its allowance"}
        st._storage.set_trial_user_attr(tid, "record", rec)
        st._storage.set_trial_state_values(tid, TrialState.FAIL)


def _evaluate(trial, st, cand, lv: Level, task, cfg: dict, remaining: float, rep: Reporter) -> dict:
    from optuna.trial import TrialState

    attrs = {"level": lv.index, "allowance": int(lv.allowance), "train_flops": 0, **cand.columns()}

    def finish(state, value=None, **more):
        attrs.update(more)
        trial.set_user_attr("train_flops", attrs["train_flops"])  # read alone by the budget and resume logic
        trial.set_user_attr("record", attrs)  # the rest in one write
        st.tell(trial, value, state=state) if state != TrialState.COMPLETE else st.tell(trial, value)
        return {**attrs, "state": state.name, "loss": value if value is not None else attrs.get("loss", "")}

    twin = _twin(st, trial, cand)
    if twin is not None:  # the same point again (common with categorical widths): reuse, spend nothing
        rec = twin.user_attrs.get("record", {})
        attrs.update({k: rec.get(k, "") for k in ("steps", "params", "omega", "psi", "nu", "seconds")})
        return finish(TrialState.COMPLETE, twin.value, reason=f"same as trial {twin.number}: not retrained")
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
    if lv.allowance > remaining:
        return finish(TrialState.PRUNED, reason=f"allowance {lv.allowance:.3g} does not fit the {remaining:.3g} "
                                                 "FLOPs left in the budget")
    rep.trial_start(lv, cand.label, steps)
    try:
        r = train.run(task, spec, cand.width, lv.allowance, seed=int(cfg["seed"]), device=cfg["device"],
                      callback=rep.trial_step)
    except Exception as e:  # a crash in one candidate must not lose the study
        log.exception("trial %s failed", trial.number)
        return finish(TrialState.FAIL, train_flops=int(lv.allowance), reason=f"crashed: {type(e).__name__}: {e}")
    attrs.update(train_flops=r.train_flops, steps=r.steps, params=r.params, seconds=round(r.seconds, 3),
                 curve=[list(p) for p in r.curve])
    if r.diverged:
        return finish(TrialState.FAIL, reason=f"diverged: {r.reason}", loss="")
    attrs["loss"] = r.loss
    return finish(TrialState.COMPLETE, r.loss)
