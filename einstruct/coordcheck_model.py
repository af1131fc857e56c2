"""coord_check on the user's own model: per-layer activation size and per-step change across widths.

    res = es.coord_check(make_model, widths=(64, 128, 256), data=batches, loss_fn=F.cross_entropy, out="cc")
    str(res)                   # a table per rate rule: one row per layer, one column per width
    # cc/coord_check.csv and cc/coord_check.png (mup's coord-check plot: size against width, log-log)

For each width, ``make_model(width)`` is built under a fixed seed and trained for ``steps`` steps on the
first ``steps`` batches of ``data`` (iterated once and reused for every width; cycled when shorter) with
``loss_fn(model(x), y)``, twice: with the muP rates of :func:`einstruct.param_groups` (structure-aware,
kappa per core) and with the naive rates (each core gets its layer's dense multiplier). The base model
is ``make_model(base_width)`` on the meta device. A forward hook on every matmul layer (nn.Linear,
Conv1D, StructuredLinear, MoE layers) and embedding records its output on a fixed probe batch (the first
batch's ``x``) before training and after each step: ``act`` is the RMS of that output at init, ``delta``
the mean over the steps of the RMS of its per-step change. Under muP both stay about flat across width
for every layer; the naive rates let ``delta`` shrink with width for structured layers (THEORY 4).
"""

from __future__ import annotations

import csv
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import SpecError

RATES = ("structure-aware", "naive")
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


