"""Mixture-of-experts layers: BTTMoE (the rank slices of a BTT are the experts) and MoE (E whole FFNs).

Both route every token with a zero-initialised ``layer.router`` (``nn.Linear(d_in, E)``, so every expert
starts equally likely), keep the top-``active`` logits and take a softmax over those (THEORY 6):

    layer = es.BTTMoE(256, 256, experts=8, active=2, dispatch="sparse")
    y = layer(x)
    loss = task_loss + es.AUX_WEIGHT * layer.aux_loss()   # switch loss + 0.1 x z-loss of the last forward

``BTTMoE`` is one BTT of rank E (cores ``R``: gafr and ``L``: fgre, the axis order of
``es.presets.btt(rank=E)``): expert e is the rank-1 BTT of slice e, and its gate multiplies slice e of the
intermediate between the two block-diagonal steps. Init std, weight-norm caps and muP rates are those of
a rank-1 BTT (``layer.expert_structure``), as if each expert stood alone. ``MoE`` is the standard baseline:
E two-layer FFNs (d_in -> hidden -> d_out, GELU; nn.Linear or StructuredLinear with a spec) whose outputs
are summed with the gate weights.

Two execution paths, chosen by ``dispatch`` (a fixed option, never measured):

- ``"dense"`` (the default): every expert runs on every token and the gates of the unchosen experts are 0.
  One batched matmul per step, no host reads, so it suits torch.compile and CUDA graphs; it computes
  E/active times the expert work of the sparse path, and ``flops(batch)`` says so.
- ``"sparse"``: tokens are grouped per expert (a stable sort of the token-to-expert assignments) and each
  expert runs only on its own tokens, so the expert work is active/E of the dense path. Sizing the groups
  reads the E token counts back to the host once per forward (one device sync per layer on CUDA).
  Results are put back in token order and summed over the ``active`` choices with plain indexing and a
  sum, with no atomic adds, so both paths are deterministic.

Gradients never divide by a gate: the gates only multiply. ``layer.flops(batch)`` is the forward FLOPs of
the path that runs (router included), equal to what FlopCounterMode counts; ``layer.table()`` shows both
paths. ``layer.router_stats()`` returns detached tensors (mean per-token router entropy in nats, the load
of each expert, its mean router probability) without reading anything back to the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import presets
from ..compiler import compile as compile_structure
from ..errors import SpecError
from ..spec import Spec
from .linear import RMS_EPS, StructuredLinear, _check_features

DISPATCHES = ("dense", "sparse")
KINDS = ("btt", "ffn")
AUX_WEIGHT = 0.01  # weight of aux_loss() in the training loss (THEORY 6)
Z_LOSS_WEIGHT = 0.1  # weight of the z-loss inside aux_loss()


@dataclass(frozen=True)
class MoEConfig:
    """How :func:`einstruct.structure` turns each selected nn.Linear into an MoE layer.

    ``kind="btt"``: a :class:`BTTMoE` (the structure spec must be None, 'btt' or btt(rank=1): the experts
    are rank-1 BTTs). ``kind="ffn"``: an :class:`MoE` of FFNs with hidden width ``hidden_ratio * d_in``
    whose linears have the structure spec (None or dense: nn.Linear).
    """

    experts: int = 8
    active: int = 2
    kind: str = "btt"
    dispatch: str = "dense"
    hidden_ratio: int = 4

    def __post_init__(self):
        _check_experts(self.experts, self.active, "MoEConfig")
        if self.kind not in KINDS:
            raise SpecError(f"MoEConfig: kind {self.kind!r} is not known; use 'btt' (BTT-MoE) or 'ffn' (standard MoE)")
        _check_dispatch(self.dispatch, "MoEConfig")
        _check_features(self.hidden_ratio, "hidden_ratio")

    @property
    def label(self) -> str:
        name = "btt_moe" if self.kind == "btt" else "moe"
        return f"{name}(E={self.experts},k={self.active})"

    @property
    def weight_spec(self) -> Spec:
        """The structure of the layer's weights: a rank-E BTT for BTT-MoE; dense experts for the FFN MoE."""
        return presets.btt(rank=self.experts) if self.kind == "btt" else presets.dense()

    @classmethod
    def of(cls, value) -> MoEConfig:
        """A MoEConfig from a MoEConfig, a dict of its fields, or an int (the number of experts)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = [k for k in value if k not in cls.__dataclass_fields__]
            if unknown:
                raise SpecError(f"moe= got an unknown setting {unknown[0]!r}; settings are "
                                f"{', '.join(cls.__dataclass_fields__)}")
            return cls(**value)
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(experts=value)
        raise SpecError(f"moe= must be an es.MoEConfig, a dict such as {{'experts': 8, 'active': 2}}, or an int "
                        f"(the number of experts); got {type(value).__name__}")


def _check_experts(experts, active, who: str) -> None:
    if isinstance(experts, bool) or not isinstance(experts, int) or experts < 1:
        raise SpecError(f"{who}: experts must be a positive integer (the number of experts), got {experts!r}")
    if isinstance(active, bool) or not isinstance(active, int) or active < 1:
        raise SpecError(f"{who}: active must be a positive integer (experts chosen per token), got {active!r}")
    if active > experts:
        raise SpecError(f"{who}: active={active} is more than experts={experts}; each token chooses at most all "
                        f"experts, so use active <= {experts}")


def _check_dispatch(dispatch, who: str) -> None:
    if dispatch not in DISPATCHES:
        raise SpecError(f"{who}: dispatch {dispatch!r} is not known; use 'dense' (all experts, the default) or "
                        "'sparse' (tokens grouped per expert)")


def is_btt_expert_spec(spec) -> bool:
    """Whether ``spec`` names a rank-1 BTT (None, 'btt' or es.presets.btt(rank=1)): the expert of BTTMoE."""
    if spec is None:
        return True
    if isinstance(spec, str):
        return spec.strip().lower() == "btt"
    return spec == presets.btt(rank=1)


# ---- routing ------------------------------------------------------------------------------------------


class _Routed(nn.Module):
    """Router, top-k gates, load-balancing losses, statistics and sparse dispatch shared by both layers."""

    def _init_routing(self, d_in, d_out, experts, active, dispatch, router_bias, factory) -> None:
        who = type(self).__name__
        self.in_features = _check_features(d_in, "d_in")
        self.out_features = _check_features(d_out, "d_out")
        _check_experts(experts, active, who)
        _check_dispatch(dispatch, who)
        self.num_experts, self.active, self.dispatch = experts, active, dispatch
        self.router = nn.Linear(d_in, experts, bias=bool(router_bias), **factory)
        self._aux: torch.Tensor | None = None
        self._stats: dict[str, torch.Tensor] | None = None

    def _reset_router(self) -> None:
        with torch.no_grad():
            self.router.weight.zero_()  # uniform routing at the start (muP practice, THEORY 4)
            if self.router.bias is not None:
                self.router.bias.zero_()

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise SpecError(
                f"{type(self).__name__}({self.in_features} -> {self.out_features}) expects input of shape "
                f"(..., {self.in_features}), got {tuple(x.shape)}"
            )

    def _rows(self, x: torch.Tensor):
        """Check ``x``, flatten its leading dims and route: (lead shape, rows n, x as (n, d_in), ids, gates)."""
        self._check_input(x)
        lead = x.shape[:-1]
        n = math.prod(lead)
        x2 = x.reshape(n, self.in_features)
        return (lead, n, x2, *self._route(x2))

    def _route(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert ids (n, k), gate weights (n, k)) for the rows of ``x2``; records the aux loss and stats."""
        logits = self.router(x2).float()
        top, idx = logits.topk(self.active, dim=-1)
        gates = top.softmax(dim=-1)
        self._record(logits, idx)
        return idx, gates

    def _record(self, logits: torch.Tensor, idx: torch.Tensor) -> None:
        n, e = logits.shape
        if n == 0:
            self._aux = logits.sum() * 0.0
            self._stats = None
            return
        logp = logits.log_softmax(dim=-1)
        probs = logp.exp()
        importance = probs.mean(dim=0)  # P_e: mean router probability
        ones = torch.ones(idx.numel(), device=logits.device, dtype=logits.dtype)
        load = torch.zeros(e, device=logits.device, dtype=logits.dtype).scatter_add_(0, idx.reshape(-1), ones)
        load = load / idx.numel()  # f_e: share of the n*k assignments
        switch = e * (importance * load).sum()
        z = torch.logsumexp(logits, dim=-1).square().mean()
        self._aux = switch + Z_LOSS_WEIGHT * z
        entropy = -(probs * logp).sum(dim=-1).mean()
        self._stats = {"entropy": entropy.detach(), "load": load.detach(), "importance": importance.detach(),
                       "switch_loss": switch.detach(), "z_loss": z.detach()}

    def aux_loss(self) -> torch.Tensor:
        """Switch loss + 0.1 x z-loss of the last forward (THEORY 6); add it to the loss with weight 0.01."""
        if self._aux is None:
            raise RuntimeError(f"{type(self).__name__}.aux_loss(): the layer has not run a forward pass yet; "
                               "call it on a batch first")
        return self._aux

    def router_stats(self) -> dict[str, torch.Tensor]:
        """Detached tensors of the last forward: entropy, load, importance, switch_loss, z_loss (no sync)."""
        if self._stats is None:
            raise RuntimeError(f"{type(self).__name__}.router_stats(): no forward pass with tokens has run yet")
        return dict(self._stats)

    def _sparse(self, x2: torch.Tensor, idx: torch.Tensor, gates: torch.Tensor, expert_fn) -> torch.Tensor:
        """Run ``expert_fn(e, rows, gate)`` on each expert's own tokens; sum over the k choices per token."""
        n, k = idx.shape
        flat = idx.reshape(-1)  # assignment a = token * k + choice
        order = torch.argsort(flat, stable=True)
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=flat.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        sizes = counts.tolist()  # the one host read of this path: group sizes
        rows = x2.unsqueeze(1).expand(n, k, x2.shape[-1]).reshape(n * k, -1).index_select(0, order)
        g = gates.reshape(-1).index_select(0, order)
        outs = []
        start = 0
        for e, c in enumerate(sizes):
            if c:
                outs.append(expert_fn(e, rows[start : start + c], g[start : start + c]))
            start += c
        ys = torch.cat(outs, dim=0)
        y = torch.zeros_like(ys).index_copy(0, order, ys)  # back to assignment order (a permutation)
        return y.view(n, k, -1).sum(dim=1)

    def _dense_gates(self, idx: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """(n, E) gate weights, zero for the experts a token did not choose."""
        out = torch.zeros(idx.shape[0], self.num_experts, device=gates.device, dtype=gates.dtype)
        return out.scatter(1, idx, gates)

    def _router_flops(self, batch: int) -> int:
        return 2 * batch * self.in_features * self.num_experts

    def train_flops(self, batch: int, input_needs_grad: bool = True) -> int:
        """Forward + backward FLOPs for ``batch`` rows (backward 2x forward; without an input gradient, the
        matmuls that read the input skip it)."""
        fwd = self.flops(batch)
        if input_needs_grad:
            return 3 * fwd
        return 3 * fwd - self._router_flops(batch) - self._input_step_flops(batch)

    def _rows_per_expert(self, batch: int) -> int:
        """Rows summed over experts that the running path pushes through expert networks."""
        return batch * (self.num_experts if self.dispatch == "dense" else self.active)


def _check_batch(batch) -> int:
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
        raise SpecError(f"flops(batch) needs a non-negative integer number of rows, got {batch!r}")
    return batch


def _capped(w: torch.Tensor, gain: torch.Tensor, sigma: float) -> torch.Tensor:
    """Weight normalisation of THEORY 5: g * min(1, sigma / RMS(w)) * w, with tensor ops only."""
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    rms = torch.sqrt(w.to(acc).square().mean() + RMS_EPS)
    return w * (gain.to(acc) * (sigma / torch.clamp(rms, min=sigma))).to(w.dtype)


# ---- BTT-MoE ------------------------------------------------------------------------------------------


class BTTMoE(_Routed):
    """A rank-E BTT whose rank slices are experts, top-``active`` routed per token (THEORY 6).

    >>> layer = es.BTTMoE(256, 256, experts=8, active=2)
    >>> y = layer(torch.randn(32, 256)); aux = layer.aux_loss()

    Args:
        experts, active: E experts, k chosen per token (1 <= k <= E).
        dispatch: 'dense' (default: all experts, gates of the unchosen 0) or 'sparse' (tokens grouped per
            expert); see the module docstring.
        zero_init: zero the last core ``L`` so the layer starts at 0.
        normalize: weight normalisation with one learnable gain per core in ``layer.gains`` (caps at the
            rank-1 init std).
        router_bias: give the router a bias (zero-initialised).
        pad_tolerance: as for StructuredLinear.

    ``layer.structure`` is the compiled rank-E BTT (the dense path's plan); ``layer.expert_structure`` the
    rank-1 BTT whose per-core init std and kappa every expert uses.
    """

    def __init__(self, d_in, d_out, experts: int = 8, active: int = 2, *, bias: bool = True,
                 dispatch: str = "dense", zero_init: bool = False, normalize: bool = False,
                 router_bias: bool = False, pad_tolerance: float = 0.15, device=None, dtype=None):
        super().__init__()
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise SpecError(f"BTTMoE: dtype must be a floating-point torch.dtype, got {dtype!r}")
        factory = {"device": device, "dtype": dtype}
        self._init_routing(d_in, d_out, experts, active, dispatch, router_bias, factory)
        self.structure = compile_structure(presets.btt(rank=experts), d_in, d_out, pad_tolerance=pad_tolerance)
        self.expert_structure = compile_structure(presets.btt(rank=1), d_in, d_out, pad_tolerance=pad_tolerance)
        sz = self.structure.sizes
        one = self.expert_structure.sizes
        self._g, self._a, self._f, self._e = (sz[k] for k in "gafe")
        if (one["g"], one["a"], one["f"], one["e"]) != (self._g, self._a, self._f, self._e) or \
                self.structure.order != (0, 1) or self.expert_structure.order != (0, 1):
            raise SpecError(f"BTTMoE({d_in} -> {d_out}): the rank-1 and rank-{experts} BTT split the layer "
                            "differently; use sizes with an exact square-root-like split (multiples of 64)")
        self.zero_init, self.normalize = bool(zero_init), bool(normalize)
        self.init_stds: dict[str, float] = {c.name: c.init_std for c in self.expert_structure.cores}
        self.R = nn.Parameter(torch.empty(self._g, self._a, self._f, experts, **factory))
        self.L = nn.Parameter(torch.empty(self._f, self._g, experts, self._e, **factory))
        self.gains = nn.ParameterDict({n: nn.Parameter(torch.ones((), **factory)) for n in ("R", "L")}) \
            if self.normalize else None
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @property
    def core_names(self) -> tuple[str, ...]:
        return ("R", "L")

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.R.normal_(0.0, self.init_stds["R"])
            if self.zero_init:
                self.L.zero_()
            else:
                self.L.normal_(0.0, self.init_stds["L"])
            if self.gains is not None:
                for g in self.gains.values():
                    g.fill_(1.0)
            if self.bias is not None:
                self.bias.zero_()
        self._reset_router()

    def effective_cores(self) -> dict[str, torch.Tensor]:
        cores = {"R": self.R, "L": self.L}
        if self.gains is None:
            return cores
        return {n: _capped(w, self.gains[n], self.init_stds[n]) for n, w in cores.items()}

    # ---- running ------------------------------------------------------------------------------------
    def _experts_dense(self, xp: torch.Tensor, gate: torch.Tensor, R: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
        """(n, d_in_padded) with (n, E) gates -> (n, d_out_padded): both steps over all experts."""
        n = xp.shape[0]
        g, a, f, e, E = self._g, self._a, self._f, self._e, self.num_experts
        act = xp.view(n, g, a).transpose(0, 1).contiguous()  # (g, n, a)
        z = torch.bmm(act, R.reshape(g, a, f * E)).view(g, n, f, E)  # step 1, block-diagonal over g
        z = z * gate.to(z.dtype).reshape(1, n, 1, E)  # the gates scale the rank slices of the intermediate
        z = z.permute(2, 1, 0, 3).reshape(f, n, g * E)
        y = torch.bmm(z, L.reshape(f, g * E, e))  # step 2, block-diagonal over f, summing g and the experts
        return y.transpose(0, 1).reshape(n, f * e)

    def _expert(self, Rs: torch.Tensor, Ls: torch.Tensor):
        g, a, f, e = self._g, self._a, self._f, self._e

        def run(i: int, rows: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
            c = rows.shape[0]
            act = rows.reshape(c, g, a).transpose(0, 1).contiguous()  # (g, c, a)
            z = torch.bmm(act, Rs[i]) * gate.to(rows.dtype).view(1, c, 1)  # (g, c, f)
            z = z.permute(2, 1, 0).contiguous()  # (f, c, g)
            return torch.bmm(z, Ls[i]).transpose(0, 1).reshape(c, f * e)

        return run

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, n, x2, idx, gates = self._rows(x)
        pad_in = self.structure.d_in_padded - self.in_features
        xp = F.pad(x2, (0, pad_in)) if pad_in else x2
        cores = self.effective_cores()
        R, L = cores["R"], cores["L"]
        if n == 0:
            y = xp.new_zeros(0, self.structure.d_out_padded)
        elif self.dispatch == "dense":
            y = self._experts_dense(xp, self._dense_gates(idx, gates), R, L)
        else:
            Rs = R.permute(3, 0, 1, 2).contiguous()  # (E, g, a, f): one weight-sized copy per forward
            Ls = L.permute(2, 0, 1, 3).contiguous()  # (E, f, g, e)
            y = self._sparse(xp, idx, gates, self._expert(Rs, Ls))
        y = y[:, : self.out_features]
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def to_dense(self, gates=None) -> torch.Tensor:
        """The (out_features, in_features) matrix sum_e gates[e] W_e (default: all gates 1, the rank-E BTT)."""
        R, L = self.effective_cores().values()
        gate = torch.ones(self.num_experts, device=R.device, dtype=R.dtype) if gates is None else \
            torch.as_tensor(gates, device=R.device, dtype=R.dtype)
        if gate.shape != (self.num_experts,):
            raise SpecError(f"to_dense(gates): gates must have shape ({self.num_experts},), got {tuple(gate.shape)}")
        d = self.structure.d_in_padded
        eye = torch.eye(d, device=R.device, dtype=R.dtype)
        cols = self._experts_dense(eye, gate.expand(d, -1), R, L)
        return cols[: self.in_features, : self.out_features].transpose(0, 1).contiguous()

    # ---- reporting ----------------------------------------------------------------------------------
    def expert_flops_per_token(self) -> int:
        """Forward FLOPs of one expert (a rank-1 BTT) on one token."""
        return self.expert_structure.flops

    def flops(self, batch: int) -> int:
        """Forward FLOPs for ``batch`` rows on the path that runs: router + expert steps."""
        batch = _check_batch(batch)
        return self._router_flops(batch) + self._rows_per_expert(batch) * self.expert_flops_per_token()

    def _input_step_flops(self, batch: int) -> int:
        return self._rows_per_expert(batch) * 2 * self.expert_structure.cores[0].macs

    @property
    def params(self) -> int:
        """Weights: both cores and the router (no bias, no gains)."""
        return self.structure.params + self.router.weight.numel()

    def table(self) -> str:
        return _paths_table(self, f"BTT-MoE: rank-{self.num_experts} BTT, experts are its rank-1 slices")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, experts={self.num_experts}, "
                f"active={self.active}, dispatch={self.dispatch!r}, bias={self.bias is not None}, "
                f"params={self.params}, flops_per_example={self.flops(1)}"
                + (", normalize=True" if self.normalize else "") + (", zero_init=True" if self.zero_init else ""))


# ---- standard MoE -------------------------------------------------------------------------------------


class _FFN(nn.Module):
    """One expert: fc (d_in -> hidden), GELU, proj (hidden -> d_out), no biases."""

    def __init__(self, fc: nn.Module, proj: nn.Module):
        super().__init__()
        self.fc, self.proj = fc, proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


def _linear(d_in: int, d_out: int, spec, zero: bool, factory: dict, **kwargs) -> nn.Module:
    if spec is None:
        lin = nn.Linear(d_in, d_out, bias=False, **factory)
        if zero:
            nn.init.zeros_(lin.weight)
        return lin
    lin = StructuredLinear(d_in, d_out, spec, bias=False, zero_init=zero, **kwargs, **factory)
    lin.dense_rows = 0  # an expert's row count depends on the routing: one path, whatever it gets
    return lin


def _linear_flops(m: nn.Module, rows: int) -> int:
    if isinstance(m, nn.Linear):
        return 2 * rows * m.in_features * m.out_features
    return int(m.flops(rows))


def _first_step_flops(m: nn.Module, rows: int) -> int:
    if isinstance(m, nn.Linear):
        return 2 * rows * m.in_features * m.out_features
    return 2 * rows * m.structure.cores[0].macs


class MoE(_Routed):
    """The standard MoE baseline: E two-layer FFN experts (d_in -> hidden -> d_out) with top-k routing.

    >>> layer = es.MoE(256, 256, experts=8, active=2)              # dense experts, hidden 4 * d_in
    >>> layer = es.MoE(256, 256, experts=8, active=2, spec="btt")  # each expert's linears are BTTs

    ``layer.experts[e].fc`` and ``.proj`` are nn.Linear (spec None or dense) or StructuredLinear; an
    expert's output is multiplied by its gate and the chosen experts' outputs are summed, plus ``bias``.
    ``zero_init`` zeroes every expert's proj (the last linear of a residual branch). Other keyword
    arguments (``normalize``, ``init_scale``, ...) go to the StructuredLinear experts.
    """

    def __init__(self, d_in, d_out, experts: int = 8, active: int = 2, hidden=None, spec=None, *,
                 bias: bool = True, dispatch: str = "dense", zero_init: bool = False, router_bias: bool = False,
                 device=None, dtype=None, **expert_kwargs):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self._init_routing(d_in, d_out, experts, active, dispatch, router_bias, factory)
        self.hidden = 4 * self.in_features if hidden is None else _check_features(hidden, "hidden")
        if spec is not None and not isinstance(spec, (Spec, str)):
            raise SpecError(f"MoE: spec must be None (dense experts), an es.Spec or a preset name, "
                            f"got {type(spec).__name__}")
        if isinstance(spec, str):
            spec = presets.get(spec)
        if spec is not None and len(spec.cores) == 1 and spec.label == "dense":
            spec = None
        if spec is None and expert_kwargs:
            raise SpecError(f"MoE: {', '.join(expert_kwargs)} only apply to structured experts; give spec=")
        self.spec = spec
        self.zero_init = bool(zero_init)
        self.experts = nn.ModuleList(
            _FFN(_linear(self.in_features, self.hidden, spec, False, factory, **expert_kwargs),
                 _linear(self.hidden, self.out_features, spec, self.zero_init, factory, **expert_kwargs))
            for _ in range(experts)
        )
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self._reset_router()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, n, x2, idx, gates = self._rows(x)
        if n == 0:
            y = x2.new_zeros(0, self.out_features)
        elif self.dispatch == "dense":
            gate = self._dense_gates(idx, gates)
            y = None
            for e, expert in enumerate(self.experts):
                ye = expert(x2)
                ye = ye * gate[:, e : e + 1].to(ye.dtype)
                y = ye if y is None else y + ye
        else:
            def run(e: int, rows: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
                ye = self.experts[e](rows)
                return ye * gate.to(ye.dtype).unsqueeze(1)

            y = self._sparse(x2, idx, gates, run)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def expert_flops_per_token(self) -> int:
        """Forward FLOPs of one expert FFN on one token (from its current linears)."""
        ex = self.experts[0]
        return _linear_flops(ex.fc, 1) + _linear_flops(ex.proj, 1)

    def flops(self, batch: int) -> int:
        """Forward FLOPs for ``batch`` rows on the path that runs: router + expert FFNs."""
        batch = _check_batch(batch)
        return self._router_flops(batch) + self._rows_per_expert(batch) * self.expert_flops_per_token()

    def _input_step_flops(self, batch: int) -> int:
        return self._rows_per_expert(batch) * _first_step_flops(self.experts[0].fc, 1)

    @property
    def params(self) -> int:
        """Weights: every expert's linears and the router (no biases, no gains)."""
        total = self.router.weight.numel()
        for ex in self.experts:
            for lin in (ex.fc, ex.proj):
                total += lin.weight.numel() if isinstance(lin, nn.Linear) else lin.structure.params
        return total

    def table(self) -> str:
        kind = "dense" if self.spec is None else (self.spec.label or self.spec.einsum)
        return _paths_table(self, f"MoE: {self.num_experts} FFN experts {self.in_features} -> {self.hidden} -> "
                                  f"{self.out_features} ({kind})")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, experts={self.num_experts}, "
                f"active={self.active}, hidden={self.hidden}, dispatch={self.dispatch!r}, "
                f"bias={self.bias is not None}, params={self.params}, flops_per_example={self.flops(1)}")


def _paths_table(layer: _Routed, title: str) -> str:
    """Both paths' forward FLOPs per token; the one that runs is marked."""
    router = layer._router_flops(1)
    expert = layer.expert_flops_per_token()
    rows = [("path", "experts run per token", "flops/token", "of which router", "")]
    for path, m in (("dense", layer.num_experts), ("sparse", layer.active)):
        runs = "<- runs" if path == layer.dispatch else ""
        rows.append((path, str(m), f"{router + m * expert:,}", f"{router:,}", runs))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [title, f"experts {layer.num_experts}, active {layer.active} per token; params {layer.params:,}", ""]
    lines += ["  ".join(c.ljust(w) if i in (0, 4) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
              for r in rows]
    lines.append("sparse = what an ideal dispatch computes (active/E of the expert work); dense runs every expert")
    return "\n".join(lines)


# ---- whole models -------------------------------------------------------------------------------------

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
