"""The structure record: what es.structure() did to a model, layer by layer, so that it can be redone.

structure() attaches one record to the module it was called on (a plain attribute, never in state_dict):
an ordered map from each replaced module's name (relative to that module) to an entry with the module it
replaced (``"Linear"`` or ``"Conv1D"``, its fans and bias), the new module's class, its spec
(:func:`einstruct.config.spec_to_dict`), the resolved integer axis sizes and einsum, and the layer options
it was built with (MoE settings included). :func:`model_record` gathers the records of a model and its
submodules under qualified names, with a ``format_version``; :func:`build` rebuilds one layer from its
entry. The record is what ``structure.json`` holds (:mod:`einstruct.saving`), so a model structured with
any ``select`` (a callable or a regex included) is rebuilt from names, not by re-running the selection.
"""

from __future__ import annotations

import json

from torch import nn

from ..config import FORMAT_VERSION, spec_from_dict, spec_to_dict
from ..errors import SpecError
from .linear import StructuredLinear
from .matmuls import fans, is_conv1d
from .moe import BTTMoE, MoE

ATTR = "_einstruct_record"
_NOT_OPTIONS = ("device", "dtype")


def _resolved(st) -> dict:
    return {"einsum": st.spec.einsum, "sizes": {a: int(v) for a, v in st.sizes.items()}}


def entry(old: nn.Module, new: nn.Module, spec, options: dict, moe=None) -> dict:
    """The record entry of ``new`` (a StructuredLinear, BTTMoE or MoE) that replaced ``old``."""
    d_in, d_out = fans(old)
    opts = {k: v for k, v in options.items() if k not in _NOT_OPTIONS}
    if getattr(new, "zero_init", False):
        opts["zero_init"] = True
    try:
        json.dumps(opts)
    except TypeError as e:
        raise SpecError(f"structure(): layer options must be plain numbers and booleans to be recorded ({e})") from e
    out = {
        "replaced": "Conv1D" if is_conv1d(old) else "Linear",
        "module": type(new).__name__,
        "in_features": d_in,
        "out_features": d_out,
        "bias": getattr(old, "bias", None) is not None,
        "spec": None if spec is None else spec_to_dict(spec),
        "options": opts,
    }
    if moe is not None:
        out["moe"] = {k: getattr(moe, k) for k in ("experts", "active", "kind", "dispatch", "hidden_ratio")}
    if isinstance(new, (StructuredLinear, BTTMoE)):
        out["resolved"] = _resolved(new.structure)
    err = getattr(new, "projection_error", None)
    if err is not None:
        out["projection_error"] = float(err)
    return out


def attach(root: nn.Module, entries: dict[str, dict]) -> None:
    """Add ``entries`` (name relative to ``root`` -> entry) to ``root``'s record."""
    if not entries:
        return
    rec = root.__dict__.setdefault(ATTR, {})
    rec.update(entries)


def forget(root: nn.Module, names) -> None:
    """Drop the entries of ``names`` (qualified names under ``root``) from every record in ``root``."""
    names = set(names)
    for prefix, m in root.named_modules():
        rec = m.__dict__.get(ATTR)
        if not rec:
            continue
        for key in list(rec):
            if _join(prefix, key) in names:
                del rec[key]


def _join(prefix: str, name: str) -> str:
    return ".".join(p for p in (prefix, name) if p)


def model_record(model: nn.Module) -> dict:
    """``{"format_version": 1, "layers": {qualified name: entry}}`` for every structured layer that
    structure() made in ``model`` or its submodules; checks that each recorded layer is still there."""
    layers: dict[str, dict] = {}
    for prefix, m in model.named_modules():
        for key, e in (m.__dict__.get(ATTR) or {}).items():
            name = _join(prefix, key)
            try:
                live = model.get_submodule(name)
            except AttributeError:
                live = None
            if live is None or type(live).__name__ != e["module"]:
                got = "nothing" if live is None else type(live).__name__
                raise SpecError(
                    f"the structure record names {name or '<root>'!r} as a {e['module']}, but the model has {got} "
                    "there; structure the model again with es.structure (do not swap recorded layers by hand)"
                )
            layers[name] = e
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    ordered = dict(sorted(layers.items(), key=lambda kv: order[kv[0]]))  # registration order, as state_dict
    return {"format_version": FORMAT_VERSION, "layers": ordered}


def build(name: str, e: dict, device=None, dtype=None) -> nn.Module:
    """The layer of entry ``e`` with fresh parameters (on ``device``/``dtype``; the meta device is fine)."""
    spec = None if e.get("spec") is None else spec_from_dict(e["spec"])
    factory = {"device": device, "dtype": dtype}
    opts = dict(e.get("options", {}))
    d_in, d_out, bias = e["in_features"], e["out_features"], e["bias"]
    kind = e["module"]
    if kind == "StructuredLinear":
        new = StructuredLinear(d_in, d_out, spec, bias=bias, **opts, **factory)
    elif kind == "BTTMoE":
        m = e["moe"]
        new = BTTMoE(d_in, d_out, m["experts"], m["active"], bias=bias, dispatch=m["dispatch"], **opts, **factory)
    elif kind == "MoE":
        m = e["moe"]
        new = MoE(
            d_in,
            d_out,
            m["experts"],
            m["active"],
            hidden=m["hidden_ratio"] * d_in,
            spec=spec,
            bias=bias,
            dispatch=m["dispatch"],
            **opts,
            **factory,
        )
    else:
        raise SpecError(f"structure record: module {name!r} has an unknown layer class {kind!r}")
    if "projection_error" in e:  # what init="project" reached when the layer was made, shown by es.summary
        new.projection_error = float(e["projection_error"])
    want = e.get("resolved")
    if want is not None and _resolved(new.structure) != want:
        raise SpecError(
            f"structure record: {name!r} resolves to {_resolved(new.structure)} with this einstruct, but was saved "
            f"as {want}; load it with the einstruct version that saved it"
        )
    return new


def describe(m: nn.Module) -> str:
    """A short description of a module for architecture errors."""
    if is_conv1d(m):
        nx, nf = m._parameters["weight"].shape
        return f"Conv1D({nx} -> {nf}, bias={m._parameters.get('bias') is not None})"
    if isinstance(m, nn.Linear):
        return f"Linear({m.in_features} -> {m.out_features}, bias={m.bias is not None})"
    return type(m).__name__


def matches(m: nn.Module, e: dict) -> bool:
    """Whether ``m`` is the kind of dense layer entry ``e`` replaced (type, fans and bias)."""
    if e["replaced"] == "Conv1D":
        ok = is_conv1d(m)
    else:
        ok = isinstance(m, nn.Linear) and not is_conv1d(m)
    if not ok:
        return False
    return fans(m) == (e["in_features"], e["out_features"]) and (getattr(m, "bias", None) is not None) == e["bias"]
