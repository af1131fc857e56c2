"""`python -m search.report`: frontiers, fitted laws, compute multipliers, plots and report.md of a stored study.

    python -m search.report --study default            # runs/default/ -> runs/default/report.md and PNGs
    python -m search.report --study s --out /tmp/copy  # a study kept (or copied) elsewhere

It reads only what a study stores: trials.csv and study.json, plus each trial's held-out loss curve from
the default SQLite storage (study.db) when that file is there; without it, each trained trial gives one
point (its final loss). So it works on a finished, a running or a copied study. It writes, into the
study's folder, report.md and three PNG plots: loss_vs_compute.png, taxonomy.png and history.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field

from einstruct import rules
from einstruct.cli import closed_pipe, run_command

from . import frontier as fr
from . import verdict as verdict_md
from .errors import SearchError
from .families.theta import KEYS as THETA
from .outputs import write_atomic
from .storage import redact

PLOTS = {"frontier": "loss_vs_compute.png", "taxonomy": "taxonomy.png", "history": "history.png"}
REQUIRED = ("number", "level", "trial", "state", "train_flops", "family", "structure", "width", "loss")
INTS = ("number", "level", "trial", "train_flops", "width", "steps", "params", "blocks", "rank", "seed")
FLOATS = ("allowance", "omega", "psi", "nu", "loss", "seconds", *THETA)  # theta's entries: search.families.theta
MACS = rules.TRAIN_FLOPS_PER_MAC  # training FLOPs ~ 6 x forward MACs x examples (forward 2, backward 4 per MAC)
TOP_TABLES = 3  # winning structures shown with their einstruct tables
FLOOR_POINTS, FLOOR_SPAN = 5, 10.0  # a floor fit needs 5 frontier computes spanning a factor of 10


# ---------------------------------------------------------------- reading a study


@dataclass(frozen=True)
class Study:
    """What is stored about a study: its settings (study.json), rows (trials.csv) and loss curves."""

    name: str
    folder: str
    meta: dict  # study.json ({} when it is missing)
    rows: tuple[dict, ...]  # typed trials.csv rows; absent numbers are nan (floats) or None (integers)
    curves: dict  # (level, trial) -> ((train_flops, loss), ...)
    curve_note: str  # where the points come from, for the report
    families: dict = field(default_factory=dict)  # the study's own families (a user space), by name
    space_note: str = ""  # why the study's space could not be read, if it could not

    def group(self, row: dict) -> str:
        """The row's report group (search.families: the family's group, or theta's named point)."""
        return fr.group_of(row, self.families)

    @property
    def settings(self) -> dict:
        return self.meta.get("settings", {})

    def trained(self) -> list[dict]:
        """COMPLETE exploration trials that were trained (duplicates, which spent 0 FLOPs, are left out; the
        confirmation runs are the verdict's, search.confirm)."""
        return [
            r
            for r in self.rows
            if r["state"] == "COMPLETE"
            and r["train_flops"] > 0
            and _finite(r["loss"])
            and (r.get("phase") or "explore") == "explore"
        ]


def _duplicate(row: dict) -> bool:
    """A trial that repeated a trained candidate of its level (0 FLOPs; PRUNED, or COMPLETE in older studies)."""
    from .outcomes import duplicate_of

    return row["train_flops"] == 0 and duplicate_of(row) is not None


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _parse_rows(path: str) -> tuple[dict, ...]:
    import csv

    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            raw = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SearchError(f"cannot read {path}: {e}") from None
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise SearchError(f"{path} is not a trials.csv written by search.run: column(s) {', '.join(missing)} missing")
    rows = []
    for line, r in enumerate(raw, start=2):
        if None in r or any(v is None for v in r.values()):
            raise SearchError(f"{path} line {line}: {len(header)} columns expected, the row has another count")
        out = {k: (v or "").strip() for k, v in r.items()}
        for k in INTS + FLOATS:
            v = out.get(k, "")
            if v == "":
                out[k] = None if k in INTS else math.nan
                continue
            try:
                x = float(v)
            except ValueError:
                raise SearchError(f"{path} line {line}: column {k} is {v!r}, not a number") from None
            out[k] = int(x) if k in INTS and math.isfinite(x) else x
        for k in ("level", "trial", "number"):
            if out[k] is None:
                raise SearchError(f"{path} line {line}: column {k} is empty")
        out["train_flops"] = out["train_flops"] or 0
        rows.append(out)
    return tuple(rows)


