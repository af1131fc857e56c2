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
``es.use_cost_table(PATH)``. A run takes about 10 s on a CPU (``--quick``: a few seconds, small sizes).
"""

from __future__ import annotations

import platform
import statistics
import sys

import torch

from einstruct.layers import costs

from .layers import interleave

FORMS = {"plain": (False, False), **{name: form for form, name in costs.FORMS.items()}}
REGIMES = {"rows": (32, 1), "carried": (2, 16)}  # blocks, M per input row
K, NARROW, WIDE = 64, 8, 64


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
    print(f"wrote {path}; use it with EINSTRUCT_COST_TABLE={path} (or es.use_cost_table({path!r}))")
