"""Whole-model tools: structure() swaps nn.Linear modules for StructuredLinear; summary() tabulates them.

    model = es.structure(model, es.presets.btt(rank=1), select="all_but_last")
    before = es.summary(dense_model); print(es.summary(model, baseline=before))

``select`` picks the nn.Linear modules to replace, in module registration order:

- ``"all"``, ``"all_but_last"`` (keep the last nn.Linear, usually the output head), ``"intermediate"``
  (keep the first and the last);
- a glob pattern on the qualified module name (``"blocks.*.mlp.*"``, :func:`fnmatch.fnmatchcase`) or a
  compiled regex (``re.compile(r"blocks\\.\\d+\\.attn\\..*")``, must match the whole name);
- a callable ``(name, module) -> bool | Spec | str | None``: True uses ``spec``, a Spec (or a preset
  name) gives that layer its own structure, False or None keeps the layer dense.

nn.Linear modules owned by nn.MultiheadAttention are never replaced (it reads their weights directly),
and neither are the routers of MoE layers or anything inside a BTTMoE.

``moe=`` (an :class:`einstruct.MoEConfig`, a dict of its fields, or the number of experts) replaces each
selected layer with an MoE layer instead: a :class:`einstruct.BTTMoE` (``kind='btt'``, the default; spec
must be None, 'btt' or btt(rank=1)) or an :class:`einstruct.MoE` of FFNs whose linears have ``spec``
(``kind='ffn'``; None for dense experts):

    model = es.structure(model, "btt", select="all_but_last", moe=dict(experts=8, active=2, dispatch="sparse"))
"""

from __future__ import annotations

import fnmatch
import inspect
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Union

import torch
from torch import nn

from .. import presets
from ..errors import SpecError
from ..spec import Spec
from .linear import StructuredLinear
from .moe import MOE_LAYERS, BTTMoE, MoE, MoEConfig, is_btt_expert_spec

log = logging.getLogger(__name__)

MODES = ("all", "all_but_last", "intermediate")
Select = Union[str, "re.Pattern[str]", Callable[[str, nn.Module], object]]
_SELECT_HELP = (
    "select must be 'all', 'all_but_last', 'intermediate', a glob pattern on module names such as "
    "'blocks.*.mlp.*', a compiled regex, or a callable(name, module) returning a bool, a Spec or None"
)


def structure(model: nn.Module, spec, select: Select = "all", *, copy_weights: bool = False, moe=None,
              **layer_kwargs):
    """Replace the selected nn.Linear modules of ``model`` with StructuredLinear, in place; returns the model.

    New layers keep the device, dtype, bias presence, training mode and requires_grad of the layers they
    replace. Weights are not copied unless ``copy_weights=True`` (then the closest structured matrix,
    :func:`einstruct.from_dense`). A layer whose weight is all zeros is replaced with ``zero_init=True``.
    Every replacement is built before any is swapped in, so an error leaves the model unchanged.
    ``layer_kwargs`` go to StructuredLinear (or to the MoE layer with ``moe=``). If ``model`` itself is a
    selected nn.Linear, the new layer is returned instead.
    """
    if not isinstance(model, nn.Module):
        raise SpecError(f"structure() needs an nn.Module, got {type(model).__name__}")
    cfg = None if moe is None else MoEConfig.of(moe)
    _check_layer_kwargs(layer_kwargs, cfg)
    if cfg is not None and copy_weights:
        raise SpecError("copy_weights=True cannot be combined with moe=: an MoE layer has no single matrix to "
                        "project onto; drop one of them")
    if cfg is not None and cfg.kind == "btt":
        if not is_btt_expert_spec(spec):
            raise SpecError(_BTT_ONLY.format(got=_spec_name(spec)))
        default = presets.btt(rank=1)
    elif cfg is not None:
        default = presets.dense() if spec is None else _as_spec(spec, "spec")
    else:
        default = None if spec is None else _as_spec(spec, "spec")
    chosen = _select(_linears(model), default, select)
    built: dict[int, nn.Module] = {}
    for name, lin, sp in chosen:
        if cfg is None:
            built[id(lin)] = _replacement(name or "<root>", lin, sp, copy_weights, layer_kwargs)
        else:
            built[id(lin)] = _moe_replacement(name or "<root>", lin, sp, cfg, layer_kwargs)
    if id(model) in built:
        return built[id(model)]
    for parent in model.modules():
        for key, child in list(parent._modules.items()):
            if child is not None and id(child) in built:
                parent._modules[key] = built[id(child)]
    log.info("structure(): replaced %d nn.Linear modules", len(built))
    return model


_BTT_ONLY = ("moe= with kind 'btt' makes each layer a BTT-MoE, whose experts are rank-1 BTTs, so spec must be None, "
             "'btt' or es.presets.btt(rank=1); got {got}. For experts of another structure use "
             "moe=dict(kind='ffn', ...) (an es.MoE of FFNs with that spec)")