def _read_curves(folder: str, name: str | None, meta: dict) -> tuple[dict, str, str | None]:
    """(curves, note, study name found) from the default SQLite storage, or ({}, why not, None)."""
    db = os.path.join(folder, "study.db")
    storage = meta.get("storage", "")
    if storage and not str(storage).startswith("default"):
        return {}, f"final losses only (the study's storage is {redact(storage)}, not read here)", None
    if not os.path.exists(db):
        return {}, "final losses only (no study.db in the folder)", None
    try:
        import optuna

        st = optuna.storages.RDBStorage("sqlite:///" + db, skip_compatibility_check=True, skip_table_creation=True)
    except Exception as e:  # a damaged or foreign file must not stop the report
        return {}, f"final losses only (study.db could not be opened: {type(e).__name__})", None
    try:
        names = optuna.study.get_all_study_names(st)
        prefixes: dict[str, list[tuple[int, str]]] = {}
        for n in names:
            m = re.match(r"^(.+)\.L(\d+)$", n)
            if m:
                prefixes.setdefault(m.group(1), []).append((int(m.group(2)), n))
        base = os.path.basename(os.path.normpath(folder))
        pick = (
            name
            if name in prefixes
            else base
            if base in prefixes
            else next(iter(prefixes))
            if len(prefixes) == 1
            else None
        )
        if pick is None:
            return (
                {},
                (f"final losses only (study.db holds studies {', '.join(sorted(prefixes)) or 'none'}; give --study)"),
                None,
            )
        curves = {}
        for level, n in prefixes[pick]:
            for t in optuna.load_study(study_name=n, storage=st).get_trials(deepcopy=False):
                curve = t.user_attrs.get("record", {}).get("curve")
                if curve:
                    curves[(level, t.number)] = tuple((float(c), float(v)) for c, v in curve)
    except Exception as e:
        return {}, f"final losses only (study.db could not be read: {type(e).__name__})", None
    finally:
        from .optuna_api import engine

        engine(st).dispose()
    if meta.get("settings", {}).get("schedule", "constant") == "cosine":
        return {}, "final losses only (cosine schedule: intermediate points are not fair, THEORY 8)", pick
    if not curves:
        return {}, "final losses only (the stored trials have no loss curves)", pick
    return curves, "held-out loss curves from study.db (every evaluation of every trained trial)", pick


def load(folder: str, name: str | None = None) -> Study:
    """Read a study folder (trials.csv required, study.json and study.db optional)."""
    folder = os.path.abspath(folder)
    if not os.path.isdir(folder):
        raise SearchError(
            f"no study folder {folder}; run `python -m search.run --study NAME` first, or give the folder with --out"
        )
    csv_path = os.path.join(folder, "trials.csv")
    if not os.path.exists(csv_path):
        raise SearchError(
            f"{folder} has no trials.csv; the study has not finished a trial yet, or this is not a study folder"
        )
    meta = {}
    meta_path = os.path.join(folder, "study.json")
    if os.path.exists(meta_path):
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            raise SearchError(f"{meta_path} is not valid JSON ({e}); restore it or delete it") from None
        if not isinstance(meta, dict):
            raise SearchError(f"{meta_path} does not hold a JSON object; restore it or delete it")
    rows = _parse_rows(csv_path)
    curves, note, found = _read_curves(folder, name, meta)
    families, space_note = _study_families(meta)
    return Study(name or found or os.path.basename(folder), folder, meta, rows, curves, note, families, space_note)


