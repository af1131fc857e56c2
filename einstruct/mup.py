"""param_groups: plain torch optimizer parameter groups carrying the muP learning rates of THEORY 4.

    base = make_model(width=64, device="meta")        # the same architecture at the base width
    opt = torch.optim.AdamW(es.param_groups(model, lr=3e-3, base=base), weight_decay=0.1)

Multipliers (a parameter's lr is ``lr * multiplier``):

- nn.Linear weight: Adam ``base_fan_in / fan_in``; SGD ``(fan_out / fan_in) / (base_fan_out / base_fan_in)``
  (fan_in = in_features, base_* from the module of the same qualified name in ``base``).
- input layer (a Linear or StructuredLinear whose in_features equals the base's, so its fan-in does not
  grow with width): the rule above (1 for Adam) times ``input_lr_mult``.
- nn.Embedding weight: its fan-in is the vocabulary, which does not grow: 1 for Adam (SGD:
  ``embedding_dim / base_embedding_dim``, the same formula with a fixed fan-in).
- StructuredLinear core: the dense multiplier of the layer it replaces (from its in/out features and the
  base module's, which may be an nn.Linear or a StructuredLinear) times the core's ``kappa`` (Adam) or
  ``kappa_sgd`` (SGD) from ``layer.structure``.
- BTTMoE: its cores get the dense multiplier of the layer it replaces times the ``kappa`` of the same core
  of a rank-1 BTT (``layer.expert_structure``): each expert is treated as a rank-1 BTT. Its router (an
  nn.Linear d_in -> E whose fan-out does not grow) gets the dense rule with the layer's fan-in, which is the
  layer's dense multiplier for Adam. An MoE of FFNs needs no rule of its own: its experts' linears and its
  router follow the rules above, matched by name in a base model that has the same MoE.
- everything else (biases, norm gains, weight-norm gains, any tensor with < 2 dims): 1; raw >= 2-dim
  parameters of other modules: 1.

Weight decay applies only to tensors with >= 2 dims; the others get ``weight_decay=0.0``. Frozen
parameters (requires_grad False) are left out. Metadata comes from the modules, so the groups are the
same after ``torch.compile`` (its ``_orig_mod.`` prefix is ignored) and after ``load_state_dict``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from torch import nn

from .errors import SpecError

log = logging.getLogger(__name__)

OPTIMIZERS = {"adamw": "adam", "adam": "adam", "sgd": "sgd"}


@dataclass(frozen=True)
class Rate:
    """The learning-rate multiplier and weight-decay eligibility of one parameter, and why."""

    name: str
    multiplier: float
    decay: bool
    reason: str


def param_groups(model: nn.Module, lr: float, base: nn.Module | None = None, *, optimizer: str = "adamw",
                 weight_decay: float | None = None, input_lr_mult: float = 1.0) -> list[dict]:
    """Parameter groups for ``torch.optim`` with the muP rates of THEORY 4 (see the module docstring).

    ``base``: the same architecture at the base width (any device, meta included), matched by qualified
    module name; None means the model itself (dense layers 1, structured cores their kappa).
    ``optimizer``: 'adamw', 'adam' or 'sgd' (which rule to apply; build the optimizer yourself).
    ``weight_decay``: set on the decayed groups; None leaves it to the optimizer's default. Groups with
    equal (lr, weight_decay) are merged; each keeps a ``name`` list of its parameters and ``lr_mult``.
    """
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise SpecError(f"lr must be a positive number, got {lr!r}")
    if weight_decay is not None and (
        isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0
    ):
        raise SpecError(f"weight_decay must be a number >= 0 or None, got {weight_decay!r}")
    rates = assign(model, base, optimizer=optimizer, input_lr_mult=input_lr_mult)
    return groups(model, rates, lr, weight_decay)


def groups(model: nn.Module, rates: list[Rate], lr: float, weight_decay: float | None) -> list[dict]:
    """Merge per-parameter rates into torch param groups keyed by (lr, weight_decay)."""
    params = dict(_named_parameters(model))
    out: dict[tuple, dict] = {}
    for r in rates:
        wd = (weight_decay if r.decay else 0.0)
        key = (r.multiplier, wd)
        if key not in out:
            out[key] = {"params": [], "name": [], "lr": lr * r.multiplier, "lr_mult": r.multiplier}
            if wd is not None:
                out[key]["weight_decay"] = float(wd)
        out[key]["params"].append(params[r.name])
        out[key]["name"].append(r.name)
    return list(out.values())


def assign(model: nn.Module, base: nn.Module | None = None, *, optimizer: str = "adamw",
           input_lr_mult: float = 1.0, structured: bool = True) -> list[Rate]:
    """The multiplier of every trainable parameter of ``model``, in named_parameters order.

    ``structured=False`` gives the naive rates (cores get the dense multiplier of their layer, no kappa):
    the baseline of a coord check.
    """
    from .layers.linear import StructuredLinear
    from .layers.moe import BTTMoE

    if not isinstance(model, nn.Module):
        raise SpecError(f"param_groups() needs an nn.Module, got {type(model).__name__}")
    if base is not None and not isinstance(base, nn.Module):
        raise SpecError(f"base must be an nn.Module (the model at its base width), got {type(base).__name__}")
    key = optimizer.lower() if isinstance(optimizer, str) else optimizer
    if key not in OPTIMIZERS:
        raise SpecError(f"optimizer {optimizer!r} is not known; use one of {', '.join(OPTIMIZERS)}")
    rule = OPTIMIZERS[key]
    if isinstance(input_lr_mult, bool) or not isinstance(input_lr_mult, (int, float)) or not input_lr_mult > 0:
        raise SpecError(f"input_lr_mult must be a positive number, got {input_lr_mult!r}")
    if base is None and input_lr_mult != 1:
        raise SpecError(
            "input_lr_mult needs base=: input layers are those whose fan-in is the same at the base width, "
            "which cannot be told without the base model"
        )
    base_modules = dict(_named_modules(base if base is not None else model))

    def base_of(name: str, m: nn.Module, kinds: tuple) -> nn.Module:
        b = base_modules.get(name)
        if b is None:
            raise SpecError(
                f"module {name!r} of the model is not in base; base must be the same architecture at the "
                "base width (structured or not), with the same module names"
            )
        if not isinstance(b, kinds):
            raise SpecError(
                f"module {name!r} is a {type(m).__name__} in the model but a {type(b).__name__} in base; "
                "build base from the same model code"
            )
        return b

    def dense(fan_in: int, fan_out: int, b_in: int, b_out: int) -> float:
        return b_in / fan_in if rule == "adam" else (fan_out / fan_in) / (b_out / b_in)

    claimed: dict[int, tuple[float, str]] = {}

    def claim(p, mult: float, reason: str) -> None:
        if id(p) in claimed:
            if claimed[id(p)][0] != mult:
                log.warning("parameter shared by two modules: keeping %s, not %s", claimed[id(p)][1], reason)
            return
        claimed[id(p)] = (mult, reason)

    linear_like = (nn.Linear, StructuredLinear)
    inside: set[int] = set()  # modules handled by their BTTMoE
    for name, m in _named_modules(model):
        if id(m) in inside:
            continue
        if isinstance(m, BTTMoE):
            inside.update(id(c) for c in m.modules() if c is not m)
            b = base_of(name, m, (*linear_like, BTTMoE))
            mult = dense(m.in_features, m.out_features, b.in_features, b.out_features)
            inp = m.in_features == b.in_features and base is not None
            if inp:
                mult *= input_lr_mult
            where = f"{'input ' if inp else ''}BTT-MoE layer {name!r}"
            for core in m.core_names:
                c = m.expert_structure.core(core)
                kappa = (c.kappa if rule == "adam" else c.kappa_sgd) if structured else 1.0
                claim(getattr(m, core), mult * kappa, f"core {core} of {where} (rank-1 kappa {kappa:g})")
            e = m.num_experts
            rmult = dense(m.in_features, e, b.in_features, e) * (input_lr_mult if inp else 1.0)
            claim(m.router.weight, rmult, f"router of {where}")
        elif isinstance(m, linear_like):
            b = base_of(name, m, linear_like)
            mult = dense(m.in_features, m.out_features, b.in_features, b.out_features)
            inp = m.in_features == b.in_features and base is not None
            if inp:
                mult *= input_lr_mult
            where = f"{'input ' if inp else ''}layer {name!r}"
            if isinstance(m, StructuredLinear):
                for core in m.core_names:
                    c = m.structure.core(core)
                    kappa = (c.kappa if rule == "adam" else c.kappa_sgd) if structured else 1.0
                    claim(getattr(m, core), mult * kappa, f"core {core} of {where} (kappa {kappa:g})")
            else:
                claim(m.weight, mult, f"weight of {where}")
        elif isinstance(m, nn.Embedding):
            b = base_of(name, m, (nn.Embedding,))
            mult = 1.0 if rule == "adam" else m.embedding_dim / b.embedding_dim
            claim(m.weight, mult, f"embedding {name!r}")
    rates = []
    for name, p in _named_parameters(model):
        if not p.requires_grad:
            continue
        mult, reason = claimed.get(id(p), (None, ""))
        if mult is None:
            mult, reason = 1.0, ("scalar, bias or norm gain" if p.dim() < 2 else "other parameter")
        rates.append(Rate(name, float(mult), p.dim() >= 2, reason))
    return rates


def _clean(name: str) -> str:
    """A qualified name without torch.compile's '_orig_mod' segments."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def _named_modules(model: nn.Module):
    return [(_clean(n), m) for n, m in model.named_modules()]


def _named_parameters(model: nn.Module):
    return [(_clean(n), p) for n, p in model.named_parameters()]
