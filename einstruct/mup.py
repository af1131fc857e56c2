"""muP learning rates for whole models (THEORY 4): param_groups (learning rates, weight decay); the rules
themselves are in einstruct.rules, the initialisation (mup_init) in einstruct.mupinit.

    base = make_model(width=64, device="meta")        # the same architecture at the base width
    opt = torch.optim.AdamW(es.param_groups(model, lr=3e-3, base=base, weight_decay=0.1))
    es.mup_init(dense_model)                           # muP init of the dense layers, the output head at zero

Multipliers (a parameter's lr is ``lr * multiplier``):

- dense layer weight (nn.Linear; a GPT-2 Conv1D, whose fan-in is its weight's first dim; the packed
  projections of nn.MultiheadAttention, fan-in ``embed_dim``): Adam ``base_fan_in / fan_in``; SGD
  ``(fan_out / fan_in) / (base_fan_out / base_fan_in)`` (base_* from the module of the same qualified
  name in ``base``).
- input layer (a layer whose fan-in does not grow with width, see below): the rule above (1 for Adam)
  times ``input_lr_mult``.
- nn.Embedding weight: its fan-in is the vocabulary, which does not grow: 1 for Adam (SGD:
  ``embedding_dim / base_embedding_dim``, the same formula with a fixed fan-in).
- StructuredLinear core: the dense multiplier of the layer it replaces (from its in/out features and the
  base module's, which may be an nn.Linear, a Conv1D or a StructuredLinear) times the core's ``kappa``
  (Adam) or ``kappa_sgd`` (SGD) from ``layer.structure``.
- BTTMoE: its cores get the dense multiplier of the layer it replaces times the ``kappa`` of the same core
  of a rank-1 BTT (``layer.expert_structure``): each expert is treated as a rank-1 BTT. Its router (an
  nn.Linear d_in -> E whose fan-out does not grow) gets the dense rule with the layer's fan-in, which is the
  layer's dense multiplier for Adam. An MoE of FFNs needs no rule of its own: its experts' linears and its
  router follow the rules above, matched by name in a base model that has the same MoE.
- everything else (biases, norm gains, weight-norm gains, raw parameters of other modules): Adam 1. SGD:
  a tensor with exactly one dim that differs from the same parameter in ``base`` (a hidden layer's bias, a
  norm's gain, a ViT's ``pos_embed``) gets that dim's ratio ``dim / base_dim``, as a dense layer with a
  fixed fan-in of 1 would (mup's MuSGD does the same); other tensors 1.

Which layers are input layers. A layer's fan-in grows with width if it differs from the base's, or, given
``delta=`` (the same architecture at a third width, as mup's ``set_base_shapes(..., delta=)``), if
``delta``'s differs from the base's. When the model has exactly the base's shapes and no delta is given
(training at the base width), shapes cannot tell, and the rule is: a fan-in grows iff it is a size that
some layer of the model outputs (an out_features, an embedding dim, an attention's embed_dim): the data's
size is no layer's output. That guess is wrong when the data's size equals a hidden size (an input of 64
features in a width-64 model, an autoencoder whose output size is its input size) or when a fixed-size
bottleneck feeds a layer; pass ``delta=`` to decide exactly. Only input layers get ``input_lr_mult``.

Weight decay applies only to tensors with >= 2 dims, and not to the parameters a model lists in its
``no_weight_decay()`` (a set of parameter names, timm's convention; a submodule's names are prefixed with
its name; a name with ``*?[`` is a glob) or whose name contains one of its ``no_weight_decay_keywords()``.
With ``scale_weight_decay=True`` (the default) each decayed tensor's weight_decay is divided by its muP
multiplier (without ``input_lr_mult``), so that lr x weight_decay, the fraction torch's AdamW (and SGD)
removes from a weight per step, is the same for every tensor at every width, as mup's MuAdamW does for
hidden matrices: by THEORY 4's spectral rule the whole per-step change of a weight, decay included, must
keep its size relative to the weight as width grows, and lr ~ 1/width with a fixed weight_decay would
make the decay vanish at large widths, so a weight decay tuned at the base width would not transfer.
``scale_weight_decay=False``: the same weight_decay for every decayed tensor (plain torch).

Frozen parameters (requires_grad False) are left out. Metadata comes from the modules, so the groups are
the same after ``torch.compile`` (its ``_orig_mod.`` prefix is ignored) and after ``load_state_dict``.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass

from torch import nn

from . import rules
from .errors import MupError

log = logging.getLogger(__name__)

OPTIMIZERS = rules.OPTIMIZER_RULES


@dataclass(frozen=True)
class Rate:
    """The learning-rate multiplier and weight-decay eligibility of one parameter, and why.

    ``decay_mult``: the factor on weight_decay under ``scale_weight_decay=True`` (1 / the muP multiplier,
    which is ``multiplier`` without ``input_lr_mult``).
    """

    name: str
    multiplier: float
    decay: bool
    reason: str
    decay_mult: float = 1.0


def param_groups(
    model: nn.Module,
    lr: float,
    base: nn.Module | None = None,
    *,
    optimizer: str = "adamw",
    weight_decay: float | None = None,
    input_lr_mult: float = 1.0,
    delta: nn.Module | None = None,
    scale_weight_decay: bool = True,
) -> list[dict]:
    """Parameter groups for ``torch.optim`` with the muP rates of THEORY 4 (see the module docstring).

    ``base``: the same architecture at the base width (any device, meta included), matched by qualified
    module name; None means the model itself (dense layers 1, structured cores their kappa).
    ``delta``: optional, the same architecture at another width than base (meta is fine): tells exactly
    which fan-ins grow with width, so which layers are input layers, also when the model has the base width.
    ``optimizer``: 'adamw', 'adam' or 'sgd' (which rule to apply; build the optimizer yourself).
    ``weight_decay``: set on the decayed groups (divided by each group's muP multiplier when
    ``scale_weight_decay``); None leaves it to the optimizer's default, unscaled: pass it here, not to the
    optimizer, to keep lr x weight_decay constant. Groups with equal (lr, weight_decay) are merged; each
    keeps a ``name`` list of its parameters and ``lr_mult``.
    """
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise MupError(f"lr must be a positive number, got {lr!r}")
    if weight_decay is not None and (
        isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0
    ):
        raise MupError(f"weight_decay must be a number >= 0 or None, got {weight_decay!r}")
    if not isinstance(scale_weight_decay, bool):
        raise MupError(f"scale_weight_decay must be True or False, got {scale_weight_decay!r}")
    rates = assign(model, base, optimizer=optimizer, input_lr_mult=input_lr_mult, delta=delta)
    return groups(model, rates, lr, weight_decay, scale_weight_decay)


def groups(
    model: nn.Module, rates: list[Rate], lr: float, weight_decay: float | None, scale_weight_decay: bool = True
) -> list[dict]:
    """Merge per-parameter rates into torch param groups keyed by (lr, weight_decay)."""
    params = dict(_named_parameters(model))
    out: dict[tuple, dict] = {}
    for r in rates:
        if not r.decay:
            wd = 0.0
        elif weight_decay is None:
            wd = None
        else:
            wd = weight_decay * (r.decay_mult if scale_weight_decay else 1.0)
        key = (r.multiplier, wd)
        if key not in out:
            out[key] = {"params": [], "name": [], "lr": lr * r.multiplier, "lr_mult": r.multiplier}
            if wd is not None:
                out[key]["weight_decay"] = float(wd)
        out[key]["params"].append(params[r.name])
        out[key]["name"].append(r.name)
    return list(out.values())


def assign(
    model: nn.Module,
    base: nn.Module | None = None,
    *,
    optimizer: str = "adamw",
    input_lr_mult: float = 1.0,
    structured: bool = True,
    delta: nn.Module | None = None,
) -> list[Rate]:
    """The multiplier of every trainable parameter of ``model``, in named_parameters order.

    ``structured=False`` gives the naive rates (cores get the dense multiplier of their layer, no kappa):
    the baseline of a coord check.
    """
    from .layers.linear import StructuredLinear
    from .layers.model import fans, is_conv1d
    from .layers.moe import BTTMoE

    if not isinstance(model, nn.Module):
        raise MupError(f"param_groups() needs an nn.Module, got {type(model).__name__}")
    for what, other in (("base", base), ("delta", delta)):
        if other is not None and not isinstance(other, nn.Module):
            raise MupError(
                f"{what} must be an nn.Module (the model at {'its base' if what == 'base' else 'another'} "
                f"width), got {type(other).__name__}"
            )
    key = optimizer.lower() if isinstance(optimizer, str) else optimizer
    if key not in OPTIMIZERS:
        raise MupError(f"optimizer {optimizer!r} is not known; use one of {', '.join(OPTIMIZERS)}")
    rule = OPTIMIZERS[key]
    if isinstance(input_lr_mult, bool) or not isinstance(input_lr_mult, (int, float)) or not input_lr_mult > 0:
        raise MupError(f"input_lr_mult must be a positive number, got {input_lr_mult!r}")
    ref = base if base is not None else model
    base_modules = dict(_named_modules(ref))
    delta_modules = None if delta is None else dict(_named_modules(delta))
    base_params = {n: tuple(p.shape) for n, p in _named_parameters(ref)}

    def is_linear_like(m) -> bool:
        return isinstance(m, (nn.Linear, StructuredLinear)) or is_conv1d(m)

    def pair(m) -> tuple[int, int]:
        """(fan_in, fan_out) of a layer; an attention's packed q, k, v projection reads embed_dim."""
        return (m.embed_dim, 3 * m.embed_dim) if isinstance(m, nn.MultiheadAttention) else fans(m)

    def counterpart(name: str, m: nn.Module, ok, modules: dict, what: str) -> nn.Module:
        b = modules.get(name)
        if b is None:
            raise MupError(
                f"module {name!r} of the model is not in {what}; {what} must be the same architecture at "
                f"{'the base' if what == 'base' else 'another'} width (structured or not), with the same module names"
            )
        if not ok(b):
            raise MupError(
                f"module {name!r} is a {type(m).__name__} in the model but a {type(b).__name__} in {what}; "
                f"build {what} from the same model code"
            )
        return b

    def sizes(m) -> tuple | None:
        """The shape-defining sizes of a module (fans, embedding sizes), None for other modules."""
        if isinstance(m, BTTMoE) or is_linear_like(m):
            return fans(m)
        if isinstance(m, nn.Embedding):
            return (m.num_embeddings, m.embedding_dim)
        if isinstance(m, nn.MultiheadAttention):
            return (m.embed_dim, m.kdim, m.vdim)
        return None

    # At the base width (every shape equal to base's, no delta) shapes cannot tell which fan-ins grow: a
    # fan-in is then taken to grow iff some layer of the model outputs that size (the data's size is no
    # layer's output).
    at_base = (
        delta is None
        and all(
            sizes(m) is None or name not in base_modules or sizes(base_modules[name]) == sizes(m)
            for name, m in _named_modules(model)
        )
        and all(base_params.get(n, tuple(p.shape)) == tuple(p.shape) for n, p in _named_parameters(model))
    )
    outputs: set[int] = set()
    for _, m in _named_modules(model):
        s = sizes(m)
        if s is not None:
            outputs.add(s[0] if isinstance(m, nn.MultiheadAttention) else s[1])

    def dense(fan_in: int, fan_out: int, b_in: int, b_out: int) -> float:
        return rules.lr_mult(fan_in, fan_out, b_in, b_out, rule)

    def layer_rule(name: str, m: nn.Module, ok) -> tuple[float, float, bool, nn.Module]:
        """(muP multiplier, input_lr_mult or 1, whether it is an input layer, base module) of a layer."""
        b = counterpart(name, m, ok, base_modules, "base")
        d = None if delta_modules is None else counterpart(name, m, ok, delta_modules, "delta")
        (fan_in, fan_out), (b_in, b_out) = pair(m), pair(b)
        d_in = None if d is None else pair(d)[0]
        grows = rules.fan_in_grows(fan_in, b_in, d_in, at_base=at_base, output_sizes=outputs)
        return dense(fan_in, fan_out, b_in, b_out), (1.0 if grows else input_lr_mult), not grows, b

    claimed: dict[int, tuple[float, str, float]] = {}

    def claim(p, mult: float, reason: str, decay_mult: float) -> None:
        if id(p) in claimed:
            if claimed[id(p)][0] != mult:
                log.warning("parameter shared by two modules: keeping %s, not %s", claimed[id(p)][1], reason)
            return
        claimed[id(p)] = (mult, reason, decay_mult)

    inside: set[int] = set()  # modules handled by their BTTMoE
    for name, m in _named_modules(model):
        if id(m) in inside:
            continue
        if isinstance(m, BTTMoE):
            inside.update(id(c) for c in m.modules() if c is not m)
            mult, inp, is_input, b = layer_rule(name, m, lambda b: isinstance(b, BTTMoE) or is_linear_like(b))
            where = f"{'input ' if is_input else ''}BTT-MoE layer {name!r}"
            for core in m.core_names:
                c = m.expert_structure.core(core)
                kappa = (c.kappa if rule == "adam" else c.kappa_sgd) if structured else 1.0
                claim(
                    getattr(m, core),
                    mult * kappa * inp,
                    f"core {core} of {where} (rank-1 kappa {kappa:g})",
                    rules.decay_mult(mult * kappa),
                )
            e = m.num_experts
            rmult = dense(m.in_features, e, fans(b)[0], e)
            claim(m.router.weight, rmult * inp, f"router of {where}", rules.decay_mult(rmult))
        elif is_linear_like(m):
            mult, inp, is_input, _ = layer_rule(name, m, is_linear_like)
            where = f"{'input ' if is_input else ''}layer {name!r}"
            if isinstance(m, StructuredLinear):
                for core in m.core_names:
                    c = m.structure.core(core)
                    kappa = (c.kappa if rule == "adam" else c.kappa_sgd) if structured else 1.0
                    claim(
                        getattr(m, core),
                        mult * kappa * inp,
                        f"core {core} of {where} (kappa {kappa:g})",
                        rules.decay_mult(mult * kappa),
                    )
            else:
                claim(m.weight, mult * inp, f"weight of {where}", rules.decay_mult(mult))
        elif isinstance(m, nn.MultiheadAttention):  # its out_proj is an nn.Linear, with the rule above
            _, inp, is_input, b = layer_rule(name, m, lambda b: isinstance(b, nn.MultiheadAttention))
            where = f"{'input ' if is_input else ''}attention {name!r}"
            for pname, fan_in, outs in (
                ("in_proj_weight", "embed_dim", 3),
                ("q_proj_weight", "embed_dim", 1),
                ("k_proj_weight", "kdim", 1),
                ("v_proj_weight", "vdim", 1),
            ):
                p = getattr(m, pname, None)
                if p is not None:
                    mult = dense(getattr(m, fan_in), outs * m.embed_dim, getattr(b, fan_in), outs * b.embed_dim)
                    claim(p, mult * inp, f"{pname} of {where}", rules.decay_mult(mult))
        elif isinstance(m, nn.Embedding):
            b = counterpart(name, m, lambda b: isinstance(b, nn.Embedding), base_modules, "base")
            mult = rules.fixed_fan_in_mult(m.embedding_dim, b.embedding_dim, rule)
            claim(m.weight, mult, f"embedding {name!r}", rules.decay_mult(mult))
    no_decay = _no_weight_decay(model)
    rates = []
    for name, p in _named_parameters(model):
        if not p.requires_grad:
            continue
        mult, reason, decay_mult = claimed.get(id(p), (None, "", 1.0))
        if mult is None:
            mult, reason = 1.0, ("scalar, bias or norm gain" if p.dim() < 2 else "other parameter")
            b = base_params.get(name)
            if rule == "sgd" and b is not None and len(b) == p.dim():
                grown = [(s, t) for s, t in zip(p.shape, b) if s != t]
                if len(grown) == 1:
                    mult = rules.fixed_fan_in_mult(grown[0][0], grown[0][1], rule)
                    reason += f" (SGD: one dim grows, {grown[0][1]} -> {grown[0][0]})"
            decay_mult = rules.decay_mult(mult)
        decay = p.dim() >= 2
        if decay and no_decay(name):
            decay, reason = False, reason + " (in the model's no_weight_decay)"
        rates.append(Rate(name, float(mult), decay, reason, float(decay_mult)))
    return rates


