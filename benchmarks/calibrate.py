"""The layout planner's cost table measured on this machine: ``python -m benchmarks.layers --calibrate``.

Measures what :class:`einstruct.layers.costs.CostTable` holds, side by side in one run (every job's samples
interleaved in a shuffled order, medians over rounds, differences taken within a round), in float32:

- ``copy`` and ``scattered``: permute copies of a (rows, 64, 16, 4) tensor, one that keeps runs of 64
  contiguous elements (to (64, rows, 16, 4)) and one that scatters runs of 4 (to (16, rows, 64, 4)), as a
  BTT step with rank 4 would. The unit is half the time per element of the first, so ``copy`` is 2 by
  definition, as in the built-in tables, and every other entry is in the same units.
- ``mac``: the plain form's time per multiply-add of a step (its forward and both gradients, as the
  training chain runs them: three bmm), at 64 output columns.
- the forms: the same step in each other form (``act_t``: activation laid out (K, M); ``out_t``: output
  (P, M) = core @ act; ``both_t``: both), at 8 and at 64 output columns, in two regimes: M the input rows
  alone (32 blocks of rows x 64, as a BTT step) and M carrying axes (2 blocks of 16 rows x 64). Their
  extra time over the plain form is split into a part per activation element (``form``, the median over
  forms and regimes) and a part per multiply-add (the slowdown, in units of ``mac``) by the two widths.
  Negative estimates (a form faster than plain, or noise) are written as 0.

The table is printed next to the built-in one for the device and written as JSON (``--out``, default
``costs-<device>.json``); point einstruct at it with ``EINSTRUCT_COST_TABLE=PATH`` or
``es.use_cost_table(PATH)``. Then, as a check of what the micro-benchmarks miss, each of a few structures
at d = 1024 whose layout the measured table changes is timed side by side with its built-in-table plan
(training step, batch 1024, the cost-model route, same weights): a ratio below 1 means the measured table
plans it faster. A run takes 10-30 s on a CPU (``--quick``: a few seconds, small sizes, no check).
"""

from __future__ import annotations

import platform
import statistics
import sys

import torch

import einstruct as es
from einstruct.layers import costs

from .layers import STRUCTURES, interleave, paired

FORMS = {"plain": (False, False), **{name: form for form, name in costs.FORMS.items()}}
REGIMES = {"rows": (32, 1), "carried": (2, 16)}  # blocks, M per input row
K, NARROW, WIDE = 64, 8, 64
SLOWER = 0.05  # a ratio above 1 + this is a slower plan, beyond this machine's noise between two layers
CHECK = ("btt r=4", "monarch 16", "tt r=4", "theta A", "theta B")  # structures of the side-by-side check


def step(blocks: int, m: int, p: int, act_kr: bool, core_left: bool, device):
    """One chain step in a matmul form: forward, core gradient, activation gradient (execute.py's three bmm)."""
    a = torch.randn(blocks, *((K, m) if act_kr else (m, K)), device=device)
    w = torch.randn(blocks, *((p, K) if core_left else (K, p)), device=device)
    g = torch.randn(blocks, *((p, m) if core_left else (m, p)), device=device)
    am = a.mT if act_kr else a  # (M, K)

    def run():
        if core_left:
            torch.bmm(w, am.mT)  # (P, M)
            torch.bmm(g, am)  # (P, K)
            torch.bmm(w.mT, g) if act_kr else torch.bmm(g.mT, w)
        else:
            torch.bmm(am, w)  # (M, P)
            torch.bmm(a, g) if act_kr else torch.bmm(a.mT, g)  # (K, P)
            torch.bmm(w, g.mT) if act_kr else torch.bmm(g, w.mT)

    return run


