"""The confirmation phase: after exploration, which structures are retrained, at which widths and on which seeds,
and the verdict read from those runs only (search.verdict).

Confirmed are the top ``confirm_top`` distinct structures of exploration other than dense and the best named
one, the best *named* structure (a structure other than dense whose family gives it a name of its own, e.g.
BTT, Monarch or theta's THEORY 2 points, with the lowest exploration loss at the top level) and dense. The top
are ranked by exploration loss over the upper levels (every level but the lowest): the mean, over the upper
levels a structure was trained at, of its best log loss less that level's best log loss, so the exploration's
winners are confirmed wherever the sampler found them (a structure at one upper level competes with the
references, trained at all of them: confirmation, on fresh seeds, tells a lucky run from a real one). Each is
trained at every level's allowance, at ``confirm_widths`` widths of the task's grid that bracket its best
exploration width at that level (when that width is at the grid's edge, the bracket cannot surround it and the
structure's frontier is *edge-limited* there; so it is where the confirmation sweep itself does best at the
grid's smallest or largest width), on ``confirm_seeds`` fresh seeds: ``seed + 1, seed + 2, ...``,
never the exploration seed. The sweep over widths and the repeat over seeds are one phase, ``confirm``, in
trials.csv's ``phase`` column (exploration is ``explore``).

Each confirmation level is its own Optuna study ``<study>.L<CONFIRM + i>`` holding only enqueued trials, with its
own ledger level ``CONFIRM + i`` (search.outputs.CONFIRM), so the ledger keeps both phases inside the budget and a
resumed study trains only the confirmation runs that have not finished.
"""

from __future__ import annotations

import math

from .families.base import Candidate

ROLES = ("top", "named", "dense")


def seeds(seed: int, n: int) -> list[int]:
    """The confirmation seeds of a study with exploration seed ``seed``: fresh, deterministic, never ``seed``."""
    return [(int(seed) + 1 + j) % 2**32 for j in range(int(n))]


def _float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _explored(rows) -> list[dict]:
    """Trained COMPLETE exploration rows with a finite loss."""
    out = []
    for r in rows:
        if (r.get("phase") or "explore") != "explore" or r["state"] != "COMPLETE":
            continue
        if not _float(r["train_flops"]) > 0 or not math.isfinite(_float(r["loss"])):
            continue
        out.append(r)
    return out


def named(cand: Candidate) -> bool:
    """A structure other than dense with a name of its own: its family's group, unless the family declares
    per-structure groups and this one falls in the family's catch-all (theta's unnamed points)."""
    fam = cand.fam
    if cand.group == "dense":
        return False
    return not (getattr(fam, "groups", ()) and cand.group == (fam.group or fam.label or fam.name))


def select(rows, families: dict | None, levels: list[int], top: int) -> list[tuple[str, Candidate, bool]]:
    """(role, structure at width 0, whether it is the best named one) of the structures to confirm, in verdict
    order: the top ``top`` of the others, then the best named one and dense."""
    best: dict[tuple, dict[int, float]] = {}  # structure -> level -> lowest loss
    cands: dict[tuple, Candidate] = {}
    for r in _explored(rows):
        c = Candidate.from_row(r, families)
        key = (c.family, c.args)
        cands[key] = c.at(0)
        lv, loss = int(r["level"]), _float(r["loss"])
        best.setdefault(key, {})
        best[key][lv] = min(loss, best[key].get(lv, math.inf))
    upper = sorted(levels)[1:] or list(levels)
    floor = {lv: min(b[lv] for b in best.values() if lv in b) for lv in upper if any(lv in b for b in best.values())}

    def score(key):
        have = [
            math.log(best[key][lv] / floor[lv]) for lv in upper if lv in best[key] and best[key][lv] > 0 < floor[lv]
        ]
        return (sum(have) / len(have) if have else math.inf, -len(have), cands[key].label)

    top_level = max(levels)
    names = [k for k in best if named(cands[k]) and top_level in best[k]]
    best_named = min(names, key=lambda k: (best[k][top_level], cands[k].label)) if names else None
    ranked = [k for k in sorted(best, key=score) if k != best_named and cands[k].family != "dense"]
    out = [("top", cands[k], False) for k in ranked[:top]]
    if best_named is not None:
        out.append(("named", cands[best_named], True))
    dense = [k for k in best if cands[k].family == "dense"]
    if dense:
        out.append(("dense", cands[dense[0]], False))
    return out


