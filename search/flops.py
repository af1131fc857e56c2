"""Training FLOPs of one optimizer step, counted from the modules (THEORY 8), with no tracing.

Forward FLOPs of a linear layer = 2 x MACs of the path it runs. Training = forward + backward, where
backward is 2 x forward for a layer whose input needs a gradient and 1 x forward (the weight gradient
only) for a layer fed by data. Inside a structured layer fed by data only its first step skips the
input gradient. Embeddings are lookups (0). Attention's two matmuls are counted analytically by the
task. Biases, norms, activations and the loss are not counted. An MoE layer (es.BTTMoE, es.MoE) is counted
as one unit by its own ``train_flops`` (router and experts, for the dispatch path it runs); the modules
inside it are not counted again.
"""

from __future__ import annotations

from torch import nn

import einstruct as es
from einstruct import rules
from einstruct.layers.model import fans, is_linear


def linear_forward_flops(module: nn.Module, rows: int) -> int:
    """Forward FLOPs of one nn.Linear (or GPT-2 Conv1D) or StructuredLinear applied to ``rows`` rows."""
    if is_linear(module):
        d_in, d_out = fans(module)
        return rules.dense_flops(rows, d_in, d_out)
    if isinstance(module, es.StructuredLinear):
        return int(module.flops(rows, training=True))
    raise TypeError(f"not a linear layer: {type(module).__name__}")


def linear_train_flops(module: nn.Module, rows: int, input_needs_grad: bool = True) -> int:
    fwd = linear_forward_flops(module, rows)
    if isinstance(module, es.StructuredLinear):  # only its first step reads the input
        first = rules.input_step_flops(module.structure, rows)
    else:
        first = fwd
    return rules.train_flops(fwd, first, input_needs_grad=input_needs_grad)


def model_train_flops(model: nn.Module, rows: int, data_fed: frozenset[str] = frozenset()) -> int:
    """Sum over the linear layers of ``model``; ``data_fed`` names the layers whose input is raw data."""
    total = 0
    inside: set[int] = set()
    for name, m in model.named_modules():
        if id(m) in inside:
            continue
        if isinstance(m, (es.BTTMoE, es.MoE)):
            inside.update(id(c) for c in m.modules() if c is not m)
            total += m.train_flops(rows, input_needs_grad=name not in data_fed)
        elif is_linear(m) or isinstance(m, es.StructuredLinear):
            total += linear_train_flops(m, rows, input_needs_grad=name not in data_fed)
    return total
