"""es.merge: every structured layer back to a dense nn.Linear holding its matrix, for deployment and export.

    dense = es.merge(model)      # in place; outputs equal (to float rounding), plain nn.Linear layers

Each StructuredLinear becomes an ``nn.Linear`` whose weight is ``layer.to_dense()`` (weight normalisation
included) and whose bias is the layer's; a layer that replaced a Hugging Face ``Conv1D`` becomes that
Conv1D again (weight stored transposed), so a merged GPT-2 has the original module types and
``state_dict`` layout. In an :class:`einstruct.MoE` the experts' structured linears become nn.Linear (the
router and the mixture stay: the gates depend on the input). A :class:`einstruct.BTTMoE` has no dense
form short of one matrix per token (its experts are slices of one rank-E BTT, mixed by input-dependent
gates), so it is kept as it is and named in a warning. Device, dtype, training mode and requires_grad
are kept; the merged layers leave the structure record (es.save then saves a plain model).
"""

from __future__ import annotations

import sys
import warnings

import torch
from torch import nn

from .errors import SpecError


def _dense_like(layer, replaced: str | None) -> nn.Module:
    """The nn.Linear (or Conv1D) holding ``layer``'s matrix and bias."""
    with torch.no_grad():
        W = layer.to_dense().detach()
        b = None if layer.bias is None else layer.bias.detach()
        conv = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
        if replaced == "Conv1D" and isinstance(conv, type):
            new = conv(layer.out_features, layer.in_features)
            new.weight = nn.Parameter(W.t().contiguous())
            if b is None:
                new.bias = None
            else:
                new.bias = nn.Parameter(b.clone())
        else:
            new = nn.Linear(layer.in_features, layer.out_features, bias=b is not None, device=W.device, dtype=W.dtype)
            new.weight.copy_(W)
            if b is not None:
                new.bias.copy_(b)
    new.train(layer.training)
    ref = getattr(layer, layer.core_names[0])
    new.requires_grad_(ref.requires_grad)
    return new


def merge(model: nn.Module) -> nn.Module:
    """Replace every StructuredLinear of ``model`` (and the structured experts of each es.MoE) with a dense
    layer holding its matrix, in place; returns the model (the new layer if ``model`` is a StructuredLinear)."""
    from .layers import record
    from .layers.linear import StructuredLinear
    from .layers.moe import BTTMoE, MoE

    if not isinstance(model, nn.Module):
        raise SpecError(f"es.merge needs an nn.Module, got {type(model).__name__}")
    entries = record.model_record(model)["layers"]
    if isinstance(model, StructuredLinear):
        return _dense_like(model, entries.get("", {}).get("replaced"))
    merged, kept = [], []
    for name, m in list(model.named_modules()):
        if isinstance(m, BTTMoE):
            kept.append(name)
        for key, child in list(m._modules.items()):
            if isinstance(child, StructuredLinear) and not isinstance(m, BTTMoE):
                full = f"{name}.{key}" if name else key
                m._modules[key] = _dense_like(child, entries.get(full, {}).get("replaced"))
                merged.append(full)
    record.forget(model, merged)
    for name, m in model.named_modules():  # an MoE whose experts are now dense is recorded as such
        if isinstance(m, MoE) and name in entries and entries[name].get("spec") is not None:
            e = entries[name]
            e["spec"] = None
            e["options"] = {k: v for k, v in e["options"].items() if k in ("zero_init", "router_bias")}
            m.spec = None
    if kept:
        warnings.warn(
            f"es.merge kept {len(kept)} BTTMoE layer(s) as they are ({', '.join(map(repr, kept))}): their gates "
            "depend on the input, so no single dense matrix computes them; structure those layers without moe= "
            "to merge them",
            UserWarning,
            stacklevel=2,
        )
    return model