@dataclass(frozen=True)
class ModelCoordCheck:
    """Per-layer RMS of the probe activations (``act``) and of their per-step change (``delta``), indexed
    ``[rates][layer][width]`` with rates in :data:`RATES` order."""

    widths: tuple[int, ...]
    layers: tuple[str, ...]
    act: tuple[tuple[tuple[float, ...], ...], ...]
    delta: tuple[tuple[tuple[float, ...], ...], ...]
    steps: int
    lr: float
    base_width: int
    optimizer: str

    def spread(self, layer: str, rates: str = "structure-aware") -> float:
        """max / min over widths of ``delta`` for one layer (1: a width-independent update)."""
        row = self.delta[RATES.index(rates)][self.layers.index(layer)]
        return max(row) / min(row) if min(row) > 0 else math.inf

    def ratio(self, layer: str, rates: str = "structure-aware") -> float:
        """``delta`` at the largest width over ``delta`` at the smallest."""
        row = self.delta[RATES.index(rates)][self.layers.index(layer)]
        return row[-1] / row[0] if row[0] > 0 else math.inf

    def rows(self) -> list[dict]:
        """One dict per (rates, layer, width): the CSV's rows."""
        out = []
        for r, rates in enumerate(RATES):
            for i, layer in enumerate(self.layers):
                for j, w in enumerate(self.widths):
                    out.append(
                        {
                            "rates": rates,
                            "layer": layer,
                            "width": w,
                            "act": self.act[r][i][j],
                            "delta": self.delta[r][i][j],
                        }
                    )
        return out

    def __str__(self) -> str:
        name_w = max(len("layer"), *map(len, self.layers))
        lines = [
            f"coord check on the model: {self.optimizer} lr {self.lr:g} at width {self.base_width}, "
            f"{self.steps} steps; rms of each layer's per-step output change on a probe batch (delta)"
        ]
        for r, rates in enumerate(RATES):
            lines.append(f"{rates} rates")
            lines.append(f"{'layer':<{name_w}}  " + "  ".join(f"{w:>9}" for w in self.widths) + "  last/first")
            for i, layer in enumerate(self.layers):
                row = self.delta[r][i]
                last = f"{row[-1] / row[0]:.3f}" if row[0] > 0 else "-"
                lines.append(f"{layer:<{name_w}}  " + "  ".join(f"{v:>9.3g}" for v in row) + f"  {last:>10}")
        return "\n".join(lines)

    def write(self, out) -> tuple[Path, Path]:
        """Write ``coord_check.csv`` and ``coord_check.png`` into the directory ``out``; returns their paths."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        table = out / "coord_check.csv"
        with table.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["rates", "layer", "width", "act", "delta"])
            w.writeheader()
            w.writerows(self.rows())
        plot = out / "coord_check.png"
        self._plot(plot)
        return table, plot

    def _plot(self, path: Path) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(10, 7), tight_layout=True)
        FigureCanvasAgg(fig)
        axes = fig.subplots(2, len(RATES), sharex=True, squeeze=False)
        for r, rates in enumerate(RATES):
            for row, (what, data) in enumerate(
                (("activation rms at init", self.act), ("rms per-step change", self.delta))
            ):
                ax = axes[row][r]
                for i, layer in enumerate(self.layers):
                    if min(data[r][i]) > 0:  # a zero (frozen layer, zero-initialised head) has no log scale
                        ax.plot(self.widths, data[r][i], marker="o", label=layer)
                    else:
                        ax.plot([], [], marker="o", label=f"{layer} (0 at some width)")
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_title(f"{rates} rates: {what}", fontsize=9)
                ax.set_xlabel("width")
        axes[0][0].legend(fontsize=7)
        fig.savefig(path, dpi=90)


def _probe_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from .layers.linear import StructuredLinear
    from .layers.matmuls import is_linear
    from .layers.moe import MOE_LAYERS

    out, inside = [], set()
    for name, m in model.named_modules():
        if id(m) in inside:
            continue
        if isinstance(m, (StructuredLinear, *MOE_LAYERS)) or is_linear(m) or isinstance(m, nn.Embedding):
            inside.update(id(c) for c in m.modules() if c is not m)
            out.append((name, m))
    return out


def _check(widths, steps, lr, optimizer, loss_fn):
    ws = tuple(widths)
    if not ws or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in ws):
        raise SpecError(f"widths must be positive integers, got {widths!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise SpecError(f"steps must be a positive integer, got {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise SpecError(f"lr must be a positive number, got {lr!r}")
    if optimizer not in OPTIMIZERS:
        raise SpecError(f"optimizer {optimizer!r} is not known; use one of {', '.join(OPTIMIZERS)}")
    if not callable(loss_fn):
        raise SpecError("coord_check(make_model, ...) needs loss_fn=, a callable (output, y) -> scalar loss")
    return ws


def coord_check_model(
    make_model,
    widths=(64, 128, 256, 512),
    *,
    data,
    loss_fn,
    steps: int = 10,
    lr: float = 1e-2,
    base_width: int | None = None,
    optimizer: str = "adam",
    out=None,
    seed: int = 0,
) -> ModelCoordCheck:
    """Run the coordinate check on ``make_model(width) -> nn.Module`` (see the module docstring).

    ``data``: an iterable of ``(x, y)`` batches; ``loss_fn(model(x), y)`` a scalar; ``base_width``: the
    width the rates are relative to (default: the smallest; es.coord_check passes its own default, 64);
    ``out``: a directory for the CSV table and the PNG plot (none written when None).
    """
    ws = _check(widths, steps, lr, optimizer, loss_fn)
    base_width = ws[0] if base_width is None else base_width
    try:
        batches = list(itertools.islice(iter(data), steps))
    except TypeError:
        raise SpecError(f"data must be an iterable of (x, y) batches, got {type(data).__name__}") from None
    if not batches or any(not (isinstance(b, (tuple, list)) and len(b) == 2) for b in batches):
        raise SpecError("data must yield (x, y) pairs, e.g. a list of (inputs, targets) tensors or a DataLoader")
    batches = list(itertools.islice(itertools.cycle(batches), steps))
    with torch.device("meta"):
        base = make_model(base_width)
    act: list = [None] * len(RATES)
    delta: list = [None] * len(RATES)
    names: tuple[str, ...] | None = None
    for r, rates in enumerate(RATES):
        per_width = []
        for w in ws:
            layer_names, a, d = _run(
                make_model, w, base, rates == RATES[0], batches, loss_fn, steps, lr, optimizer, seed
            )
            if names is None:
                names = layer_names
            elif layer_names != names:
                raise SpecError(
                    f"make_model({w}) has the layers {list(layer_names)}, make_model({ws[0]}) {list(names)}; the "
                    "architecture must have the same module names at every width"
                )
            per_width.append((a, d))
        act[r] = [tuple(per_width[j][0][i] for j in range(len(ws))) for i in range(len(names))]
        delta[r] = [tuple(per_width[j][1][i] for j in range(len(ws))) for i in range(len(names))]
    res = ModelCoordCheck(
        widths=ws,
        layers=names,
        act=tuple(tuple(x) for x in act),
        delta=tuple(tuple(x) for x in delta),
        steps=steps,
        lr=float(lr),
        base_width=base_width,
        optimizer=optimizer,
    )
    if out is not None:
        res.write(out)
    return res


def _run(make_model, w, base, structured, batches, loss_fn, steps, lr, optimizer, seed):
    """Train make_model(w) for ``steps``: (layer names, RMS of each output at init, mean RMS of its change)."""
    from .mup import assign, groups

    with torch.random.fork_rng(devices=[]):  # the init is seeded without touching the caller's RNG
        torch.manual_seed(seed)
        model = make_model(w)
    if not isinstance(model, nn.Module):
        raise SpecError(f"make_model({w}) returned {type(model).__name__}, not an nn.Module")
    layers = _probe_layers(model)
    if not layers:
        raise SpecError(f"make_model({w}) has no linear layer or embedding to measure")
    dev = next(iter(model.parameters())).device
    moved = [tuple(t.to(dev) if isinstance(t, torch.Tensor) else t for t in b) for b in batches]
    probe = moved[0][0]
    seen: dict[str, torch.Tensor] = {}

    def keep(name, out):
        t = out if isinstance(out, torch.Tensor) else next((o for o in out if isinstance(o, torch.Tensor)), None)
        if t is not None:
            seen[name] = t.detach()

    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: keep(name, out)) for name, m in layers]
    opt = OPTIMIZERS[optimizer](
        groups(model, assign(model, base, optimizer=optimizer, structured=structured), lr, None)
    )

    def measure() -> dict[str, torch.Tensor]:
        seen.clear()
        was = model.training
        model.eval()
        with torch.no_grad():
            model(probe)
        model.train(was)
        return {n: seen[n].float() for n, _ in layers if n in seen}

    try:
        prev = measure()
        act = [float(prev[n].pow(2).mean().sqrt()) if n in prev else 0.0 for n, _ in layers]
        total = [0.0] * len(layers)
        model.train()
        for x, y in moved:
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            now = measure()
            for i, (n, _) in enumerate(layers):
                if n in now and n in prev:
                    total[i] += float((now[n] - prev[n]).pow(2).mean().sqrt())
            prev = now
    finally:
        for h in hooks:
            h.remove()
    return tuple(n for n, _ in layers), act, [t / steps for t in total]
