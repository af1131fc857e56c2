"""MoE: the standard mixture-of-experts baseline, E two-layer FFN experts (dense or structured linears)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ... import presets, rules
from ...errors import SpecError
from ...spec import Spec
from ..checks import check_features
from ..linear import StructuredLinear
from .config import check_batch
from .routing import _paths_table, _Routed


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
        return rules.dense_flops(rows, m.in_features, m.out_features)
    return int(m.flops(rows))


def _first_step_flops(m: nn.Module, rows: int) -> int:
    if isinstance(m, nn.Linear):
        return rules.dense_flops(rows, m.in_features, m.out_features)
    return rules.input_step_flops(m.structure, rows)


class MoE(_Routed):
    """The standard MoE baseline: E two-layer FFN experts (d_in -> hidden -> d_out) with top-k routing.

    >>> layer = es.MoE(256, 256, experts=8, active=2)              # dense experts, hidden 4 * d_in
    >>> layer = es.MoE(256, 256, experts=8, active=2, spec="btt")  # each expert's linears are BTTs

    ``layer.experts[e].fc`` and ``.proj`` are nn.Linear (spec None or dense) or StructuredLinear; an
    expert's output is multiplied by its gate and the chosen experts' outputs are summed, plus ``bias``.
    ``zero_init`` zeroes every expert's proj (the last linear of a residual branch). Other keyword
    arguments (``normalize``, ``init_scale``, ...) go to the StructuredLinear experts.
    """

    def __init__(
        self,
        d_in,
        d_out,
        experts: int = 8,
        active: int = 2,
        hidden=None,
        spec=None,
        *,
        bias: bool = True,
        dispatch: str = "dense",
        zero_init: bool = False,
        router_bias: bool = False,
        device=None,
        dtype=None,
        **expert_kwargs,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self._init_routing(d_in, d_out, experts, active, dispatch, router_bias, factory)
        self.hidden = 4 * self.in_features if hidden is None else check_features(hidden, "hidden")
        if spec is not None and not isinstance(spec, (Spec, str)):
            raise SpecError(
                f"MoE: spec must be None (dense experts), an es.Spec or a preset name, got {type(spec).__name__}"
            )
        if isinstance(spec, str):
            spec = presets.get(spec)
        if spec is not None and len(spec.cores) == 1 and spec.label == "dense":
            spec = None
        if spec is not None and dispatch == "tiled":
            raise SpecError(
                "MoE: dispatch 'tiled' batches the experts' weights per tile and needs dense experts (spec=None); "
                "use dispatch 'sparse' for structured experts"
            )
        if spec is None and expert_kwargs:
            raise SpecError(f"MoE: {', '.join(expert_kwargs)} only apply to structured experts; give spec=")
        self.spec = spec
        self.zero_init = bool(zero_init)
        self.experts = nn.ModuleList(
            _FFN(
                _linear(self.in_features, self.hidden, spec, False, factory, **expert_kwargs),
                _linear(self.hidden, self.out_features, spec, self.zero_init, factory, **expert_kwargs),
            )
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
        elif self.dispatch == "tiled":
            y = self._tiled(x2, idx, gates, self._experts_tiled())
        else:

            def run(e: int, rows: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
                ye = self.experts[e](rows)
                return ye * gate.to(ye.dtype).unsqueeze(1)

            y = self._sparse(x2, idx, gates, run)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def _experts_tiled(self):
        fcs, projs = [ex.fc for ex in self.experts], [ex.proj for ex in self.experts]
        if not all(isinstance(m, nn.Linear) for m in fcs + projs):
            raise SpecError(
                "MoE: dispatch 'tiled' batches the experts' weights per tile and needs dense (nn.Linear) experts; "
                "this layer's experts were structured, so use dispatch 'sparse'"
            )
        w1 = torch.stack([m.weight.t() for m in fcs])  # (E, d_in, hidden), so each tile's gathered copy and its
        w2 = torch.stack([m.weight.t() for m in projs])  # gradient are contiguous (E, hidden, d_out)

        def run(experts: torch.Tensor, rows: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
            h = F.gelu(torch.bmm(rows, w1.index_select(0, experts)))
            y = torch.bmm(h, w2.index_select(0, experts))
            return y * gate.to(y.dtype).unsqueeze(-1)

        return run

    def expert_flops_per_token(self) -> int:
        """Forward FLOPs of one expert FFN on one token (from its current linears)."""
        ex = self.experts[0]
        return _linear_flops(ex.fc, 1) + _linear_flops(ex.proj, 1)

    def flops(self, batch: int) -> int:
        """Forward FLOPs for ``batch`` rows on the path that runs: router + expert FFNs."""
        batch = check_batch(batch)
        return rules.moe_flops(self._router_flops(batch), self._rows_per_expert(batch), self.expert_flops_per_token())

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
        return _paths_table(
            self,
            f"MoE: {self.num_experts} FFN experts {self.in_features} -> {self.hidden} -> {self.out_features} ({kind})",
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, experts={self.num_experts}, "
            f"active={self.active}, hidden={self.hidden}, dispatch={self.dispatch!r}, "
            f"bias={self.bias is not None}, params={self.params}, flops_per_example={self.flops(1)}"
        )
