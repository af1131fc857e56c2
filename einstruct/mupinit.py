"""mup_init: THEORY 4's muP initialisation of a model's dense layers, in place (the rule is einstruct.rules.init_std).

es.mup_init(dense_model)                           # muP init of the dense layers, the output head at zero
"""

from __future__ import annotations

import fnmatch
import re
import warnings

import torch
from torch import nn

from . import rules
from .errors import MupError


def mup_init(model: nn.Module, *, zero_head: bool = True, zero=None, generator: torch.Generator | None = None):
    """Give the dense layers of ``model`` THEORY 4's muP init, in place; returns the model.

    - Every nn.Linear and Conv1D weight is drawn from N(0, sigma^2) with sigma = sqrt(min(fan_in,
      fan_out)) / fan_in (the spectral rule StructuredLinear applies to each of its cores): 1/sqrt(d) for
      a hidden d x d layer, a width-independent std for the input layer, and sqrt(fan_out) / fan_in, which
      shrinks as 1/width, for the output head. Their biases start at 0 (as StructuredLinear's do). The
      rule depends only on each layer's own shape, so no base model is needed.
    - A weight that is all zeros stays zero (the model's own zero init: the last linear of a residual
      branch, a router).
    - ``zero_head``: the output head, the last matmul layer in registration order (the one
      ``es.structure``'s default keeps dense), starts at 0 (THEORY 4).
    - ``zero``: more layers that start at 0 (THEORY 4 also zeroes the last linear of every residual branch
      and the attention query projection): a glob on module names, a compiled regex, a callable
      ``(name, module) -> bool``, or a collection of names. A StructuredLinear there (or as the head) gets
      its last core zeroed, as ``zero_init=True`` does; other StructuredLinear layers are left as they are
      (built with the per-core rule already).
    - Left alone: embeddings (their width-independent init is already muP's: the fan-in of a lookup is 1),
      norms, nn.MultiheadAttention, MoE routers and BTTMoE layers. A layer whose weight is tied to another
      module (a head sharing the embedding) is left alone too, with a UserWarning naming it: re-drawing it
      would re-draw the other module.

    ``generator``: a torch.Generator (on the weights' device) for reproducible draws.
    """
    from .layers.linear import StructuredLinear
    from .layers.model import _ties, fans, matmul_layers

    if not isinstance(model, nn.Module):
        raise MupError(f"mup_init() needs an nn.Module, got {type(model).__name__}")
    if not isinstance(zero_head, bool):
        raise MupError(f"zero_head must be True or False, got {zero_head!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise MupError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    dense_layers = {id(m) for _, m, why in matmul_layers(model) if why is None}
    layers = []
    inside: set[int] = set()
    for name, m in model.named_modules():
        if id(m) in inside:
            continue
        if isinstance(m, StructuredLinear):
            inside.update(id(c) for c in m.modules())
            layers.append((name, m))
        elif id(m) in dense_layers:
            layers.append((name, m))
        elif isinstance(m, nn.MultiheadAttention):  # its out_proj is no head
            inside.update(id(c) for c in m.modules())
    zeroed = _matching(zero, layers)
    if zero_head and layers:
        zeroed.add(layers[-1][0])
    ties = _ties(model)
    tied = []
    with torch.no_grad():
        for name, m in layers:
            z = name in zeroed
            if isinstance(m, StructuredLinear):
                if z:
                    getattr(m, m.core_names[-1]).zero_()
                    m.zero_init = True
                    if m.bias is not None:
                        m.bias.zero_()
                continue
            if id(m) in ties:
                tied.append(f"{name!r} (shared with {', '.join(map(repr, ties[id(m)]))})")
                continue
            w = m.weight
            if z or (not w.is_meta and not bool(torch.any(w != 0))):
                w.zero_()
            else:
                fan_in, fan_out = fans(m)
                w.normal_(0.0, rules.init_std(fan_in, fan_out), generator=generator)
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
    if tied:
        warnings.warn(
            f"mup_init(): left {len(tied)} weight-tied layer(s) as they are, since re-drawing them would "
            f"re-draw the module they share a weight with: {'; '.join(tied)}",
            UserWarning,
            stacklevel=2,
        )
    return model


def _matching(zero, layers) -> set[str]:
    if zero is None:
        return set()
    names = [n for n, _ in layers]
    if isinstance(zero, str):
        return {n for n in names if fnmatch.fnmatchcase(n, zero)}
    if isinstance(zero, re.Pattern):
        return {n for n in names if zero.fullmatch(n)}
    if callable(zero):
        return {n for n, m in layers if zero(n, m)}
    if isinstance(zero, (list, tuple, set, frozenset)):
        unknown = [z for z in zero if z not in names]
        if unknown:
            raise MupError(
                f"zero names {unknown[0]!r}, which is not a linear layer of the model (those are "
                f"{', '.join(map(repr, names[:8]))}{', ...' if len(names) > 8 else ''})"
            )
        return set(zero)
    raise MupError(
        f"zero must be a glob, a compiled regex, a callable(name, module) or a list of module names, "
        f"got {type(zero).__name__}"
    )