def bracket(grid, best: int, n: int) -> tuple[list[int], bool]:
    """``n`` (>= 3 when the grid has them) consecutive grid widths around ``best``, and whether ``best`` is at the
    grid's edge (the bracket cannot surround it: edge-limited)."""
    ws = sorted(set(int(w) for w in grid))
    i = min(range(len(ws)), key=lambda j: abs(math.log(ws[j] / best)))
    n = min(max(int(n), 1), len(ws))
    lo = min(max(i - (n - 1) // 2, 0), len(ws) - n)
    return ws[lo : lo + n], i in (0, len(ws) - 1)


def best_width(rows, families: dict | None, structure: Candidate, level: int) -> int | None:
    """The width of ``structure``'s lowest exploration loss at ``level`` (None: not trained there)."""
    mine = []
    for r in _explored(rows):
        if int(r["level"]) == level:
            c = Candidate.from_row(r, families)
            if (c.family, c.args) == (structure.family, structure.args):
                mine.append((_float(r["loss"]), c.width))
    return min(mine)[1] if mine else None


def plan(rows, families, levels: list[int], grid, cfg: dict, fallback) -> list[dict]:
    """The confirmation plan: per structure its role, label and, per level, the best width, the bracket and the
    edge flag; ``fallback(structure, level)`` gives a width for a level the structure was not trained at."""
    out = []
    for role, s, is_named in select(rows, families, levels, int(cfg["confirm_top"])):
        per = {}
        for lv in levels:
            w = best_width(rows, families, s, lv)
            found = w is not None
            w = w if found else fallback(s, lv)
            ws, edge = bracket(grid, w, int(cfg["confirm_widths"]))
            per[str(lv)] = {"best_width": w, "explored": found, "widths": ws, "edge": edge}
        out.append({"role": role, "structure": s.label, "best_named": is_named, "candidate": s, "levels": per})
    return out


def runs(entries: list[dict], level: int, seed_list: list[int]) -> list[tuple[Candidate, int]]:
    """The (candidate, seed) runs of one level, seed-major (a budget that runs short leaves whole seeds)."""
    return [(e["candidate"].at(w), s) for s in seed_list for e in entries for w in e["levels"][str(level)]["widths"]]


def public(entries: list[dict], seed_list: list[int], grid=None) -> dict:
    """The plan as study.json records it (the report reads roles, edge flags and the width grid from it)."""
    out = {
        "seeds": list(seed_list),
        "structures": [{k: v for k, v in e.items() if k != "candidate"} for e in entries],
    }
    if grid:
        out["grid"] = sorted({int(w) for w in grid})
    return out


# ---------------------------------------------------------------- the verdict


def verdict(rows, curves: dict, confirmation: dict) -> list:
    """search.verdict.Comparison's of every confirmed structure vs dense and vs the best named structure, from
    the confirmation rows only (grouped per structure and seed; a run's curve points are frontier points: the
    schedule is constant). ``curves``: (level, trial) -> points as the report reads them (confirmation trials
    under level CONFIRM + i); ``confirmation``: study.json's plan."""
    from .outputs import CONFIRM
    from .verdict import compare

    by: dict[str, dict[int, list]] = {}
    for r in rows:
        if r.get("phase") != "confirm" or r["state"] != "COMPLETE" or not math.isfinite(_float(r["loss"])):
            continue
        pts = curves.get((CONFIRM + int(r["level"]), int(r["trial"]))) or ((r["train_flops"], r["loss"]),)
        seed = int(_float(r["seed"]))
        keep = [(float(c), float(v)) for c, v in pts if float(c) > 0 and math.isfinite(float(v)) and float(v) > 0]
        by.setdefault(r["structure"], {}).setdefault(seed, []).extend(keep)
    entries = confirmation.get("structures", [])
    swept = sweep_edges(rows, confirmation.get("grid"))
    by_name = {e["structure"]: e for e in entries}
    dense = next((e["structure"] for e in entries if e["structure"] == "dense"), "dense")
    named_ = next((e["structure"] for e in entries if e.get("best_named")), None)
    out = []
    for e in entries:
        s = e["structure"]
        if s == dense:
            continue
        for vs in (dense, named_) if named_ is not None and s != named_ else (dense,):
            c = compare(s, by.get(s, {}), vs, by.get(vs, {}))
            out.append(_with_edges(c, e, by_name.get(vs), swept))
    return out


def sweep_edges(rows, grid) -> dict[str, set[str]]:
    """Structure -> the levels at which its confirmation sweep did best (lowest mean log final loss over the
    seeds) at the smallest or the largest width of the task's grid ``grid`` (study.json's plan records it; a
    plan without it: none): there the sweep did not surround the structure's optimum either."""
    if not grid:
        return {}
    ends = (min(grid), max(grid))
    logs: dict[tuple, list[float]] = {}
    for r in rows:
        loss, width = _float(r["loss"]), _float(r.get("width"))
        if r.get("phase") != "confirm" or r["state"] != "COMPLETE" or not loss > 0 or not math.isfinite(width):
            continue
        logs.setdefault((r["structure"], str(int(r["level"])), int(width)), []).append(math.log(loss))
    best: dict[tuple, tuple[float, int]] = {}
    for (s, lv, w), ls in logs.items():
        m = sum(ls) / len(ls)
        if (s, lv) not in best or m < best[s, lv][0]:
            best[s, lv] = (m, w)
    out: dict[str, set[str]] = {}
    for (s, lv), (_, w) in best.items():
        if w in ends:
            out.setdefault(s, set()).add(lv)
    return out


def edge_levels(entry: dict | None, swept=()) -> list[str]:
    """The levels at which a confirmed structure's best exploration width is at the width grid's edge, or (the
    levels in ``swept``) its confirmation sweep did best at the grid's edge."""
    levels = (entry or {}).get("levels", {})
    edges = {lv for lv, p in levels.items() if p.get("edge")} | set(swept)
    return sorted(edges, key=int)


def _with_edges(c, entry: dict, vs_entry: dict | None, swept: dict | None = None):
    """The comparison with the sides whose frontier is edge-limited (``edge_limited``, and its note telling the
    levels): the structure's, and the one it is compared with (dense, or the best named structure)."""
    from dataclasses import replace

    swept = swept or {}
    sides = [
        (c.structure, edge_levels(entry, swept.get(c.structure, ()))),
        (c.vs, edge_levels(vs_entry, swept.get(c.vs, ()))),
    ]
    sides = [(name, lv) for name, lv in sides if lv]
    if not sides:
        return c
    notes = [f"{name}'s best width is at the width grid's edge at level(s) {', '.join(lv)}" for name, lv in sides]
    note = "; ".join(notes) + ": edge-limited"
    return replace(c, note=f"{c.note}; {note}" if c.note else note, edge_limited=tuple(name for name, _ in sides))
