"""Routing shared by both MoE layers: the zero-initialised router, top-k gates, load-balancing losses,
router statistics, the sparse dispatches (tokens grouped per expert; or in fixed-size tiles, with no host
read) and the FLOPs table of the paths."""

from __future__ import annotations

import math

import torch
from torch import nn

from ... import rules
from ...errors import SpecError
from ..checks import check_features
from .config import Z_LOSS_WEIGHT, _check_dispatch, _check_experts


class _Routed(nn.Module):
    """Router, top-k gates, load-balancing losses, statistics and sparse dispatch shared by both layers."""

    def _init_routing(self, d_in, d_out, experts, active, dispatch, router_bias, factory) -> None:
        who = type(self).__name__
        self.in_features = check_features(d_in, "d_in")
        self.out_features = check_features(d_out, "d_out")
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
        self._stats = {
            "entropy": entropy.detach(),
            "load": load.detach(),
            "importance": importance.detach(),
            "switch_loss": switch.detach(),
            "z_loss": z.detach(),
        }

    def aux_loss(self) -> torch.Tensor:
        """Switch loss + 0.1 x z-loss of the last forward (THEORY 6); add it to the loss with weight 0.01."""
        if self._aux is None:
            raise RuntimeError(
                f"{type(self).__name__}.aux_loss(): the layer has not run a forward pass yet; call it on a batch first"
            )
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

    def _tiled(self, x2: torch.Tensor, idx: torch.Tensor, gates: torch.Tensor, tiles_fn) -> torch.Tensor:
        """Run ``tiles_fn(tile_experts, rows, gate)`` on each expert's tokens packed into whole tiles of a fixed
        size; sum over the k choices per token. No host read: every shape depends on (n, k, E) only.

        The assignments are grouped per expert in the token order (the grouping of ``_sparse``), each group is
        padded to whole tiles (rules.moe_tiles: ``tiles`` tiles of ``tile`` rows, enough for any routing) and
        ``tiles_fn`` gets the (tiles,) expert of each tile, the (tiles, tile, d) rows and the (tiles, tile)
        gates, zero on the padding rows and on the unused tiles at the end (which name expert E - 1)."""
        n, k = idx.shape
        experts = self.num_experts
        tile, tiles = rules.moe_tiles(n * k, experts)
        flat = idx.reshape(-1)  # assignment a = token * k + choice
        order = torch.argsort(flat, stable=True)
        ones = torch.ones_like(flat)
        counts = torch.zeros(experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, ones)
        padded = (counts + (tile - 1)) // tile * tile  # rows of each expert's tiles
        ranked = torch.arange(n * k, device=flat.device) - (counts.cumsum(0) - counts).index_select(0, flat[order])
        at = torch.empty_like(flat).index_copy_(0, order, ranked)  # a's place in its expert's group
        pos = (padded.cumsum(0) - padded).index_select(0, flat) + at  # a's row in the tiles (all distinct)
        rows = x2.unsqueeze(1).expand(n, k, x2.shape[-1]).reshape(n * k, -1)
        packed = x2.new_zeros(tiles * tile, x2.shape[-1]).index_copy(0, pos, rows)
        g = gates.new_zeros(tiles * tile).index_copy(0, pos, gates.reshape(-1))
        ends = padded.cumsum(0) // tile  # the tile after each expert's last
        tile_experts = torch.searchsorted(ends, torch.arange(tiles, device=flat.device), right=True)
        tile_experts = tile_experts.clamp_(max=experts - 1)
        ys = tiles_fn(tile_experts, packed.view(tiles, tile, -1), g.view(tiles, tile))
        return ys.reshape(tiles * tile, -1).index_select(0, pos).view(n, k, -1).sum(dim=1)

    def _dense_gates(self, idx: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """(n, E) gate weights, zero for the experts a token did not choose."""
        out = torch.zeros(idx.shape[0], self.num_experts, device=gates.device, dtype=gates.dtype)
        return out.scatter(1, idx, gates)

    def _router_flops(self, batch: int) -> int:
        return rules.dense_flops(batch, self.in_features, self.num_experts)

    def train_flops(self, batch: int, input_needs_grad: bool = True) -> int:
        """Forward + backward FLOPs for ``batch`` rows (backward 2x forward; without an input gradient, the
        matmuls that read the input skip it)."""
        return rules.train_flops(
            self.flops(batch),
            self._router_flops(batch) + self._input_step_flops(batch),
            input_needs_grad=input_needs_grad,
        )

    def _rows_per_expert(self, batch: int) -> int:
        """Rows summed over experts that the running path pushes through expert networks."""
        return rules.moe_expert_rows(batch, self.num_experts, self.active, self.dispatch)


def _paths_table(layer: _Routed, title: str) -> str:
    """Both paths' forward FLOPs per token; the one that runs is marked."""
    router = layer._router_flops(1)
    expert = layer.expert_flops_per_token()
    rows = [("path", "experts run per token", "flops/token", "of which router", "")]
    for path, m in (("dense", layer.num_experts), ("sparse", layer.active)):
        runs = "<- runs" if path == layer.dispatch else ""
        rows.append((path, str(m), f"{rules.moe_flops(router, m, expert):,}", f"{router:,}", runs))
    if layer.dispatch == "tiled":  # per token at a batch of 1024 rows: the tiles' padding depends on the batch
        m = rules.moe_expert_rows(1024, layer.num_experts, layer.active, "tiled") / 1024
        flops = rules.moe_flops(router, m, expert)
        rows.append(("tiled", f"{m:.3g}", f"{flops:,.0f}", f"{router:,}", "<- runs (at a batch of 1024)"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [title, f"experts {layer.num_experts}, active {layer.active} per token; params {layer.params:,}", ""]
    lines += [
        "  ".join(c.ljust(w) if i in (0, 4) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
        for r in rows
    ]
    lines.append("sparse = what an ideal dispatch computes (active/E of the expert work); dense runs every expert")
    if layer.dispatch == "tiled":
        lines.append("tiled = sparse padded to whole tiles, a fixed shape with no host read (flops(batch) is exact)")
    return "\n".join(lines)
