"""Forward+backward time of StructuredLinear against nn.Linear and a two-einsum layer of the same structure.

The einsum baseline is the reference papers' approach: one ``torch.einsum`` per core, in spec order, on
the same parameter tensors. All three run side by side in one process, repeats interleaved, median time
reported with GFLOP/s of the training step (forward + backward with an input that needs a gradient:
3 x the forward FLOPs) and the ratios einsum/structured and dense/structured (above 1: structured faster).

    python -m benchmarks.layers_vs_einsum                 # d = 1024, 2048; batch 1024; float32
    python -m benchmarks.layers_vs_einsum --dims 512 --repeats 5 --threads 1   # or --device cuda
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from torch import nn

import einstruct as es
from einstruct import plan

STRUCTURES = {
    "btt r=1": lambda: es.presets.btt(rank=1),
    "btt r=2": lambda: es.presets.btt(rank=2),
    "btt r=4": lambda: es.presets.btt(rank=4),
    "monarch 4": lambda: es.presets.monarch(blocks=4),
    "low_rank r=64": lambda: es.presets.low_rank(rank=64),
    "kron": lambda: es.presets.kron(),
}


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


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(modules: dict, x: torch.Tensor, repeats: int, warmup: int = 2) -> dict:
    """Median seconds of forward+backward per module, repeats interleaved across modules in shuffled order."""
    grad = torch.randn(x.shape[0], next(iter(modules.values()))(x).shape[-1], device=x.device)

    def step(m):
        xi = x.detach().requires_grad_(True)
        m(xi).backward(grad)

    times = {k: [] for k in modules}
    for _ in range(warmup):
        for m in modules.values():
            step(m)
    keys, rng = list(modules), random.Random(0)
    for _ in range(repeats):
        rng.shuffle(keys)  # no module always runs right after another (whose memory traffic it inherits)
        for k in keys:
            m = modules[k]
            _sync(x.device)
            t0 = time.perf_counter()
            step(m)
            _sync(x.device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else args.device)
    torch.manual_seed(0)
    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch} float32 forward+backward")
    header = f"{'d':>5} {'structure':<14} {'struct ms':>9} {'einsum ms':>9} {'dense ms':>9} " \
             f"{'ein/str':>7} {'dense/str':>9} {'str GF/s':>8} {'ein GF/s':>8} {'dense GF/s':>10}"
    print(header)
    for d in args.dims:
        x = torch.randn(args.batch, d, device=device)
        dense = nn.Linear(d, d, device=device)
        for label, make in STRUCTURES.items():
            layer = es.StructuredLinear(d, d, make(), device=device)
            ein = EinsumChain(layer)
            with torch.no_grad():  # same function: sanity check before timing
                err = (layer(x) - ein(x)).abs().max().item()
            if err > 1e-3:
                raise RuntimeError(f"{label} at d={d}: einsum and StructuredLinear differ by {err}")
            t = measure({"str": layer, "ein": ein, "dense": dense}, x, args.repeats)
            flops = layer.structure.flops
            gf = {k: 3 * f * args.batch / t[k] / 1e9 for k, f in (("str", flops), ("ein", flops), ("dense", 2 * d * d))}
            print(
                f"{d:>5} {label:<14} {t['str'] * 1e3:>9.2f} {t['ein'] * 1e3:>9.2f} {t['dense'] * 1e3:>9.2f} "
                f"{t['ein'] / t['str']:>7.2f} {t['dense'] / t['str']:>9.2f} "
                f"{gf['str']:>8.1f} {gf['ein']:>8.1f} {gf['dense']:>10.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