def measure(device, rows: int, repeats: int, log) -> tuple[costs.CostTable, dict]:
    """The cost table of ``device`` measured at ``rows`` input rows, and the raw medians (seconds)."""
    torch.manual_seed(0)
    x = torch.randn(rows, 64, 16, 4, device=device)
    jobs = {
        "copy": lambda: x.permute(1, 0, 2, 3).contiguous(),
        "scattered": lambda: x.permute(2, 0, 1, 3).contiguous(),
    }
    for regime, (blocks, per_row) in REGIMES.items():
        for name, (act_kr, core_left) in FORMS.items():
            for p in (NARROW, WIDE):
                jobs[(regime, name, p)] = step(blocks, rows * per_row, p, act_kr, core_left, device)
    times = interleave(jobs, repeats, device, log, "calibrate")
    med = {k: statistics.median(v) for k, v in times.items()}
    unit = med["copy"] / (2 * x.numel())  # seconds per unit: a fast copy costs 2 per element

    def extra(regime, name, p):  # units over the plain form, the median of within-round differences
        return statistics.median(a - b for a, b in zip(times[(regime, name, p)], times[(regime, "plain", p)])) / unit

    elems = {r: b * rows * per * K for r, (b, per) in REGIMES.items()}  # activation elements of a step
    mac = statistics.median(med[(r, "plain", WIDE)] / unit / (elems[r] * WIDE) for r in REGIMES)
    per_elem, slow = [], {}
    for name in costs.FORMS.values():
        pair = []
        for r in REGIMES:
            lo, hi = extra(r, name, NARROW), extra(r, name, WIDE)
            per_mac = (hi - lo) / (elems[r] * (WIDE - NARROW))
            per_elem.append((lo - per_mac * elems[r] * NARROW) / elems[r])
            pair.append(max(0.0, per_mac / mac))
        slow[name] = (round(pair[0], 3), round(pair[1], 3))
    threads = torch.get_num_threads() if device.type == "cpu" else None
    where = platform.machine() if device.type == "cpu" else torch.cuda.get_device_name(device)
    table = costs.CostTable(
        device.type,
        copy=2,
        scattered=round(2 * med["scattered"] / med["copy"], 3),
        form=round(max(0.0, statistics.median(per_elem)), 3),
        mac=round(mac, 4),
        act_t=slow["act_t"],
        out_t=slow["out_t"],
        both_t=slow["both_t"],
        source=(
            f"measured by python -m benchmarks.layers --calibrate: {where}, torch {torch.__version__}, float32, "
            f"{rows} rows" + (f", {threads} threads" if threads else "")
        ),
    )
    return table, {str(k): v for k, v in med.items()}


def _forms(layer) -> str:
    return ",".join(("t" if s.act_kr else "p") + ("t" if s.core_left else "p") for s in layer._chain.steps)


def check(table: costs.CostTable, builtin: costs.CostTable, device, repeats: int, log, d: int = 1024) -> list[str]:
    """Training-step time of the measured table's plan over the built-in table's, for the structures of
    CHECK whose layout differs between the two (side by side, interleaved, same weights)."""
    jobs, labels = {}, []
    x = torch.randn(1024, d, device=device)
    try:
        for label in CHECK:
            pair = []
            for t in (builtin, table):
                costs.use_cost_table(t)  # takes precedence over EINSTRUCT_COST_TABLE: exactly this table
                torch.manual_seed(0)
                pair.append(es.StructuredLinear(d, d, STRUCTURES[label](es), device=device))
            a, b = pair
            if (a._chain.steps, a._chain.final_perm) == (b._chain.steps, b._chain.final_perm):
                continue
            b.load_state_dict(a.state_dict())
            for tag, m in (("builtin", a), ("measured", b)):
                m.builtin_rows = 0  # the cost-model route, whose forms the table prices

                def job(m=m):
                    m(x).sum().backward()

                jobs[(label, tag)] = job
            labels.append((label, _forms(a), _forms(b)))
    finally:
        costs.use_cost_table(None)
    if not jobs:
        return [f"check: the measured table plans {', '.join(CHECK)} at d={d} as the built-in one does"]
    times = interleave(jobs, repeats, device, log, "check")
    lines = [f"check (d={d}, batch 1024, training step): time with the measured table's plan / the built-in's"]
    slower = []
    for label, fa, fb in labels:
        ratio = paired(times, (label, "measured"), (label, "builtin"))
        lines.append(f"  {label:<11} forms {fa} -> {fb}: {ratio:.3f}")
        if ratio > 1 + SLOWER:
            slower.append(label)
    if slower:
        lines.append(
            f"the built-in table plans {', '.join(slower)} faster here: prefer it (leave {costs.ENV} unset) "
            "unless your own layers, timed with python -m benchmarks.layers, say otherwise"
        )
    else:
        lines.append(f"the measured table plans these within {SLOWER:.0%} of the built-in one or faster")
    return lines


def main(device: torch.device, out: str | None, quick: bool, repeats: int) -> None:
    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    rows, repeats = (64, 3) if quick else (1024, repeats)
    table, raw = measure(device, rows, repeats, log)
    builtin = costs.BUILTIN.get(device.type, costs.CPU)
    print(f"device={device} threads={torch.get_num_threads()} float32, {rows} rows, median of {repeats} rounds")
    print(f"{'entry':<10} {'measured':>16} {'built-in':>16}")
    for key in ("copy", "scattered", "form", "mac", *costs.FORMS.values()):
        print(f"{key:<10} {getattr(table, key)!s:>16} {getattr(builtin, key)!s:>16}")
    print("raw medians (ms): " + ", ".join(f"{k}={v * 1e3:.3f}" for k, v in raw.items()))
    path = out or f"costs-{device.type}.json"
    costs.save(table, path)
    print(f"wrote {path}; use it with EINSTRUCT_COST_TABLE={path} (or es.use_cost_table({path!r}))", flush=True)
    if not quick:
        print("\n".join(check(table, builtin, device, repeats, log)))
