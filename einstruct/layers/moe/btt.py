"""BTTMoE: a rank-E Block Tensor-Train whose rank slices are the experts (THEORY 6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ... import presets, rules
from ...compiler import compile as compile_structure
from ...errors import SpecError
from ..linear import RMS_EPS
from .config import check_batch
from .routing import _paths_table, _Routed


def _capped(w: torch.Tensor, gain: torch.Tensor, sigma: float) -> torch.Tensor:
    """Weight normalisation of THEORY 5: g * min(1, sigma / RMS(w)) * w, with tensor ops only."""
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    rms = torch.sqrt(w.to(acc).square().mean() + RMS_EPS)
    return w * (gain.to(acc) * (sigma / torch.clamp(rms, min=sigma))).to(w.dtype)


class BTTMoE(_Routed):
    """A rank-E BTT whose rank slices are experts, top-``active`` routed per token (THEORY 6).

    >>> layer = es.BTTMoE(256, 256, experts=8, active=2)
    >>> y = layer(torch.randn(32, 256)); aux = layer.aux_loss()

    Args:
        experts, active: E experts, k chosen per token (1 <= k <= E).
        dispatch: 'dense' (default: all experts, gates of the unchosen 0), 'sparse' (tokens grouped per
            expert) or 'tiled' (the same in fixed-size tiles, no host read); see the module docstring.
        zero_init: zero the last core ``L`` so the layer starts at 0.
        normalize: weight normalisation with one learnable gain per core in ``layer.gains`` (caps at the
            rank-1 init std).
        router_bias: give the router a bias (zero-initialised).
        pad_tolerance: as for StructuredLinear.

    ``layer.structure`` is the compiled rank-E BTT (the dense path's plan); ``layer.expert_structure`` the
    rank-1 BTT whose per-core init std and kappa every expert uses.
    """

    def __init__(
        self,
        d_in,
        d_out,
        experts: int = 8,
        active: int = 2,
        *,
        bias: bool = True,
        dispatch: str = "dense",
        zero_init: bool = False,
        normalize: bool = False,
        router_bias: bool = False,
        pad_tolerance: float = 0.15,
        device=None,
        dtype=None,
    ):
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
        if (
            (one["g"], one["a"], one["f"], one["e"]) != (self._g, self._a, self._f, self._e)
            or self.structure.order != (0, 1)
            or self.expert_structure.order != (0, 1)
        ):
            raise SpecError(
                f"BTTMoE({d_in} -> {d_out}): the rank-1 and rank-{experts} BTT split the layer "
                "differently; use sizes with an exact square-root-like split (multiples of 64)"
            )
        self.zero_init, self.normalize = bool(zero_init), bool(normalize)
        self.init_stds: dict[str, float] = {c.name: c.init_std for c in self.expert_structure.cores}
        self.R = nn.Parameter(torch.empty(self._g, self._a, self._f, experts, **factory))
        self.L = nn.Parameter(torch.empty(self._f, self._g, experts, self._e, **factory))
        self.gains = (
            nn.ParameterDict({n: nn.Parameter(torch.ones((), **factory)) for n in ("R", "L")})
            if self.normalize
            else None
        )
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

    def _experts_tiled(self, R: torch.Tensor, L: torch.Tensor):
        g, a, f, e = self._g, self._a, self._f, self._e

        def run(experts: torch.Tensor, rows: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
            t, b = gate.shape  # tiles of b rows; tile i runs expert experts[i]
            Rt = R.permute(3, 0, 1, 2).index_select(0, experts).view(t * g, a, f)  # each tile's expert cores
            Lt = L.permute(2, 0, 1, 3).index_select(0, experts).view(t * f, g, e)
            act = rows.reshape(t, b, g, a).transpose(1, 2).reshape(t * g, b, a)
            z = torch.bmm(act, Rt).view(t, g, b, f) * gate.to(rows.dtype).view(t, 1, b, 1)
            z = z.permute(0, 3, 2, 1).reshape(t * f, b, g)
            return torch.bmm(z, Lt).view(t, f, b, e).transpose(1, 2).reshape(t, b, f * e)

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
        elif self.dispatch == "tiled":
            y = self._tiled(xp, idx, gates, self._experts_tiled(R, L))
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
        gate = (
            torch.ones(self.num_experts, device=R.device, dtype=R.dtype)
            if gates is None
            else torch.as_tensor(gates, device=R.device, dtype=R.dtype)
        )
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
        batch = check_batch(batch)
        return rules.moe_flops(self._router_flops(batch), self._rows_per_expert(batch), self.expert_flops_per_token())

    def _input_step_flops(self, batch: int) -> int:
        return rules.input_step_flops(self.expert_structure, self._rows_per_expert(batch))

    @property
    def params(self) -> int:
        """Weights: both cores and the router (no bias, no gains)."""
        return self.structure.params + self.router.weight.numel()

    def table(self) -> str:
        return _paths_table(self, f"BTT-MoE: rank-{self.num_experts} BTT, experts are its rank-1 slices")

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, experts={self.num_experts}, "
            f"active={self.active}, dispatch={self.dispatch!r}, bias={self.bias is not None}, "
            f"params={self.params}, flops_per_example={self.flops(1)}"
            + (", normalize=True" if self.normalize else "")
            + (", zero_init=True" if self.zero_init else "")
        )
