"""The rules, each defined once: muP (init std, learning-rate multipliers) and FLOP accounting.

Torch-free and written over plain arithmetic, so the same function gives the numbers (ints and floats, as the
compiler, the layers, ``param_groups`` and the search use them) and the sympy formulas (``st.symbolic()``,
called with sympy symbols). THEORY 4 (muP) and THEORY 8 (compute) state them.

    from einstruct import rules
    rules.init_std(256, 16)                       # 0.015625 = sqrt(16) / 256
    rules.lr_mult(512, 512, 64, 64, "adam")       # 0.125 = 64 / 512
    rules.train_flops(rules.forward_flops(macs))  # 6 x MACs
"""

from .flops import (
    BACKWARD_PER_FORWARD,
    FLOPS_PER_MAC,
    TRAIN_FLOPS_PER_MAC,
    attention_flops,
    dense_flops,
    dense_macs,
    forward_flops,
    input_step_flops,
    moe_expert_rows,
    moe_flops,
    moe_tiles,
    step_macs,
    train_flops,
)
from .mup import OPTIMIZER_RULES, decay_mult, fan_in_grows, fixed_fan_in_mult, init_std, kappa, low_rank_std, lr_mult

__all__ = [
    "BACKWARD_PER_FORWARD",
    "FLOPS_PER_MAC",
    "OPTIMIZER_RULES",
    "TRAIN_FLOPS_PER_MAC",
    "attention_flops",
    "decay_mult",
    "dense_flops",
    "dense_macs",
    "fan_in_grows",
    "fixed_fan_in_mult",
    "forward_flops",
    "init_std",
    "input_step_flops",
    "kappa",
    "low_rank_std",
    "lr_mult",
    "moe_expert_rows",
    "moe_flops",
    "moe_tiles",
    "step_macs",
    "train_flops",
]
