"""muP rules (THEORY 4): init std, Adam and SGD learning-rate multipliers, per-core kappa, input layers.

Each function is plain arithmetic on its arguments: ints and floats give numbers (the compiler, the layers,
``param_groups``, ``mup_init``), sympy expressions give formulas (``st.symbolic()``). The only two operations
that differ between the two, a square root and a minimum, go through :func:`sqrt` and :func:`minimum`.
"""

from __future__ import annotations

import math
import sys

# optimizer name (as param_groups takes it) -> the rule it follows
OPTIMIZER_RULES = {"adamw": "adam", "adam": "adam", "sgd": "sgd"}


def _sympy(*xs):
    """The sympy module when one of ``xs`` is a sympy expression, else None (sympy is never imported here)."""
    sp = sys.modules.get("sympy")
    return sp if sp is not None and any(isinstance(x, sp.Basic) for x in xs) else None


def sqrt(x):
    sp = _sympy(x)
    return sp.sqrt(x) if sp is not None else math.sqrt(x)


def minimum(a, b):
    sp = _sympy(a, b)
    return sp.Min(a, b) if sp is not None else min(a, b)


def init_std(fan_in, fan_out):
    """The spectral init std of a dense (fan_out x fan_in) matrix: sqrt(min(fan_in, fan_out)) / fan_in.

    1/sqrt(d) for a hidden d x d layer, width-independent for an input layer, sqrt(fan_out)/fan_in (shrinking
    as 1/width) for an output head. StructuredLinear applies it to each core at its step (fans d_in^i, d_out^i).
    """
    return sqrt(minimum(fan_in, fan_out)) / fan_in


def low_rank_std(d_in):
    """The low-rank exception (THEORY 4, ICML appendix): the first core of a low-rank layer, std 1/sqrt(d_in)."""
    return 1.0 / sqrt(d_in)


def lr_mult(fan_in, fan_out, base_fan_in, base_fan_out, rule: str = "adam"):
    """The dense rule: a layer's learning-rate multiplier against the same layer at the base width.

    Adam: ``base_fan_in / fan_in``; SGD: ``(fan_out / fan_in) / (base_fan_out / base_fan_in)``. ``rule`` is
    'adam' or 'sgd' (:data:`OPTIMIZER_RULES` maps optimizer names to it).
    """
    if rule == "adam":
        return base_fan_in / fan_in
    if rule == "sgd":
        return (fan_out / fan_in) / (base_fan_out / base_fan_in)
    raise ValueError(f"muP rule {rule!r} is not known; use 'adam' or 'sgd'")


def fixed_fan_in_mult(dim, base_dim, rule: str = "adam"):
    """The dense rule for a tensor whose fan-in does not grow (fixed at 1): an embedding (a lookup; its fan-in
    is the vocabulary), or, under SGD, a bias or norm gain with one grown dim. Adam 1, SGD ``dim / base_dim``."""
    return lr_mult(1, dim, 1, base_dim, rule)


def kappa(fan_in, fan_out, d_in, d_out, cores: int, rule: str = "adam"):
    """A core's multiplier relative to a dense layer of the layer's shape: the dense rule with the core's fans
    (d_in^i, d_out^i) against the layer's (d_in, d_out), divided by the number of cores k.

    Adam: ``(d_in / d_in^i) / k``; SGD: ``[(d_out^i / d_in^i) / (d_out / d_in)] / k``.
    """
    return lr_mult(fan_in, fan_out, d_in, d_out, rule) / cores


def decay_mult(mult):
    """The factor on weight_decay of a tensor with muP multiplier ``mult`` (``scale_weight_decay=True``): 1 / mult,
    so lr x weight_decay is the same for every tensor at every width."""
    return 1 / mult


def fan_in_grows(fan_in, base_fan_in, delta_fan_in=None, *, at_base: bool = False, output_sizes=frozenset()) -> bool:
    """Whether a layer's fan-in grows with width; a layer whose fan-in does not is an input layer.

    It grows if it differs from the base model's; else, given the same layer at a third width (``delta``), if
    that one's differs from the base's; else, when the model has exactly the base's shapes (``at_base``), iff
    it is a size some layer of the model outputs (``output_sizes``): the data's size is no layer's output.
    """
    if fan_in != base_fan_in:
        return True
    if delta_fan_in is not None:
        return delta_fan_in != base_fan_in
    return bool(at_base) and fan_in in output_sizes
