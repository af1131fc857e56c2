"""What a study writes: study.json (settings) and trials.csv (one row per trial), each written atomically."""

from __future__ import annotations

import csv
import json
import os

from .families import legacy_columns

CONFIRM = 1000  # level i's confirmation runs: Optuna study <study>.L<CONFIRM + i>, ledger level CONFIRM + i

COLUMNS = [
    "number",
    "level",
    "trial",
    "state",
    "train_flops",
    "allowance",
    "family",
    "structure",
    *legacy_columns(),  # the built-in families' own: theta's entries, blocks, rank, experts, active
    "width",
    "steps",
    "params",
    "omega",
    "psi",
    "nu",
    "loss",
    "seconds",
    "reason",
    "rejected",  # why a trial was not trained (search.outcomes.Rejected), empty for a trained one
    "duplicate_of",  # the trial a duplicate repeats
    "family_params",  # the family's arguments as a JSON object (any family, built-in or the user's)
    "group",  # the family's report group for this structure (search.families)
    "phase",  # explore, or confirm (search.confirm: the width sweep and the fresh seeds of the confirmed structures)
    "seed",  # the training seed
]


def temp_path(path: str) -> str:
    """Where to write ``path`` before renaming it: ``<path>.tmp<pid>.<machine>``, so that a temporary file left by a
    killed process can be told from one being written (search.recovery.clean_folder removes the former)."""
    from .recovery import temp_suffix

    return path + temp_suffix()


def write_atomic(path: str, text: str) -> None:
    from . import faults

    tmp = temp_path(path)
    with open(tmp, "w", newline="") as f:
        f.write(text)
    faults.point("before_rename")
    os.replace(tmp, path)


def write_json(path: str, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_trials(level_studies) -> list[tuple[int, list]]:
    """Every level study's trials as the storage holds them now: [(level, [FrozenTrial])], one read per study."""
    return [(level, study.get_trials(deepcopy=False)) for level, study in level_studies]


class TrialReader:
    """read_trials for a search that reads its level studies again and again (after every trial): one query of the
    storage's trial counts (search.optuna_api.trial_marks), then only the studies that may have changed since this
    reader last read them; a study kept from the last read had no RUNNING trial then and the same marks now, so it
    holds exactly the trials it held (what a read now would give)."""

    def __init__(self, engine):
        self.engine = engine
        self._kept: dict[int, tuple] = {}  # study id -> (its marks before the read, its trials)

    def read(self, level_studies) -> list[tuple[int, list]]:
        from optuna.trial import TrialState

        from . import optuna_api

        ids = [optuna_api.study_id(study) for _, study in level_studies]
        marks = optuna_api.trial_marks(self.engine, ids)  # first the marks, then the trials: never newer marks
        out = []
        for (level, study), sid in zip(level_studies, ids):
            kept = self._kept.get(sid)
            if kept is not None and kept[0] == marks[sid]:
                trials = kept[1]
            else:
                trials = study.get_trials(deepcopy=False)
                if any(t.state == TrialState.RUNNING for t in trials):
                    self._kept.pop(sid, None)  # its attributes may change while it runs
                else:
                    self._kept[sid] = (marks[sid], trials)
            out.append((level, list(trials)))
        return out


def trial_rows(level_trials, charges: dict | None = None) -> list[dict]:
    """One row per trial over all levels (level-major), from what the storage holds (``level_trials``, as
    read_trials reads it).

    ``charges`` (Optuna trial id -> FLOPs, from the budget ledger) gives every trial's train_flops: what the
    ledger charged it (a running trial: what it may have spent so far); a trial without a reservation spent
    nothing. So trials.csv and the ledger always agree. Without ``charges``, the trials' own records count.
    """
    from .optuna_api import trial_id

    rows = []
    for level, trials in level_trials:
        for t in trials:
            if t.state.name == "WAITING":
                continue  # enqueued: not a trial yet
            if t.state.name == "RUNNING" and (
                trial_id(t) not in charges if charges is not None else "train_flops" not in t.user_attrs
            ):
                continue  # in progress and not yet charged
            a = {**t.user_attrs.get("record", {}), **t.user_attrs}
            row = {k: a.get(k, "") for k in COLUMNS}
            row.update(
                level=level % CONFIRM,
                trial=t.number,
                state=t.state.name,
                train_flops=int(a.get("train_flops", 0)),
                phase="confirm" if level >= CONFIRM else "explore",
            )
            if charges is not None:
                row["train_flops"] = int(charges.get(trial_id(t), 0))
            row["loss"] = t.value if t.value is not None else a.get("loss", "")
            rows.append(row)
    for i, r in enumerate(rows):
        r["number"] = i
    return rows


def write_trials_csv(path: str, rows: list[dict]) -> None:
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_atomic(path, buf.getvalue())


def read_trials_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