def _study_families(meta: dict) -> tuple[dict, str]:
    """(the study's families by name, '' or why they cannot be read) from the space in its settings."""
    from .families.loader import is_user_space
    from .space import make_space

    space = meta.get("settings", {}).get("space")
    if not isinstance(space, str) or not is_user_space(space):
        return {}, ""
    try:
        return make_space(space, (1,)).by_name(), ""
    except SearchError as e:
        return {}, f"the study's space {space} cannot be read here ({e}); its structures are not rebuilt"


# ---------------------------------------------------------------- analysis


@dataclass(frozen=True)
class Group:
    """One structure group's points, frontier and fitted laws (fits are None when there are too few points)."""

    name: str
    points: tuple  # (train_flops, loss, row)
    frontier: tuple
    fit: fr.PowerLaw | None
    floor_fit: fr.PowerLaw | None
    runs: int  # trained trials behind the points


def points_of(study: Study, rows=None) -> list[tuple[float, float, dict]]:
    """Frontier points of trained rows: each evaluation on the curve when stored, else the final loss."""
    out = []
    for r in study.trained() if rows is None else rows:
        curve = study.curves.get((r["level"], r["trial"]))
        pts = curve if curve else ((r["train_flops"], r["loss"]),)
        out.extend((float(c), float(v), r) for c, v in pts if c > 0 and _finite(v) and v > 0)
    return out


def groups(study: Study) -> list[Group]:
    """One Group per structure group with trained trials, in the families' order (search.families)."""
    from .families import report_groups

    by: dict[str, list[dict]] = {}
    for r in study.trained():
        by.setdefault(study.group(r), []).append(r)
    known = report_groups(study.families.values())
    order = [g for g in known if g in by] + sorted(g for g in by if g not in known)
    out = []
    for g in order:
        pts, seen = [], set()
        for p in points_of(study, by[g]):  # a deterministic retrain repeats a point exactly: count it once
            if (p[0], p[1]) not in seen:
                seen.add((p[0], p[1]))
                pts.append(p)
        front = fr.pareto_frontier(pts)
        fit = floor = None
        try:
            fit = fr.fit_power_law(front)
        except SearchError:
            pass
        computes = {p[0] for p in front}
        if len(computes) >= FLOOR_POINTS and max(computes) >= FLOOR_SPAN * min(computes):
            try:
                floor = fr.fit_power_law(front, floor=True)
            except SearchError:
                pass
        out.append(Group(g, tuple(pts), tuple(front), fit, floor, len(by[g])))
    return out


def multiplier_losses(dense: fr.PowerLaw, n: int = 3) -> list[float]:
    """Losses at which multipliers are tabulated: spread geometrically over dense's frontier losses."""
    lo, hi = dense.loss_range
    if hi <= lo:
        return [lo]
    return [hi * (lo / hi) ** (k / (n - 1)) for k in range(n)]


# ---------------------------------------------------------------- plots

COLOURS = {
    "dense": "#000000",
    "low rank": "#1f77b4",
    "Kronecker": "#ff7f0e",
    "Tensor-Train": "#2ca02c",
    "Monarch": "#9467bd",
    "BTT": "#d62728",
    "theta": "#7f7f7f",
}


def _figure(w=7.0, h=5.0, rows=1):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise SearchError("the report needs matplotlib: pip install matplotlib") from None
    fig = Figure(figsize=(w, h), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)  # Agg, without touching pyplot's global state
    return fig


def _save(fig, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)


def _macs_axis(ax) -> None:
    top = ax.secondary_xaxis("top", functions=(lambda c: c / MACS, lambda m: m * MACS))
    top.set_xlabel("forward MACs × examples (≈ training FLOPs / 6)")


