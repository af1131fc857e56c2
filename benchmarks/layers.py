"""Structured layers side by side: time, GFLOP/s and saved memory against dense, bare matmuls and einsums.

For every (d, batch) all contenders run in one process, their repeats interleaved in a shuffled order so
that machine noise hits them alike; a job shorter than 50 ms runs several times per timed sample (as
timeit does); every figure is a median over repeats, and the columns are ratios measured in the same
run (``x ein`` is the median of the ratios within each round):

- ``ms``, ``GF/s``: StructuredLinear forward + backward (input needs a gradient: 3 x forward FLOPs).
- ``/dense``: its GFLOP/s over nn.Linear's (d x d, same batch).
- ``/prim``: its rate over the bare primitives of its plan: the same mm/bmm shapes, contiguous, each step
  as three matmuls (forward, input gradient, core gradient), no copies, no autograd.
- ``x ein``: speed-up over the two-einsum layer (one torch.einsum per core, the reference papers' way).
- ``MB``, ``/ein``: bytes autograd keeps for the backward (saved tensors, parameters excluded, each
  storage once) and their ratio to the einsum layer's.
- ``inf x``: inference (forward under no_grad) speed over nn.Linear's; only for batches <= --infer-max.
- ``cache x``: inference inside ``es.inference_cache`` (weights laid out once, the dense matrix for
  batches <= dense_rows) over inference outside it (the cores read live at every call): what the scope buys.
- ``x base``, ``inf x base`` (with ``--baseline PATH``): speed-up of the training step and of inference over
  the same layer from another checkout of einstruct (``PATH`` holds its ``einstruct`` package, imported under
  another name), timed in the same run, interleaved like every other contender.

``--per-call`` measures the fixed cost per call instead: forward + backward of ``layer(x).sum()`` for
``x = torch.randn(16, d, requires_grad=True)`` (d = 256 unless ``--dims``; no optimizer) and no-grad forwards
of 1, 4 and 16 rows, on one thread unless ``--threads``, as time ratios (lower is faster) against
nn.Linear(d, d) (``/lin``) and, with ``--baseline``, against the baseline's layer (``/base``): medians of the
ratios within each of ``--repeats`` interleaved rounds.

    python -m benchmarks.layers                       # d 1024 4096 8192, batch 16 2048, all structures
    python -m benchmarks.layers --quick               # d 1024, batch 16 2048, 3 repeats
    python -m benchmarks.layers --dims 4096 --batches 2048 --structures "btt r=1" "monarch 4" --out t.md
    python -m benchmarks.layers --quick --baseline /tmp/base     # side by side with another checkout
    python -m benchmarks.layers --per-call --baseline /tmp/base  # per-call cost at d = 256, one thread
    python -m benchmarks.layers --calibrate --out costs.json     # the planner's cost table on this machine

``--calibrate`` measures the layout planner's cost table (benchmarks/calibrate.py) on ``--device``, prints
it next to the built-in one and writes it as JSON (``--out``; ``--quick``: small sizes, a few seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import importlib.util
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import einstruct as es
from einstruct import plan, rules

THETA_A = (0.5, 0.25, 0.25, 0.25, 0.5, 0.25, 0.25)
THETA_B = (0.75, 0, 0.25, 0, 0.75, 0.25, 0.25)
STRUCTURES = {  # each made from an einstruct module (this checkout's, or the baseline's)
    "dense": lambda m: m.presets.dense(),
    "btt r=1": lambda m: m.presets.btt(rank=1),
    "btt r=2": lambda m: m.presets.btt(rank=2),
    "btt r=4": lambda m: m.presets.btt(rank=4),
    "monarch 4": lambda m: m.presets.monarch(blocks=4),
    "monarch 16": lambda m: m.presets.monarch(blocks=16),
    "low rank 64": lambda m: m.presets.low_rank(rank=64),
    "kron": lambda m: m.presets.kron(),
    "tt r=4": lambda m: m.presets.tt(rank=4),
    "theta A": lambda m: m.theta(*THETA_A),
    "theta B": lambda m: m.theta(*THETA_B),
}


def load_baseline(path: str):
    """The einstruct package of another checkout (``path`` or ``path/einstruct``), as ``einstruct_baseline``."""
    root = Path(path)
    pkg = root / "einstruct" if (root / "einstruct" / "__init__.py").exists() else root
    if not (pkg / "__init__.py").exists():
        raise SystemExit(f"--baseline {path}: no einstruct package there (expected {pkg / '__init__.py'})")
    spec = importlib.util.spec_from_file_location(
        "einstruct_baseline", pkg / "__init__.py", submodule_search_locations=[str(pkg)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["einstruct_baseline"] = module
    spec.loader.exec_module(module)
    return module


def same_weights(base: nn.Module, layer: nn.Module) -> nn.Module:
    """``base`` (the baseline's layer) with ``layer``'s parameters copied in, so both compute the same."""
    with torch.no_grad():
        for (_, p), (_, q) in zip(sorted(base.named_parameters()), sorted(layer.named_parameters())):
            p.copy_(q)
    return base


class EinsumChain(nn.Module):
    """The same structure as one torch.einsum per core in spec order (parameters shared with ``layer``)."""

    def __init__(self, layer: es.StructuredLinear):
        super().__init__()
        self.layer = layer
        st = layer.structure
        spec = st.spec
        names = {c.name for c in st.cores}
        cores = [c for c in spec.cores if c.name in names]
        axes = [c.axes for c in cores]
        used = set(spec.x + spec.y + "".join(axes))
        n = next(ch for ch in "zyxwvutsrqponmlkjihgfedcbaZYXWVUTSRQPONMLKJIHGFEDCBA" if ch not in used)
        self.exprs = []
        applied: frozenset[int] = frozenset()
        for i, c in enumerate(cores):
            s = plan.make_step(spec.x, spec.y, axes, applied, i)
            applied = applied | {i}
            self.exprs.append((c.name, f"{n}{s.before},{c.axes}->{n}{s.after}"))
        last = plan.activation(spec.x, spec.y, axes, applied)
        self.final = f"{n}{last}->{n}{spec.y}" if last != spec.y else None
        self.x_shape = tuple(st.sizes[a] for a in spec.x)

    def forward(self, x):
        layer, st = self.layer, self.layer.structure
        h = x.reshape(-1, *self.x_shape)
        for name, expr in self.exprs:
            h = torch.einsum(expr, h, getattr(layer, name))
        if self.final is not None:
            h = torch.einsum(self.final, h)
        return h.reshape(x.shape[0], st.d_out_padded) + layer.bias


class Primitives:
    """The bare matmuls of a layer's plan at ``n`` rows: per step a @ w, g @ w^T, a^T @ g, contiguous."""

    def __init__(self, layer: es.StructuredLinear, n: int, device):
        self.ops = []
        for s in layer._chain.steps:
            lead = s.core_shape[:-2]
            k, p = s.core_shape[-2:] if not s.core_left else s.core_shape[-2:][::-1]
            m = n * s.rows
            self.ops.append(tuple(torch.randn(*lead, *shape, device=device) for shape in ((m, k), (k, p), (m, p))))

    def __call__(self):
        for a, w, g in self.ops:
            torch.matmul(a, w)
            torch.matmul(g, w.mT)
            torch.matmul(a.mT, g)


def saved_bytes(fn, module: nn.Module) -> int:
    """Bytes of the tensors autograd saves while ``fn()`` runs, each storage once, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


MIN_SAMPLE_S = 0.05  # a timed sample of a short job repeats it until it lasts about this long
MAX_INNER = 200


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleave(jobs: dict, repeats: int, device, log, what: str) -> dict:
    """Per job, ``repeats`` timed samples (seconds per call), every round in a fresh shuffled order."""
    times: dict = {k: [] for k in jobs}
    inner = dict.fromkeys(jobs, 1)
    keys, rng = list(jobs), random.Random(0)
    for r in range(repeats + 1):  # the first round warms up (allocator, caches) and is dropped
        rng.shuffle(keys)
        for k in keys:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(inner[k]):
                jobs[k]()
            _sync(device)
            dt = (time.perf_counter() - t0) / inner[k]
            if r:
                times[k].append(dt)
            else:  # short jobs run several times per sample, so each sample lasts about MIN_SAMPLE_S
                inner[k] = max(1, min(MAX_INNER, math.ceil(MIN_SAMPLE_S / max(dt, 1e-9))))
        log(f"  {what}: round {r}/{repeats}")
    return times


def paired(times: dict, a, b) -> float:
    """Median over rounds of time(a) / time(b) within each round: drift between rounds cancels."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def baseline_layers(base, layers: dict, d: int, device) -> dict:
    """The baseline checkout's layer for each structure, with the same weights."""
    if base is None:
        return {}
    return {
        lab: same_weights(base.StructuredLinear(d, d, STRUCTURES[lab](base), device=device), layer)
        for lab, layer in layers.items()
    }


def run_cell(d: int, batch: int, labels: list[str], repeats: int, device, infer_max: int, log, base=None) -> list[dict]:
    """Time every structure at (d, batch) against dense, primitives and einsum (and the baseline's layer)."""
    torch.manual_seed(0)
    x = torch.randn(batch, d, device=device)
    grad = torch.randn(batch, d, device=device)
    dense = nn.Linear(d, d, device=device)
    layers = {lab: es.StructuredLinear(d, d, STRUCTURES[lab](es), device=device) for lab in labels}
    olds = baseline_layers(base, layers, d, device)

    def train_step(m):
        def f():
            xi = x.detach().requires_grad_(True)
            m(xi).backward(grad)

        return f

    def infer(m):
        def f():
            with torch.no_grad():
                m(x)

        return f

    scopes = contextlib.ExitStack()  # the cached contenders are copies held in a scope for the whole cell
    jobs = {("dense", "train"): train_step(dense)}
    infer_on = batch <= infer_max
    if infer_on:
        jobs[("dense", "infer")] = infer(dense)
    for lab, layer in layers.items():
        ein = EinsumChain(layer)
        with torch.no_grad():  # same function: sanity check before timing
            y = layer(x)
            err = (y - ein(x)).abs().max().item()
            if lab in olds:
                err = max(err, (y - olds[lab](x)).abs().max().item())
            scale = y.abs().max().item()
        if err > 1e-4 * max(scale, 1.0):
            raise RuntimeError(f"{lab} at d={d}: einsum, baseline and StructuredLinear differ by {err}")
        jobs[(lab, "train")] = train_step(layer)
        jobs[(lab, "ein")] = train_step(ein)
        jobs[(lab, "prim")] = Primitives(layer, batch, device)
        if lab in olds:
            jobs[(lab, "train_base")] = train_step(olds[lab])
        if infer_on:
            jobs[(lab, "infer")] = infer(layer)
            cached = copy.deepcopy(layer)
            scopes.enter_context(es.inference_cache(cached))
            jobs[(lab, "infer_cached")] = infer(cached)
            if lab in olds:
                jobs[(lab, "infer_base")] = infer(olds[lab])
    times = interleave(jobs, repeats, device, log, f"d={d} batch={batch}")
    scopes.close()
    t = {k: statistics.median(v) for k, v in times.items()}
    nan = math.nan
    dense_flops = rules.train_flops(rules.dense_flops(batch, d, d))
    dense_rate = dense_flops / t[("dense", "train")]
    rows = []
    for lab, layer in layers.items():
        flops = rules.train_flops(layer.structure.flops * batch)
        mem = saved_bytes(lambda m=layer: m(x.detach().requires_grad_(True)), layer)
        ein = EinsumChain(layer)
        mem_ein = saved_bytes(lambda m=ein: m(x.detach().requires_grad_(True)), layer)
        mem_base = saved_bytes(lambda m=olds[lab]: m(x.detach().requires_grad_(True)), olds[lab]) if lab in olds else 0
        rows.append(
            {
                "d": d,
                "batch": batch,
                "structure": lab,
                "flops_vs_dense": flops / dense_flops,
                "ms": t[(lab, "train")] * 1e3,
                "gflops": flops / t[(lab, "train")] / 1e9,
                "vs_dense": flops / t[(lab, "train")] / dense_rate,
                "vs_prim": t[(lab, "prim")] / t[(lab, "train")],
                "vs_einsum": paired(times, (lab, "ein"), (lab, "train")),
                "saved_mb": mem / 2**20,
                "saved_vs_einsum": mem / mem_ein if mem_ein else math.nan,
                "saved_vs_base": mem / mem_base if mem_base else nan,
                "infer_vs_dense": t[("dense", "infer")] / t[(lab, "infer")] if infer_on else math.nan,
                "cached_vs_live": paired(times, (lab, "infer"), (lab, "infer_cached")) if infer_on else nan,
                "vs_base": paired(times, (lab, "train_base"), (lab, "train")) if lab in olds else nan,
                "infer_vs_base": paired(times, (lab, "infer_base"), (lab, "infer"))
                if infer_on and lab in olds
                else nan,
                "dense_gflops": dense_rate / 1e9,
            }
        )
    return rows


COLUMNS = [
    ("d", "{:d}"),
    ("batch", "{:d}"),
    ("structure", "{}"),
    ("flops_vs_dense", "{:.3f}"),
    ("ms", "{:.2f}"),
    ("gflops", "{:.1f}"),
    ("vs_dense", "{:.2f}"),
    ("vs_prim", "{:.2f}"),
    ("vs_einsum", "{:.2f}"),
    ("saved_mb", "{:.1f}"),
    ("saved_vs_einsum", "{:.2f}"),
    ("infer_vs_dense", "{:.2f}"),
    ("cached_vs_live", "{:.2f}"),
    ("vs_base", "{:.2f}"),
    ("infer_vs_base", "{:.2f}"),
    ("saved_vs_base", "{:.2f}"),
    ("dense_gflops", "{:.1f}"),
]
HEADERS = {
    "flops_vs_dense": "FLOPs/dense",
    "gflops": "GF/s",
    "vs_dense": "/dense",
    "vs_prim": "/prim",
    "vs_einsum": "x ein",
    "saved_mb": "MB",
    "saved_vs_einsum": "MB/ein",
    "infer_vs_dense": "inf x",
    "cached_vs_live": "cache x",
    "vs_base": "x base",
    "infer_vs_base": "inf x base",
    "saved_vs_base": "MB/base",
    "dense_gflops": "dense GF/s",
}


PER_CALL_TRAIN_ROWS = 16
PER_CALL_INFER_ROWS = (1, 4, 16)


def per_call(d: int, labels: list[str], repeats: int, device, log, base=None) -> list[dict]:
    """Fixed cost per call: training step of layer(x).sum() at 16 rows and no-grad forwards of 1, 4, 16 rows,
    as time ratios against nn.Linear(d, d) and the baseline's layer (lower is faster)."""
    torch.manual_seed(0)
    xt = torch.randn(PER_CALL_TRAIN_ROWS, d, device=device, requires_grad=True)
    xs = {r: torch.randn(r, d, device=device) for r in PER_CALL_INFER_ROWS}
    layers = {lab: es.StructuredLinear(d, d, STRUCTURES[lab](es), device=device) for lab in labels}
    contenders = {
        "nn.Linear": nn.Linear(d, d, device=device),
        **{(lab, "new"): m for lab, m in layers.items()},
        **{(lab, "base"): m for lab, m in baseline_layers(base, layers, d, device).items()},
    }

    def train(m):
        def f():
            m(xt).sum().backward()

        return f

    def infer(m, x):
        def f():
            with torch.no_grad():
                m(x)

        return f

    jobs = {}
    for name, m in contenders.items():
        jobs[(name, "train")] = train(m)
        for r, x in xs.items():
            jobs[(name, r)] = infer(m, x)
    times = interleave(jobs, repeats, device, log, f"per call, d={d}")
    rows = []
    for lab in layers:
        row = {"structure": lab, "train_us": statistics.median(times[((lab, "new"), "train")]) * 1e6}
        for kind in ("train", *PER_CALL_INFER_ROWS):
            row[f"{kind}_vs_lin"] = paired(times, ((lab, "new"), kind), ("nn.Linear", kind))
            has = ((lab, "base"), kind) in times
            row[f"{kind}_vs_base"] = paired(times, ((lab, "new"), kind), ((lab, "base"), kind)) if has else math.nan
        rows.append(row)
    return rows


def per_call_table(rows: list[dict]) -> list[str]:
    kinds = ("train", *PER_CALL_INFER_ROWS)
    head = ["structure", "train us"] + [
        f"{'train' if k == 'train' else f'inf {k}'} {w}" for k in kinds for w in ("/lin", "/base")
    ]
    cell = lambda v: "-" if math.isnan(v) else f"{v:.2f}"
    body = [
        [r["structure"], f"{r['train_us']:.1f}"] + [cell(r[f"{k}_{w}"]) for k in kinds for w in ("vs_lin", "vs_base")]
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    return [
        " ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
        for line in [head, *body]
    ]


def fmt(row: dict) -> list[str]:
    out = []
    for key, f in COLUMNS:
        v = row[key]
        out.append("-" if isinstance(v, float) and math.isnan(v) else f.format(v))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", type=int, nargs="+", default=None, help="default 1024 4096 8192 (--per-call: 256)")
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 2048])
    ap.add_argument(
        "--structures", nargs="+", default=list(STRUCTURES), metavar="NAME", help=f"any of: {', '.join(STRUCTURES)}"
    )
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="d 1024 only, 3 repeats")
    ap.add_argument("--infer-max", type=int, default=64, help="largest batch with an inference column")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--out", help="also write the table: .csv or .md")
    ap.add_argument(
        "--baseline", metavar="PATH", help="another checkout (or its einstruct/ folder) to time side by side"
    )
    ap.add_argument(
        "--per-call",
        action="store_true",
        help="fixed cost per call at d=256 (training step at 16 rows, no-grad at 1, 4, 16), one thread",
    )
    ap.add_argument(
        "--calibrate", action="store_true", help="measure the layout planner's cost table and write it (--out)"
    )
    args = ap.parse_args(argv)
    unknown = [s for s in args.structures if s not in STRUCTURES]
    if unknown:
        ap.error(f"unknown structure {unknown[0]!r}; choose from {', '.join(STRUCTURES)}")
    if args.quick:
        args.dims, args.repeats = [1024], 3
    if args.dims is None:
        args.dims = [256] if args.per_call else [1024, 4096, 8192]
    if args.threads or args.per_call:
        torch.set_num_threads(args.threads or 1)
    base = load_baseline(args.baseline) if args.baseline else None
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else args.device)
    if device.type == "cuda" and args.device != "auto":
        device = torch.device(args.device)

    if args.calibrate:
        from . import calibrate

        return calibrate.main(device, args.out, args.quick, args.repeats)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    if args.per_call:
        print(
            f"device={device} threads={torch.get_num_threads()} float32; time ratios (lower is faster), median "
            f"of {args.repeats} interleaved rounds; baseline: {args.baseline or '-'}",
            flush=True,
        )
        lines = []
        for d in args.dims:
            lines += [f"d={d}", *per_call_table(per_call(d, args.structures, args.repeats, device, log, base))]
            print("\n".join(lines[-len(args.structures) - 2 :]), flush=True)
        if args.out:
            Path(args.out).write_text("\n".join(lines) + "\n")
        return

    head = (
        f"device={device} threads={torch.get_num_threads()} float32 forward+backward, "
        f"median of {args.repeats} interleaved repeats"
    )
    print(head, flush=True)
    names = [HEADERS.get(k, k) for k, _ in COLUMNS]
    widths = [max(len(n), 11 if n == "structure" else 6) for n in names]
    line = " ".join(n.rjust(w) if n != "structure" else n.ljust(w) for n, w in zip(names, widths))
    print(line, flush=True)
    rows = []
    for d in args.dims:
        for batch in args.batches:
            log(f"d={d} batch={batch}: {len(args.structures)} structures")
            for row in run_cell(d, batch, args.structures, args.repeats, device, args.infer_max, log, base):
                rows.append(row)
                cells = fmt(row)
                print(
                    " ".join(
                        c.ljust(w) if k == "structure" else c.rjust(w) for c, w, (k, _) in zip(cells, widths, COLUMNS)
                    ),
                    flush=True,
                )
    if args.out:
        with open(args.out, "w", newline="") as f:
            if args.out.endswith(".csv"):
                w = csv.writer(f)
                w.writerow([k for k, _ in COLUMNS])
                w.writerows(fmt(r) for r in rows)
            else:
                f.write(head + "\n\n| " + " | ".join(names) + " |\n|" + "---|" * len(names) + "\n")
                for r in rows:
                    f.write("| " + " | ".join(fmt(r)) + " |\n")
        log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
