"""What a study writes: study.json (settings) and trials.csv (one row per trial), each written atomically."""

from __future__ import annotations

import csv
import json
import os

from .space import THETA_KEYS

COLUMNS = ["number", "level", "trial", "state", "train_flops", "allowance", "family", "structure", *THETA_KEYS,
           "blocks", "rank", "experts", "active", "width",
           "steps", "params", "omega", "psi", "nu", "loss", "seconds", "reason"]


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def trial_rows(level_studies, charges: dict | None = None) -> list[dict]:
    """One row per trial over all levels (level-major), from what the storage holds.

    ``charges`` (Optuna trial id -> FLOPs) overrides train_flops: what the budget ledger charged a trial
    whose worker died or that is still running.
    """
    rows = []
    for level, study in level_studies:
        for t in study.get_trials(deepcopy=False):
            if t.state.name == "WAITING" or (t.state.name == "RUNNING" and "train_flops" not in t.user_attrs):
                continue  # enqueued, or in progress and not yet charged: not a trial yet
            a = {**t.user_attrs.get("record", {}), **t.user_attrs}
            row = {k: a.get(k, "") for k in COLUMNS}
            row.update(level=level, trial=t.number, state=t.state.name, train_flops=int(a.get("train_flops", 0)))
            if charges and t._trial_id in charges:
                row["train_flops"] = int(charges[t._trial_id])
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
