"""Whole-model tools: structure() swaps linear layers for StructuredLinear (summary() tabulates them).

    model = es.structure(model, es.presets.btt(rank=1))          # every linear layer but the output head
    before = es.summary(dense_model); print(es.summary(model, baseline=before))

structure() replaces ``nn.Linear`` modules and GPT-2 style ``Conv1D`` modules (Hugging Face transformers'
``transformers.pytorch_utils.Conv1D``, or any module of that class name with an int ``nf`` and a weight of
shape (nx, nf), applied as ``x @ weight + bias``: its weight is stored transposed).

``select`` picks among the model's *matmul layers*, in module registration order: every nn.Linear and
Conv1D, plus the modules that compute a matmul from a weight of their own in a way structure() cannot
replace (nn.MultiheadAttention with its packed ``in_proj_weight``, recurrent layers, and unknown modules
with a 2-D ``*weight*`` parameter). Embeddings, norms and already structured layers are not matmul
layers. ``select`` is:

- ``"all_but_last"`` (the default: keep the last matmul layer, the output head, dense, as THEORY 4's muP
  setup does), ``"all"``, ``"intermediate"`` (keep the first and the last);
- a glob pattern on the qualified module name (``"blocks.*.mlp.*"``, :func:`fnmatch.fnmatchcase`) or a
  compiled regex (``re.compile(r"blocks\\.\\d+\\.attn\\..*")``, must match the whole name);
- a callable ``(name, module) -> bool | Spec | str | None``, called for each nn.Linear and Conv1D module
  (a Conv1D has ``nx``/``nf``, not ``in_features``/``out_features``): True uses ``spec``, a Spec (or a
  preset name) gives that layer its own structure, False or None keeps the layer dense.

What the selection matches but structure() leaves dense is named in one ``UserWarning``:

- modules it cannot replace (above); the nn.Linear modules inside nn.MultiheadAttention are never
  replaced (it reads their weights directly), and neither are the routers of MoE layers or anything
  inside a BTTMoE (those are kept dense on purpose, without a warning);
- layers whose weight (or bias) is tied to another module's parameter, such as a language-model head
  sharing the token embedding (Hugging Face ``tie_word_embeddings=True``): replacing one would silently
  untie it. ``tied="untie"`` replaces them anyway: the new layer gets its own structured weights and the
  other module keeps the old parameter, so the two train apart from then on.

Layers that the selection keeps dense on purpose (the head under ``"all_but_last"``, names a pattern does
not match, a callable's False) are not warned about; only when a mode keeps every matmul layer of the
model (a model with a single linear layer) does structure() warn that it replaced nothing. A model that is
itself an nn.Linear or Conv1D is replaced under every mode.

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
import warnings
from collections.abc import Callable
from typing import Union

import torch
from torch import nn

from .. import presets
from ..errors import MemoryLimitError, SpecError
from ..spec import Spec
from . import record
from .linear import StructuredLinear
from .matmuls import _cannot, _ties, dense_weight, fans, is_conv1d, is_linear, matmul_layers  # noqa: F401 (re-exported)
from .moe import BTTMoE, MoE, MoEConfig, is_btt_expert_spec
from .summary import LayerRow, ModelSummary, summary  # noqa: F401  (re-exported: es.summary)

log = logging.getLogger(__name__)

MODES = ("all", "all_but_last", "intermediate")
TIED = ("skip", "untie")
Select = Union[str, "re.Pattern[str]", Callable[[str, nn.Module], object]]
_SELECT_HELP = (
    "select must be 'all', 'all_but_last', 'intermediate', a glob pattern on module names such as "
    "'blocks.*.mlp.*', a compiled regex, or a callable(name, module) returning a bool, a Spec or None"
)


def structure(
    model: nn.Module,
    spec,
    select: Select = "all_but_last",
    *,
    init: str | None = None,
    copy_weights: bool = False,
    tied: str = "skip",
    moe=None,
    **layer_kwargs,
):
    """Replace the selected nn.Linear and Conv1D modules of ``model`` with StructuredLinear, in place;
    returns the model (see the module docstring for ``select``, ``tied`` and the warnings).

    The default ``select="all_but_last"`` keeps the output head dense (THEORY 4: muP treats the head as
    a dense readout with its own rule; a structured head is a choice to make on purpose, with
    ``select="all"``). New layers keep the device, dtype, bias presence, training mode and requires_grad
    of the layers they replace. ``init="mup"`` (the default) draws fresh cores at their muP stds;
    ``init="project"`` sets each new layer to the closest structured matrix, :func:`einstruct.from_dense`,
    of the layer's pretrained (out, in) matrix (a Conv1D's weight is transposed first) and copies the bias,
    recording the relative error in ``layer.projection_error`` (es.summary shows it);
    ``copy_weights=True`` is the older name of ``init="project"``. A layer whose weight is all zeros is
    replaced with ``zero_init=True``. Every replacement is built before any is swapped in, so an error
    leaves the model unchanged. ``layer_kwargs`` go to StructuredLinear (or to the MoE layer with
    ``moe=``). If ``model`` itself is an nn.Linear or Conv1D, the new layer is returned instead.

    ``spec`` may be an :class:`einstruct.StructureConfig` holding every argument (then give no others).
    What was done is recorded on ``model`` (:mod:`einstruct.layers.record`) for :func:`einstruct.save`.
    """
    from ..config import StructureConfig, only_config, project_weights

    if isinstance(spec, StructureConfig):
        only_config(select=select != "all_but_last", init=init, copy_weights=copy_weights, tied=tied != "skip", moe=moe)
        only_config(**layer_kwargs)
        return structure(model, spec.resolved_spec(), **spec.structure_kwargs())
    copy_weights = project_weights(init, copy_weights)
    if not isinstance(model, nn.Module):
        raise SpecError(f"structure() needs an nn.Module, got {type(model).__name__}")
    if tied not in TIED:
        raise SpecError(
            f"tied must be 'skip' (leave weight-tied layers dense, with a warning) or 'untie' "
            f"(replace them, breaking the tie); got {tied!r}"
        )
    cfg = None if moe is None else MoEConfig.of(moe)
    _check_layer_kwargs(layer_kwargs, cfg)
    if cfg is not None and copy_weights:
        raise SpecError(
            "init='project' (copy_weights=True) cannot be combined with moe=: an MoE layer has no single "
            "matrix to project onto; drop one of them"
        )
    if cfg is not None and cfg.kind == "btt":
        if not is_btt_expert_spec(spec):
            raise SpecError(_BTT_ONLY.format(got=_spec_name(spec)))
        default = presets.btt(rank=1)
    elif cfg is not None:
        default = presets.dense() if spec is None else _as_spec(spec, "spec")
    else:
        default = None if spec is None else _as_spec(spec, "spec")
    layers = matmul_layers(model)
    chosen, unsupported, kept_all = _select(layers, default, select, model)
    ties = _ties(model)
    tied_left = []
    if tied == "skip":
        tied_left = [(n, ties[id(m)]) for n, m, _ in chosen if id(m) in ties]
        chosen = [(n, m, sp) for n, m, sp in chosen if id(m) not in ties]
    built: dict[int, nn.Module] = {}
    entries: dict[str, dict] = {}
    for name, lin, sp in chosen:
        if cfg is None:
            built[id(lin)] = _replacement(name or "<root>", lin, sp, copy_weights, layer_kwargs)
        else:
            built[id(lin)] = _moe_replacement(name or "<root>", lin, sp, cfg, layer_kwargs)
        entries[name] = record.entry(lin, built[id(lin)], sp, layer_kwargs, cfg)
    _warn(select, unsupported, tied_left, kept_all, layers)
    if tied == "untie":
        broken = [f"{n!r} (shared with {', '.join(map(repr, ties[id(m)]))})" for n, m, _ in chosen if id(m) in ties]
        if broken:
            log.info("structure(): tied='untie' broke the weight ties of %s", ", ".join(broken))
    if id(model) in built:
        record.attach(built[id(model)], entries)
        return built[id(model)]
    record.attach(model, entries)
    for parent in model.modules():
        for key, child in list(parent._modules.items()):
            if child is not None and id(child) in built:
                parent._modules[key] = built[id(child)]
    log.info("structure(): replaced %d linear layers", len(built))
    return model


def _warn(select, unsupported, tied_left, kept_all, layers) -> None:
    if unsupported:
        listed = "; ".join(f"{n or '<root>'!r} ({why})" for n, why in unsupported)
        warnings.warn(
            f"structure(): select={_select_name(select)} matched {len(unsupported)} module(s) that structure() "
            f"cannot replace, left dense: {listed}. To structure them, write them with nn.Linear layers (for "
            "attention: separate q, k, v and output nn.Linear projections); to silence this, select names "
            "that leave them out",
            UserWarning,
            stacklevel=3,
        )
    if tied_left:
        listed = "; ".join(f"{n or '<root>'!r} (shared with {', '.join(map(repr, others))})" for n, others in tied_left)
        warnings.warn(
            f"structure(): left {len(tied_left)} weight-tied layer(s) dense, since replacing them would silently "
            f"untie their parameters: {listed}. Pass tied='untie' to structure them anyway (each gets its own "
            "weights and the tie is broken), or leave them out of select to silence this",
            UserWarning,
            stacklevel=3,
        )
    if kept_all:
        names = ", ".join(repr(n) for n, _, _ in layers)
        warnings.warn(
            f"structure(): select={select!r} keeps {names} dense and the model has no other dense matmul layer "
            "(layers structured before do not count), so nothing was structured; use select='all' to structure "
            "them",
            UserWarning,
            stacklevel=3,
        )


def _select_name(select) -> str:
    if isinstance(select, re.Pattern):
        return f"re.compile({select.pattern!r})"
    return repr(select) if isinstance(select, str) else type(select).__name__


_BTT_ONLY = (
    "moe= with kind 'btt' makes each layer a BTT-MoE, whose experts are rank-1 BTTs, so spec must be None, "
    "'btt' or es.presets.btt(rank=1); got {got}. For experts of another structure use "
    "moe=dict(kind='ffn', ...) (an es.MoE of FFNs with that spec)"
)


def _spec_name(spec) -> str:
    return repr(getattr(spec, "label", None) or getattr(spec, "einsum", None) or spec)


def _check_layer_kwargs(kwargs: dict, cfg: MoEConfig | None = None) -> None:
    if cfg is None:
        cls, fixed = StructuredLinear, {"self", "in_features", "out_features", "spec", "bias"}
    elif cfg.kind == "btt":
        cls, fixed = BTTMoE, {"self", "d_in", "d_out", "experts", "active", "bias", "dispatch"}
    else:  # MoE passes its extra keywords on to StructuredLinear experts
        params = set(inspect.signature(MoE.__init__).parameters) | set(
            inspect.signature(StructuredLinear.__init__).parameters
        )
        fixed = {
            "self",
            "d_in",
            "d_out",
            "experts",
            "active",
            "bias",
            "dispatch",
            "hidden",
            "spec",
            "in_features",
            "out_features",
            "expert_kwargs",
        }
        for key in kwargs:
            if key in fixed or key not in params:
                raise SpecError(
                    f"structure() got an unknown layer argument {key!r} for moe kind 'ffn'; it takes "
                    f"{', '.join(sorted(params - fixed))}"
                )
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


def _select(layers, default: Spec | None, select, root: nn.Module):
    """(the chosen replaceable layers as (name, module, spec), the matched layers that cannot be replaced as
    (name, why), whether a mode kept every layer of a model that has some)."""
    names = [n for n, _, _ in layers]

    def need_default(name: str) -> Spec:
        if default is None:
            raise SpecError(f"module {name!r} was selected but spec is None; give a spec, or return one from select")
        return default

    def split(hits):
        ok = [(n, m, need_default(n)) for n, m, why in hits if why is None]
        return ok, [(n, why) for n, _, why in hits if why is not None]

    if isinstance(select, str) and select in MODES:
        if len(layers) == 1 and layers[0][1] is root:  # a bare layer has no head to keep
            return (*split(layers), False)
        hits = {"all": layers, "all_but_last": layers[:-1], "intermediate": layers[1:-1]}[select]
        kept_all = not hits and any(why is None for _, _, why in layers)
        return (*split(hits), kept_all)
    if isinstance(select, (str, re.Pattern)):
        if isinstance(select, str):
            hits = [x for x in layers if fnmatch.fnmatchcase(x[0], select)]
        else:
            hits = [x for x in layers if select.fullmatch(x[0])]
        if not hits:
            shown = ", ".join(repr(n) for n in names[:8]) + (", ..." if len(names) > 8 else "")
            pat = select if isinstance(select, str) else select.pattern
            raise SpecError(
                f"select {pat!r} matches no nn.Linear or Conv1D module (names are {shown or 'none'}); "
                f"fix the pattern, or use one of {', '.join(MODES)}"
            )
        return (*split(hits), False)
    if callable(select):
        out = []
        for n, m, why in layers:
            if why is not None:
                continue
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
        return out, [], False
    raise SpecError(f"{_SELECT_HELP}; got {type(select).__name__}")


def _source(name: str, lin: nn.Module, kwargs: dict) -> tuple[torch.Tensor, dict, bool, str]:
    """The replaced layer's (out, in) weight, the new module's keyword arguments (its device and dtype unless
    given), whether the weight is all zeros (then the new module is zero-initialised), and a name for errors."""
    if isinstance(lin, nn.modules.lazy.LazyModuleMixin) and lin.has_uninitialized_params():
        raise SpecError(f"module {name!r} is an uninitialised LazyLinear; run one forward pass before structure()")
    w = dense_weight(lin)
    kw = dict(kwargs)
    kw.setdefault("device", w.device)
    kw.setdefault("dtype", w.dtype)
    zero = not w.is_meta and not bool(torch.any(w != 0))
    d_in, d_out = fans(lin)
    kind = "Conv1D" if is_conv1d(lin) else "Linear"
    return w, kw, zero, f"module {name!r} ({kind} {d_in} -> {d_out})"


def _like(new: nn.Module, lin: nn.Module) -> nn.Module:
    """``new`` in ``lin``'s training mode, frozen if ``lin``'s weight was."""
    new.train(lin.training)
    if not lin.weight.requires_grad:
        new.requires_grad_(False)
    return new


def _replacement(name: str, lin: nn.Module, spec: Spec, copy_weights: bool, kwargs: dict) -> nn.Module:
    w, kw, zero, what = _source(name, lin, kwargs)
    d_in, d_out = fans(lin)
    bias = getattr(lin, "bias", None)
    try:
        if copy_weights and not zero:
            if w.is_meta:
                raise SpecError("init='project' needs real weights, but they are on the meta device")
            from .projection import from_dense

            new = from_dense(w, spec, bias=bias, **kw)
        else:
            if zero:
                kw["zero_init"] = True
            new = StructuredLinear(d_in, d_out, spec, bias=bias is not None, **kw)
            if copy_weights and bias is not None:
                with torch.no_grad():
                    new.bias.copy_(bias)
    except (SpecError, MemoryLimitError) as e:  # the same class, with the layer named
        raise type(e)(f"cannot structure {what} with {spec.label or spec.einsum}: {e}") from e
    return _like(new, lin)


def _moe_replacement(name: str, lin: nn.Module, spec: Spec, cfg: MoEConfig, kwargs: dict) -> nn.Module:
    _, kw, zero, what = _source(name, lin, kwargs)
    if zero:
        kw["zero_init"] = True
    d_in, d_out = fans(lin)
    common = dict(
        experts=cfg.experts, active=cfg.active, bias=getattr(lin, "bias", None) is not None, dispatch=cfg.dispatch
    )
    try:
        if cfg.kind == "btt":
            if not is_btt_expert_spec(spec):
                raise SpecError(_BTT_ONLY.format(got=_spec_name(spec)))
            new = BTTMoE(d_in, d_out, **common, **kw)
        else:
            new = MoE(d_in, d_out, hidden=cfg.hidden_ratio * d_in, spec=spec, **common, **kw)
    except (SpecError, MemoryLimitError) as e:
        raise type(e)(f"cannot make {what} a {cfg.label}: {e}") from e
    return _like(new, lin)