def _no_weight_decay(model: nn.Module):
    """A predicate on (cleaned) parameter names: listed by some module's no_weight_decay() (prefixed with the
    module's name; globs allowed) or containing one of its no_weight_decay_keywords() (timm's conventions)."""
    names: set[str] = set()
    globs: list[str] = []
    keywords: set[str] = set()
    for prefix, m in _named_modules(model):
        for attr in ("no_weight_decay", "no_weight_decay_keywords"):
            if not callable(getattr(type(m), attr, None)):  # a method of the class, as timm defines them
                continue
            got = getattr(m, attr)()
            if isinstance(got, str) or not hasattr(got, "__iter__"):
                raise MupError(
                    f"{type(m).__name__}.{attr}() of module {prefix or '<root>'!r} must return a set of "
                    f"parameter names, got {type(got).__name__}"
                )
            for n in got:
                if not isinstance(n, str):
                    raise MupError(f"{type(m).__name__}.{attr}() returned {n!r}; it must return strings")
                if attr == "no_weight_decay_keywords":
                    keywords.add(n)
                elif any(ch in n for ch in "*?["):
                    globs.append(_clean(f"{prefix}.{n}" if prefix else n))
                else:
                    names.add(_clean(f"{prefix}.{n}" if prefix else n))
    return lambda name: (
        name in names or any(fnmatch.fnmatchcase(name, g) for g in globs) or any(k in name for k in keywords)
    )


def _clean(name: str) -> str:
    """A qualified name without torch.compile's '_orig_mod' segments."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def _named_modules(model: nn.Module):
    return [(_clean(n), m) for n, m in model.named_modules()]


def _named_parameters(model: nn.Module):
    return [(_clean(n), p) for n, p in model.named_parameters()]