def plot_frontiers(study: Study, gs: list[Group], path: str) -> None:
    import numpy as np

    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for k, g in enumerate(gs):
        colour = COLOURS.get(g.name, f"C{k % 10}")
        c = [p[0] for p in g.points]
        loss = [p[1] for p in g.points]
        ax.scatter(c, loss, s=8, color=colour, alpha=0.25, linewidths=0)
        fc = [p[0] for p in g.frontier]
        fl = [p[1] for p in g.frontier]
        label = g.name if g.fit is None else f"{g.name}: a = {g.fit.a:.3g} ± {_se(g.fit.a_se)}"
        ax.plot(fc, fl, "o-", color=colour, markersize=4, linewidth=0.8, label=label)
        if g.fit is not None:
            lo, hi = g.fit.compute_range
            xs = np.geomspace(lo, hi, 50)
            ax.plot(xs, g.fit.predict(xs), "--", color=colour, linewidth=1.2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("held-out loss")
    _macs_axis(ax)
    ax.set_title(
        "Loss vs compute: all points (faint), frontier (dots) and fitted L = e^b C^-a (dashed)", fontsize=10, pad=36
    )
    ax.grid(True, which="both", alpha=0.3)
    if gs:
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no trained trials yet", ha="center", va="center", transform=ax.transAxes)
    _save(fig, path)


def top_level(study: Study) -> int | None:
    levels = [r["level"] for r in study.trained()]
    return max(levels) if levels else None


def plot_taxonomy(study: Study, path: str) -> dict:
    """Draw taxonomy.png; returns what it drew: ``points`` (structure, group, omega, psi, nu, loss of each
    marker, read back from the plot) and ``annotations`` (the labels written next to them)."""
    from matplotlib.colors import LogNorm

    fig = _figure(6.5, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    top = top_level(study)
    best: dict[str, dict] = {}
    for r in study.trained():
        if r["level"] == top and all(_finite(r[k]) for k in ("omega", "psi", "nu")):
            if r["structure"] not in best or r["loss"] < best[r["structure"]]["loss"]:
                best[r["structure"]] = r
    rows = sorted(best.values(), key=lambda r: -r["loss"])  # best drawn last, on top
    if rows:
        losses = [r["loss"] for r in rows]
        norm = LogNorm(min(losses), max(losses)) if max(losses) > min(losses) else None
        sc = ax.scatter(
            [r["omega"] for r in rows],
            [r["psi"] for r in rows],
            c=losses,
            norm=norm,
            cmap="viridis_r",
            s=[30 + 120 * r["nu"] for r in rows],
            edgecolors="k",
            linewidths=0.5,
            alpha=0.85,
        )
        fig.colorbar(sc, ax=ax, label=f"best held-out loss at level {top}")
        for r in _annotated(study, rows):
            ax.annotate(study.group(r), (r["omega"], r["psi"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
        for nu in (0.5, 1.0, 1.5):
            ax.scatter([], [], s=30 + 120 * nu, color="none", edgecolors="k", label=f"nu = {nu:g}")
        ax.legend(fontsize=7, loc="lower left", title="size", title_fontsize=7)
    else:
        ax.text(0.5, 0.5, "no trained trials yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("omega (parameter sharing)")
    ax.set_ylabel("psi (rank exponent)")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.grid(True, alpha=0.3)
    ax.set_title("Taxonomy: colour = loss at the top compute level, size = nu", fontsize=10)
    _save(fig, path)
    drawn = [tuple(map(float, xy)) for xy in sc.get_offsets()] if rows else []
    return {
        "points": [
            {
                "structure": r["structure"],
                "family": r["family"],
                "group": study.group(r),
                "omega": x,
                "psi": y,
                "nu": r["nu"],
                "loss": r["loss"],
            }
            for r, (x, y) in zip(rows, drawn)
        ],
        "annotations": [t.get_text() for t in ax.texts if t.get_text() != "no trained trials yet"],
    }


def _annotated(study: Study, rows: list[dict]) -> list[dict]:
    """The points labelled with their group: all, except that the catch-all group of a continuous family (a cloud
    of points, such as "theta") is labelled once, at its best point (``rows`` are best last)."""
    from .families import BUILTIN, Family

    out, cloud = [], set()
    for r in reversed(rows):
        fam = study.families.get(r["family"]) or BUILTIN.get(r["family"])
        g = study.group(r)
        if fam is not None and fam.continuous and g == Family.group_of(fam, {}):
            if g in cloud:
                continue
            cloud.add(g)
        out.append(r)
    return out


def plot_history(study: Study, path: str) -> None:
    import numpy as np

    fig = _figure(7.0, 6.0)
    ax, ax2 = fig.subplots(2, 1, sharex=True)
    levels = sorted({r["level"] for r in study.rows})
    for lv in levels:
        rows = [r for r in study.trained() if r["level"] == lv]
        if not rows:
            continue
        x = [r["number"] for r in rows]
        y = [r["loss"] for r in rows]
        ax.scatter(x, y, s=10, color=f"C{lv % 10}", label=f"level {lv}")
        ax.step(x, np.minimum.accumulate(y), where="post", color=f"C{lv % 10}", linewidth=1)
    ax.set_yscale("log")
    ax.set_ylabel("held-out loss")
    ax.set_title("Search history: loss by trial (line: best so far per level)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if study.trained():
        ax.legend(fontsize=8)
    rows = sorted(study.rows, key=lambda r: r["number"])
    ax2.plot([r["number"] for r in rows], np.cumsum([r["train_flops"] for r in rows]), color="k", label="spent")
    budget = study.settings.get("budget")
    if _finite(budget):
        ax2.axhline(float(budget), color="r", linestyle="--", linewidth=1, label="budget")
    ax2.set_xlabel("trial number (all levels)")
    ax2.set_ylabel("cumulative training FLOPs")
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=8)
    _save(fig, path)


# ---------------------------------------------------------------- report.md


def _g(v, digits: int = 4) -> str:
    return f"{v:.{digits}g}" if _finite(v) else "—"


def _se(v) -> str:
    return f"{v:.2g}" if _finite(v) else "—"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return out + [""]


def candidate_of(row: dict, families: dict | None = None):
    """The search.families.Candidate of a trials.csv row (``families``: the study's own, by name)."""
    from .families import Candidate

    return Candidate.from_row(row, families)


def structure_table(row: dict, families: dict | None = None) -> str:
    """The einstruct table of a row's structure at its width (or why it cannot be built)."""
    import einstruct as es

    try:
        return es.compile(candidate_of(row, families).structure_spec(), int(row["width"])).table()
    except (es.SpecError, SearchError, ValueError, TypeError) as e:
        return f"(cannot rebuild this structure: {e})"


def _settings_section(study: Study) -> list[str]:
    out = ["## Settings", ""]
    s = study.settings
    if not s:
        return [*out, "study.json is missing: the settings are unknown.", ""]
    from .settings import described

    rows = [[f"`{k}`", f"`{json.dumps(v)}`", what] for k, v, what in described(s)]
    rows.append(["`storage`", f"`{redact(study.meta.get('storage', ''))}`", ""])  # redacted already; older files too
    if "version" in study.meta:
        rows.append(["`einstruct version`", f"`{study.meta['version']}`", ""])
    return out + _table(["setting", "value", "meaning"], rows)


def _budget_section(study: Study) -> list[str]:
    spent = sum(r["train_flops"] for r in study.rows)
    budget = study.settings.get("budget")
    out = ["## Budget", ""]
    if _finite(budget) and budget > 0:
        out.append(
            f"Spent **{spent:.4g}** of {budget:.4g} training FLOPs ({100 * spent / budget:.1f}%), i.e. "
            f"{spent / MACS:.4g} of {budget / MACS:.4g} forward MACs × examples."
        )
    else:
        out.append(
            f"Spent **{spent:.4g}** training FLOPs ({spent / MACS:.4g} forward MACs × examples); the budget is unknown."
        )
    out.append("")
    planned = {lv["index"]: lv for lv in study.meta.get("levels", []) if isinstance(lv, dict) and "index" in lv}
    head = [
        "level",
        "allowance (training FLOPs)",
        "allowance (fwd MACs × examples)",
        "planned",
        "trained",
        "duplicates",
        "pruned",
        "failed",
        "spent",
        "best loss",
        "best structure",
    ]
    body = []
    for lv in sorted({r["level"] for r in study.rows} | set(planned)):
        rows = [r for r in study.rows if r["level"] == lv]
        trained = [r for r in rows if r["state"] == "COMPLETE" and r["train_flops"] > 0 and _finite(r["loss"])]
        allowance = planned.get(lv, {}).get("allowance")
        if not _finite(allowance):
            allowance = next((r["allowance"] for r in rows if _finite(r["allowance"])), math.nan)
        b = min(trained, key=lambda r: r["loss"]) if trained else None
        body.append(
            [
                str(lv),
                _g(allowance),
                _g(allowance / MACS) if _finite(allowance) else "—",
                str(planned.get(lv, {}).get("trials", "—")),
                str(len(trained)),
                str(sum(1 for r in rows if _duplicate(r))),
                str(sum(1 for r in rows if r["state"] == "PRUNED" and not _duplicate(r))),
                str(sum(1 for r in rows if r["state"] == "FAIL")),
                _g(sum(r["train_flops"] for r in rows)),
                _g(b["loss"]) if b else "—",
                f"`{b['structure']}` at width {b['width']}" if b else "—",
            ]
        )
    return out + _table(head, body)


def _winners_section(study: Study) -> list[str]:
    out = ["## Winning structures", ""]
    top = top_level(study)
    if top is None:
        return [*out, "No trained trials yet.", ""]
    rows = sorted((r for r in study.trained() if r["level"] == top), key=lambda r: r["loss"])
    seen, pick = set(), []
    for r in rows:
        if r["structure"] not in seen:
            seen.add(r["structure"])
            pick.append(r)
        if len(pick) == TOP_TABLES:
            break
    out += [
        f"The best {len(pick)} distinct structures at the top level ({top}), each at the width it was trained at:",
        "",
    ]
    for k, r in enumerate(pick, 1):
        out += [
            f"### {k}. `{r['structure']}` (group {study.group(r)}), width {r['width']}: loss {_g(r['loss'])}",
            "",
            f"Trial {r['number']} (level {r['level']}, Optuna trial {r['trial']}); {_g(r['train_flops'])} "
            f"training FLOPs, {r['steps'] if r['steps'] is not None else '—'} steps, "
            f"{r['params'] if r['params'] is not None else '—'} parameters; "
            f"omega {_g(r['omega'], 3)}, psi {_g(r['psi'], 3)}, nu {_g(r['nu'], 3)}.",
            "",
            "```text",
            structure_table(r, study.families).rstrip("\n"),
            "```",
            "",
        ]
    return out


def _frontier_section(gs: list[Group]) -> list[str]:
    out = [
        "## Frontiers and scaling laws",
        "",
        "Exploration runs, one seed, pooled per family-level group: each group's envelope is the best of its "
        "structures' runs, so it is selection-biased (more runs give a lower envelope by noise alone); the "
        "verdict above is read on confirmation runs per structure instead.",
        "",
        f"![Loss vs training FLOPs per group, with frontiers and fitted laws]({PLOTS['frontier']})",
        "",
        "Per group: the compute-loss Pareto frontier (lower convex hull in log-log plus points within 2% of it) "
        "and the least-squares law L = e^b C^-a fitted to it in log-log, with standard errors. The exponent a "
        "is the same on both compute axes; b is given for C = training FLOPs and for C = forward MACs × "
        "examples (b - a ln 6). The floor fit L = L0 + e^b C^-a (scipy curve_fit) is tried when the frontier has "
        f"{FLOOR_POINTS} or more computes spanning a factor of {FLOOR_SPAN:g} or more.",
        "",
    ]
    head = [
        "group",
        "runs",
        "points",
        "frontier",
        "a ± SE",
        "b ± SE (FLOPs)",
        "b (MACs × ex.)",
        "rms log L",
        "floor fit: L0 ± SE, a ± SE",
        "compute range (training FLOPs)",
    ]
    body = []
    for g in gs:
        f, fl = g.fit, g.floor_fit
        body.append(
            [
                g.name,
                str(g.runs),
                str(len(g.points)),
                str(len(g.frontier)),
                f"{_g(f.a, 3)} ± {_se(f.a_se)}" if f else "—",
                f"{_g(f.b, 4)} ± {_se(f.b_se)}" if f else "—",
                _g(f.shifted(MACS).b, 4) if f else "—",
                _g(f.rms, 2) if f else "—",
                f"{_g(fl.L0, 3)} ± {_se(fl.L0_se)}, {_g(fl.a, 3)} ± {_se(fl.a_se)}" if fl else "—",
                f"{_g(f.compute_range[0], 3)} – {_g(f.compute_range[1], 3)}" if f else "—",
            ]
        )
    if not body:
        return [*out, "No trained trials yet.", ""]
    return out + _table(head, body)


def _multiplier_section(gs: list[Group]) -> list[str]:
    out = ["## Compute multipliers vs dense", ""]
    dense = next((g.fit for g in gs if g.name == "dense" and g.fit is not None), None)
    others = [g for g in gs if g.name != "dense" and g.fit is not None]
    if dense is None:
        return [*out, "No fitted dense law (dense needs frontier points at 2 or more computes), so no multipliers.", ""]
    if not others:
        return [*out, "No other group has a fitted law yet.", ""]
    losses = multiplier_losses(dense)
    out += [
        "C_dense(L) / C_group(L) from the fitted laws (THEORY 8): above 1, the group reaches loss L with that "
        "many times less compute than dense. Ratios are the same in training FLOPs and in forward MACs × "
        "examples. Losses span dense's frontier; * marks a loss outside the group's own frontier losses "
        "(extrapolated).",
        "",
    ]
    head = ["group", "a ± SE", *[f"at L = {_g(v, 3)}" for v in losses]]
    body = []
    for g in others:
        ms = fr.multipliers(g.fit, dense, losses)
        body.append(
            [
                g.name,
                f"{_g(g.fit.a, 3)} ± {_se(g.fit.a_se)}",
                *[_g(m.value, 3) + ("*" if m.extrapolated and _finite(m.value) else "") for m in ms],
            ]
        )
    dense_row = ["dense (reference)", f"{_g(dense.a, 3)} ± {_se(dense.a_se)}", *["1" for _ in losses]]
    return out + _table(head, [dense_row, *body])


def render(study: Study, gs: list[Group]) -> str:
    """report.md's text."""
    states = {}
    for r in study.rows:
        states[r["state"]] = states.get(r["state"], 0) + 1
    counts = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
    lines = [
        f"# Structure search report: {study.name}",
        "",
        f"Study folder `{_shown(study.folder)}`; {len(study.rows)} trials ({counts or 'none'}); "
        f"{len(study.trained())} trained. Frontier points: {study.curve_note}.",
        "",
    ]
    has = bool(study.meta.get("confirmation"))
    lines += [*verdict_md.markdown(verdict_of(study)).splitlines(), ""] if has else _no_verdict()
    lines += _settings_section(study)
    lines += _budget_section(study)
    lines += _winners_section(study)
    lines += _frontier_section(gs)
    lines += _multiplier_section(gs)
    top = top_level(study)
    lines += [
        "## Taxonomy",
        "",
        f"![omega against psi, colour = loss at the top level, size = nu]({PLOTS['taxonomy']})",
        "",
        f"Each structure's best loss at the top compute level ({top if top is not None else '—'}); "
        "omega = parameter sharing, psi = rank exponent, nu = compute intensity (THEORY 3). The papers "
        "find small omega and large psi scale best.",
        "",
    ]
    lines += ["## Search history", "", f"![Loss by trial number and cumulative budget spent]({PLOTS['history']})", ""]
    lines += [
        "## How this was computed",
        "",
        "- Groups: each family's declared group (dense, Monarch, BTT, a space file's own families), and for "
        "theta the THEORY 2 named point it matches within 0.011 per entry (dense, low rank, Kronecker, "
        "Tensor-Train, BTT); other theta are 'theta'." + (f" Note: {study.space_note}." if study.space_note else ""),
        "- Points: every held-out evaluation of every trained COMPLETE trial when curves are stored (the "
        "schedule is warmup + constant learning rate, so intermediate points are fair), else final losses; "
        "duplicate trials (0 FLOPs, 'same as trial N') and failed or pruned trials are not points.",
        "- Compute: training FLOPs actually spent; forward MACs × examples ≈ training FLOPs / 6 (the papers' "
        "axis; the first layer's backward is cheaper, so this slightly overstates it).",
        f"- Regenerate: `python -m search.report --study {study.name}`.",
        "",
    ]
    return "\n".join(lines)


def verdict_of(study: Study) -> list:
    """The verdict's comparisons (search.confirm.verdict), from the study's confirmation runs only."""
    from .confirm import verdict

    return verdict(study.rows, study.curves, study.meta.get("confirmation") or {})


def _no_verdict() -> list[str]:
    return [
        "## Verdict",
        "",
        "No verdict: this study has no confirmation phase (--confirm-share 0, or a study from before it).",
        "",
    ]


def _shown(folder: str) -> str:
    """The folder relative to the working directory when below it, else its name (no machine paths)."""
    rel = os.path.relpath(folder)
    return os.path.basename(folder) if rel.startswith("..") else rel


def write_report(folder: str, name: str | None = None) -> str:
    """Read the study in ``folder``, write its plots and report.md there, and return report.md's path."""
    study = load(folder, name)
    gs = groups(study)
    try:
        plot_frontiers(study, gs, os.path.join(study.folder, PLOTS["frontier"]))
        plot_taxonomy(study, os.path.join(study.folder, PLOTS["taxonomy"]))
        plot_history(study, os.path.join(study.folder, PLOTS["history"]))
        path = os.path.join(study.folder, "report.md")
        write_atomic(path, render(study, gs))
        if study.meta.get("confirmation"):
            verdict_md.write_json(study.folder, verdict_of(study))
    except OSError as e:
        raise SearchError(
            f"cannot write the report into {study.folder}: {e.strerror or e}; copy the study to a "
            "writable folder and give it with --out"
        ) from None
    return path


# ---------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"search.report: error: {message} (see --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m search.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--study", default="default", help="study name (default: default)")
    p.add_argument("--out", help="the study's folder, if not runs/<study> (as given to search.run --out)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        from .storage import study_dir

        path = write_report(study_dir(args.study, args.out), args.study)
    except SearchError as e:
        if args.debug:
            raise
        print(f"search.report: error: {redact(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        if args.debug:
            raise
        print(f"search.report: error: {redact(e)}; check the folder given to --out", file=sys.stderr)
        return 2
    except Exception as e:  # a bug, not bad input: still one line, unless --debug
        if args.debug:
            raise
        why = redact((str(e).strip().splitlines() or [""])[0])
        print(
            f"search.report: internal error: {type(e).__name__}: {why} (rerun with --debug for the traceback, "
            "and please report it)",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:  # Ctrl-C: the study is untouched (the report only reads it)
        print(
            "\ninterrupted: the report may be incomplete; run the same command again to write it whole", file=sys.stderr
        )
        return 130
    try:
        print(f"report: {path}")
    except BrokenPipeError:  # the reader of stdout went away (`... | head`): not a bug, end quietly
        return closed_pipe()
    return 0


if __name__ == "__main__":
    run_command(main)
