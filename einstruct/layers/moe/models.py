"""MoE layers in whole models: which modules are MoE layers, and their summed auxiliary loss."""

from __future__ import annotations

import torch
from torch import nn

from .btt import BTTMoE
from .ffn import MoE
from .routing import _Routed

MOE_LAYERS = (BTTMoE, MoE)


def moe_layers(model: nn.Module) -> list[_Routed]:
    return [m for m in model.modules() if isinstance(m, MOE_LAYERS)]


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of ``aux_loss()`` over the MoE layers of ``model`` (0 without any); weight it by AUX_WEIGHT."""
    layers = moe_layers(model)
    if not layers:
        p = next(model.parameters(), None)
        return torch.zeros((), device=None if p is None else p.device)
    total = layers[0].aux_loss()
    for m in layers[1:]:
        total = total + m.aux_loss()
    return total
