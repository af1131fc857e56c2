"""Which modules of a model are matmul layers: nn.Linear and GPT-2's Conv1D (replaceable), the ones
structure() cannot replace and why, their fans and dense matrices, and weight ties between modules."""

from __future__ import annotations

import sys

import torch
from torch import nn

from .linear import StructuredLinear
from .moe import MOE_LAYERS, BTTMoE, MoE


def is_conv1d(m: nn.Module) -> bool:
    """A GPT-2 style Conv1D: transformers' class (when transformers is loaded), or any module named Conv1D
    with an int ``nf`` and a 2-D weight of shape (nx, nf), applied as ``x @ weight + bias``."""
    loaded = sys.modules.get("transformers.pytorch_utils")  # only ever imported by the model's own code
    cls = getattr(loaded, "Conv1D", None)
    if not (isinstance(cls, type) and isinstance(m, cls)) and type(m).__name__ != "Conv1D":
        return False
    w = m._parameters.get("weight")
    nf = getattr(m, "nf", None)
    return (
        isinstance(nf, int)
        and isinstance(w, torch.Tensor)
        and w.dim() == 2
        and w.shape[1] == nf
        and not isinstance(w, nn.parameter.UninitializedParameter)
    )


def is_linear(m: nn.Module) -> bool:
    """A dense layer structure() can replace: an nn.Linear or a Conv1D (see :func:`is_conv1d`)."""
    return isinstance(m, nn.Linear) or is_conv1d(m)


def fans(m: nn.Module) -> tuple[int, int]:
    """(fan_in, fan_out) of an nn.Linear, Conv1D, StructuredLinear or MoE layer."""
    if is_conv1d(m):
        nx, nf = m._parameters["weight"].shape
        return int(nx), int(nf)
    return int(m.in_features), int(m.out_features)


def dense_weight(m: nn.Module) -> torch.Tensor:
    """The (out, in) matrix of an nn.Linear or Conv1D (a Conv1D stores its transpose)."""
    return m.weight.t() if is_conv1d(m) else m.weight


def _cannot(m: nn.Module) -> str | None:
    """Why ``m`` computes a matmul from a weight of its own that structure() cannot replace; None if it does not."""
    kind = type(m).__name__
    if isinstance(m, nn.MultiheadAttention):
        return (
            "nn.MultiheadAttention: its forward reads the packed in_proj_weight (or q/k/v_proj_weight) and "
            "out_proj.weight itself"
        )
    if isinstance(m, nn.RNNBase):
        return f"nn.{kind}: its weight_ih/weight_hh matrices are read by the fused recurrent kernel"
    if isinstance(m, (nn.Embedding, nn.EmbeddingBag, StructuredLinear, *MOE_LAYERS)):
        return None
    if "Embedding" in kind or "Norm" in kind:  # lookups and gains, not matmuls
        return None
    for pname, p in m._parameters.items():
        if (
            isinstance(p, torch.Tensor)
            and not isinstance(p, nn.parameter.UninitializedParameter)
            and p.dim() == 2
            and "weight" in pname.lower()
        ):
            return f"{kind}, a module type structure() does not know, with a 2-D parameter {pname!r}"
    return None


def matmul_layers(model: nn.Module) -> list[tuple[str, nn.Module, str | None]]:
    """The model's matmul layers in registration order: ``(name, module, None)`` for each nn.Linear and
    Conv1D that structure() can replace, ``(name, module, why)`` for each module that computes a matmul
    from a weight of its own in a way structure() cannot replace.

    Left out: embeddings, norms, StructuredLinear and MoE layers, the insides of nn.MultiheadAttention and
    BTTMoE, and MoE routers.
    """
    skip: set[int] = set()
    out = []
    for name, m in model.named_modules():
        if id(m) in skip:
            continue
        if isinstance(m, (nn.MultiheadAttention, BTTMoE, StructuredLinear)):
            skip.update(id(c) for c in m.modules() if c is not m)
        elif isinstance(m, MoE):
            skip.add(id(m.router))
        if isinstance(m, (BTTMoE, MoE, StructuredLinear)):
            continue
        if is_linear(m):
            out.append((name, m, None))
        else:
            why = _cannot(m)
            if why is not None:
                out.append((name, m, why))
    return out


def _ties(model: nn.Module) -> dict[int, list[str]]:
    """id(module) -> names of the other modules that hold its weight or bias, for every module whose
    direct weight or bias is a parameter of another module too."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, m in model.named_modules():
        for p in m._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append((name or "<root>", m))
    out: dict[int, list[str]] = {}
    for m in model.modules():
        if not is_linear(m):
            continue
        others = []
        for key in ("weight", "bias"):
            p = m._parameters.get(key)
            if p is not None:
                others += [n for n, o in owners.get(id(p), ()) if o is not m and n not in others]
        if others:
            out[id(m)] = others
    return out