def _spec_name(spec) -> str:
    return repr(getattr(spec, "label", None) or getattr(spec, "einsum", None) or spec)


def _check_layer_kwargs(kwargs: dict, cfg: MoEConfig | None = None) -> None:
    if cfg is None:
        cls, fixed = StructuredLinear, {"self", "in_features", "out_features", "spec", "bias"}
    elif cfg.kind == "btt":
        cls, fixed = BTTMoE, {"self", "d_in", "d_out", "experts", "active", "bias", "dispatch"}
    else:  # MoE passes its extra keywords on to StructuredLinear experts
        params = set(inspect.signature(MoE.__init__).parameters) | set(
            inspect.signature(StructuredLinear.__init__).parameters)
        fixed = {"self", "d_in", "d_out", "experts", "active", "bias", "dispatch", "hidden", "spec", "in_features",
                 "out_features", "expert_kwargs"}
        for key in kwargs:
            if key in fixed or key not in params:
                raise SpecError(f"structure() got an unknown layer argument {key!r} for moe kind 'ffn'; it takes "
                                f"{', '.join(sorted(params - fixed))}")
        return
    params = inspect.signature(cls.__init__).parameters
    for key in kwargs:
        if key in fixed or key not in params:
            allowed = ", ".join(p for p in params if p not in fixed)
            raise SpecError(f"structure() got an unknown layer argument {key!r}; {cls.__name__} takes {allowed}")


