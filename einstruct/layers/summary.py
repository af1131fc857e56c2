"""summary(): per-layer parameters and forward FLOPs of a model's linear-like layers, as a printable table."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .. import rules
from ..errors import SpecError
from .linear import StructuredLinear
from .matmuls import fans, is_linear
from .moe import MOE_LAYERS, BTTMoE


@dataclass(frozen=True)
class LayerRow:
    """One linear-like layer: weight parameters (cores or the matrix; no bias, no gains) and forward FLOPs per
    example on its two paths, whatever the grad mode the summary is made in.

    ``flops``: the training forward (and every no-grad batch outside ``es.inference_cache``);
    ``inference_flops``: a no-grad batch of at most ``dense_rows`` rows inside ``es.inference_cache`` (the
    materialised matrix where the layer has one, else the same as ``flops``); ``projection_error``: for a
    layer made with ``init="project"`` (or es.from_dense), the relative error ``||W - M||_F / ||W||_F`` of
    its matrix M against the pretrained W it was projected from; None otherwise.
    """

    name: str
    kind: str
    in_features: int
    out_features: int
    params: int
    flops: int
    inference_flops: int
    projection_error: float | None = None


@dataclass(frozen=True)
class ModelSummary:
    """The linear-like layers of a model with their costs; ``baseline`` adds ratio columns (this / baseline)."""

    rows: tuple[LayerRow, ...]
    model_params: int  # every parameter of the model, biases and norms included
    baseline: ModelSummary | None = None

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def flops(self) -> int:
        return sum(r.flops for r in self.rows)

    @property
    def inference_flops(self) -> int:
        return sum(r.inference_flops for r in self.rows)

    def row(self, name: str) -> LayerRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no linear layer named {name!r}")

    def __str__(self) -> str:
        base = {r.name: r for r in self.baseline.rows} if self.baseline is not None else None
        head = ["layer", "kind", "in", "out", "params", "flops/ex", "inference*"] + (
            ["params x", "flops x"] if base else []
        )
        body = []
        for r in self.rows:
            line = [
                r.name,
                r.kind,
                str(r.in_features),
                str(r.out_features),
                f"{r.params:,}",
                f"{r.flops:,}",
                f"{r.inference_flops:,}",
            ]
            if base is not None:
                b = base.get(r.name)
                line += [_ratio(r.params, b.params), _ratio(r.flops, b.flops)] if b else ["-", "-"]
            body.append(line)
        total = ["total", "", "", "", f"{self.params:,}", f"{self.flops:,}", f"{self.inference_flops:,}"]
        if base is not None:
            total += [_ratio(self.params, self.baseline.params), _ratio(self.flops, self.baseline.flops)]
        if any(r.projection_error is not None for r in self.rows):  # projected layers: their relative error
            head.append("proj err")
            for r, line in zip(self.rows, body):
                line.append("-" if r.projection_error is None else f"{r.projection_error:.3g}")
            total.append("")
        widths = [max(len(row[i]) for row in [head, *body, total]) for i in range(len(head))]
        fmt = lambda row: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        rule = "-" * len(fmt(head))
        lines = [fmt(head), rule, *map(fmt, body), rule, fmt(total)]
        lines.append(
            "flops/ex: forward FLOPs per example in training (and in inference outside es.inference_cache); "
            "inference*: a no-grad batch of at most dense_rows rows inside es.inference_cache"
            + ("; proj err: ||W - M||_F / ||W||_F of a projected layer" if "proj err" in head else "")
        )
        lines.append(f"model parameters (all, biases and norms included): {self.model_params:,}")
        if self.baseline is not None:
            lines[-1] += f" ({_ratio(self.model_params, self.baseline.model_params)} of baseline)"
        return "\n".join(lines)


def _ratio(a: int, b: int) -> str:
    return f"{a / b:.3g}x" if b else "-"


def summary(model: nn.Module, baseline: ModelSummary | None = None) -> ModelSummary:
    """Per-layer params and forward FLOPs per example of every nn.Linear and StructuredLinear in ``model``."""
    if not isinstance(model, nn.Module):
        raise SpecError(f"summary() needs an nn.Module, got {type(model).__name__}")
    if baseline is not None and not isinstance(baseline, ModelSummary):
        raise SpecError(
            f"baseline must be the ModelSummary of another model (es.summary(other)), got {type(baseline).__name__}"
        )
    rows = []
    inside: set[int] = set()
    for name, m in model.named_modules():
        name = _clean(name)
        if id(m) in inside:
            continue
        if isinstance(m, MOE_LAYERS):  # one row; its router and experts are in it
            inside.update(id(c) for c in m.modules() if c is not m)
            kind = (
                f"btt_moe(E={m.num_experts},k={m.active},{m.dispatch})"
                if isinstance(m, BTTMoE)
                else f"moe(E={m.num_experts},k={m.active},{m.dispatch})"
            )
            rows.append(LayerRow(name, kind, m.in_features, m.out_features, m.params, int(m.flops(1)), int(m.flops(1))))
        elif isinstance(m, StructuredLinear):
            st = m.structure
            kind = st.spec.label or st.spec.einsum
            rows.append(
                LayerRow(
                    name,
                    kind,
                    m.in_features,
                    m.out_features,
                    st.params,
                    m.flops(1, training=True),
                    m.flops(1, training=False, cached=True),
                    getattr(m, "projection_error", None),
                )
            )
        elif is_linear(m):  # nn.Linear or GPT-2's Conv1D
            d_in, d_out = fans(m)
            f = rules.dense_flops(1, d_in, d_out)
            rows.append(LayerRow(name, "dense", d_in, d_out, d_in * d_out, f, f))
    total = sum(p.numel() for p in model.parameters())
    return ModelSummary(rows=tuple(rows), model_params=total, baseline=baseline)


def _clean(name: str) -> str:
    """A module name without torch.compile's '_orig_mod.' segments."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")