def _as_spec(value, what: str) -> Spec:
    if isinstance(value, Spec):
        return value
    if isinstance(value, str):
        from .. import presets

        return presets.get(value)
    raise SpecError(
        f"{what} must be an es.Spec or a preset name such as 'btt', got {type(value).__name__}; "
        "build one with es.presets.btt(rank=1) or es.Spec('ga,gaf,fge->fe', ...)"
    )


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear modules in registration order, minus those owned by nn.MultiheadAttention, MoE routers
    and anything inside a BTTMoE."""
    skip = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            skip.update(id(c) for c in m.modules() if c is not m)
            log.debug("structure(): keeping the projections of nn.MultiheadAttention %r dense", name)
        elif isinstance(m, BTTMoE):
            skip.update(id(c) for c in m.modules() if c is not m)
        elif isinstance(m, MoE):
            skip.add(id(m.router))
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) not in skip]


def _select(linears, default: Spec | None, select) -> list[tuple[str, nn.Linear, Spec]]:
    names = [n for n, _ in linears]

    def need_default(name: str) -> Spec:
        if default is None:
            raise SpecError(f"module {name!r} was selected but spec is None; give a spec, or return one from select")
        return default

    if isinstance(select, str) and select in MODES:
        keep = {"all": linears, "all_but_last": linears[:-1], "intermediate": linears[1:-1]}[select]
        return [(n, m, need_default(n)) for n, m in keep]
    if isinstance(select, (str, re.Pattern)):
        if isinstance(select, str):
            hits = [(n, m) for n, m in linears if fnmatch.fnmatchcase(n, select)]
        else:
            hits = [(n, m) for n, m in linears if select.fullmatch(n)]
        if not hits:
            shown = ", ".join(repr(n) for n in names[:8]) + (", ..." if len(names) > 8 else "")
            pat = select if isinstance(select, str) else select.pattern
            raise SpecError(
                f"select {pat!r} matches no nn.Linear module (names are {shown or 'none'}); "
                f"fix the pattern, or use one of {', '.join(MODES)}"
            )
        return [(n, m, need_default(n)) for n, m in hits]
    if callable(select):
        out = []
        for n, m in linears:
            got = select(n, m)
            if got is None or got is False:
                continue
            if got is True:
                out.append((n, m, need_default(n)))
            elif isinstance(got, (Spec, str)):
                out.append((n, m, _as_spec(got, f"select({n!r}, ...)")))
            else:
                raise SpecError(
                    f"select({n!r}, module) returned {type(got).__name__}; return True/False, None or a Spec"
                )
        return out
    raise SpecError(f"{_SELECT_HELP}; got {type(select).__name__}")


def _source(name: str, lin: nn.Linear, kwargs: dict) -> tuple[torch.Tensor, dict, bool, str]:
    """The replaced layer's weight, the new module's keyword arguments (its device and dtype unless given),
    whether the weight is all zeros (then the new module is zero-initialised), and a name for errors."""
    if isinstance(lin, nn.modules.lazy.LazyModuleMixin) and lin.has_uninitialized_params():
        raise SpecError(f"module {name!r} is an uninitialised LazyLinear; run one forward pass before structure()")
    w = lin.weight
    kw = dict(kwargs)
    kw.setdefault("device", w.device)
    kw.setdefault("dtype", w.dtype)
    zero = not w.is_meta and not bool(torch.any(w != 0))
    return w, kw, zero, f"module {name!r} (Linear {lin.in_features} -> {lin.out_features})"


def _like(new: nn.Module, lin: nn.Linear) -> nn.Module:
    """``new`` in ``lin``'s training mode, frozen if ``lin``'s weight was."""
    new.train(lin.training)
    if not lin.weight.requires_grad:
        new.requires_grad_(False)
    return new


def _replacement(name: str, lin: nn.Linear, spec: Spec, copy_weights: bool, kwargs: dict) -> nn.Module:
    w, kw, zero, what = _source(name, lin, kwargs)
    try:
        if copy_weights and not zero:
            if w.is_meta:
                raise SpecError("copy_weights=True needs real weights, but they are on the meta device")
            from .projection import from_dense

            new = from_dense(w, spec, bias=lin.bias, **kw)
        else:
            if zero:
                kw["zero_init"] = True
            new = StructuredLinear(lin.in_features, lin.out_features, spec, bias=lin.bias is not None, **kw)
            if copy_weights and lin.bias is not None:
                with torch.no_grad():
                    new.bias.copy_(lin.bias)
    except SpecError as e:
        raise SpecError(f"cannot structure {what} with {spec.label or spec.einsum}: {e}") from e
    return _like(new, lin)


def _moe_replacement(name: str, lin: nn.Linear, spec: Spec, cfg: MoEConfig, kwargs: dict) -> nn.Module:
    _, kw, zero, what = _source(name, lin, kwargs)
    if zero:
        kw["zero_init"] = True
    common = dict(experts=cfg.experts, active=cfg.active, bias=lin.bias is not None, dispatch=cfg.dispatch)
    try:
        if cfg.kind == "btt":
            if not is_btt_expert_spec(spec):
                raise SpecError(_BTT_ONLY.format(got=_spec_name(spec)))
            new = BTTMoE(lin.in_features, lin.out_features, **common, **kw)
        else:
            new = MoE(lin.in_features, lin.out_features, hidden=cfg.hidden_ratio * lin.in_features, spec=spec,
                      **common, **kw)
    except SpecError as e:
        raise SpecError(f"cannot make {what} a {cfg.label}: {e}") from e
    return _like(new, lin)


# ---- summary ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerRow:
    """One linear-like layer: weight parameters (cores or the matrix; no bias, no gains) and forward FLOPs per
    example on its two paths, whatever the grad mode the summary is made in.

    ``flops``: the training forward (and every no-grad batch outside ``es.inference_cache``);
    ``inference_flops``: a no-grad batch of at most ``dense_rows`` rows inside ``es.inference_cache`` (the
    materialised matrix where the layer has one, else the same as ``flops``).
    """

    name: str
    kind: str
    in_features: int
    out_features: int
    params: int
    flops: int
    inference_flops: int


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
            ["params x", "flops x"] if base else [])
        body = []
        for r in self.rows:
            line = [r.name, r.kind, str(r.in_features), str(r.out_features), f"{r.params:,}", f"{r.flops:,}",
                    f"{r.inference_flops:,}"]
            if base is not None:
                b = base.get(r.name)
                line += [_ratio(r.params, b.params), _ratio(r.flops, b.flops)] if b else ["-", "-"]
            body.append(line)
        total = ["total", "", "", "", f"{self.params:,}", f"{self.flops:,}", f"{self.inference_flops:,}"]
        if base is not None:
            total += [_ratio(self.params, self.baseline.params), _ratio(self.flops, self.baseline.flops)]
        widths = [max(len(row[i]) for row in [head, *body, total]) for i in range(len(head))]
        fmt = lambda row: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        rule = "-" * len(fmt(head))
        lines = [fmt(head), rule, *map(fmt, body), rule, fmt(total)]
        lines.append("flops/ex: forward FLOPs per example in training (and in inference outside es.inference_cache); "
                     "inference*: a no-grad batch of at most dense_rows rows inside es.inference_cache")
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
            kind = (f"btt_moe(E={m.num_experts},k={m.active},{m.dispatch})" if isinstance(m, BTTMoE)
                    else f"moe(E={m.num_experts},k={m.active},{m.dispatch})")
            rows.append(LayerRow(name, kind, m.in_features, m.out_features, m.params, int(m.flops(1)),
                                 int(m.flops(1))))
        elif isinstance(m, StructuredLinear):
            st = m.structure
            kind = st.spec.label or st.spec.einsum
            rows.append(LayerRow(name, kind, m.in_features, m.out_features, st.params,
                                 m.flops(1, training=True), m.flops(1, training=False, cached=True)))
        elif isinstance(m, nn.Linear):
            rows.append(LayerRow(name, "dense", m.in_features, m.out_features, m.in_features * m.out_features,
                                 2 * m.in_features * m.out_features, 2 * m.in_features * m.out_features))
    total = sum(p.numel() for p in model.parameters())
    return ModelSummary(rows=tuple(rows), model_params=total, baseline=baseline)


def _clean(name: str) -> str:
    """A module name without torch.compile's '_orig_mod.' segments."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")
