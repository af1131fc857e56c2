"""FLOP and MAC accounting (THEORY 8): forward, training (forward + backward), dense, structured, MoE, attention.

Plain integer arithmetic that also works on sympy expressions (``st.symbolic()``). Only matmul work counts.

- A step of a chain (one batched matmul) costs the product of the sizes of every axis in it, in MACs.
- Forward FLOPs = 2 x MACs.
- Training = forward + backward, backward = 2 x forward (input gradient + weight gradient) for a layer whose
  input needs a gradient. A layer fed by data skips the input gradient of the matmuls that read its input:
  its first step (a dense layer: all of it; an MoE: its router and its experts' first steps).
- MoE: router (a dense d_in x experts matmul) + the expert work for the rows the dispatch path runs (every
  expert per token on the dense path, ``active`` per token on the sparse one, and on the tiled one the
  ``active`` per token padded to whole tiles: a fixed row count that depends only on the batch, see
  ``moe_tiles``).
- Attention: the scores and the values, 2 x context x width FLOPs per token each, no causal halving.
"""

from __future__ import annotations

import math

FLOPS_PER_MAC = 2
BACKWARD_PER_FORWARD = 2
TRAIN_FLOPS_PER_MAC = FLOPS_PER_MAC * (1 + BACKWARD_PER_FORWARD)  # 6: training FLOPs per forward MAC


def step_macs(sizes):
    """MACs of one step per example: the product of the sizes of every axis that takes part in it."""
    return math.prod(sizes)


def forward_flops(macs):
    return FLOPS_PER_MAC * macs


def dense_macs(d_in, d_out, rows=1):
    return rows * d_in * d_out


def dense_flops(rows, d_in, d_out):
    """Forward FLOPs of a dense (d_out x d_in) matmul on ``rows`` rows."""
    return forward_flops(dense_macs(d_in, d_out, rows))


def train_flops(forward, input_forward=0, *, input_needs_grad: bool = True):
    """Training FLOPs of a layer from its forward FLOPs: ``3 x forward`` when its input needs a gradient; else
    without the input gradient of the matmuls that read the input, whose forward FLOPs are ``input_forward``
    (the whole forward for a dense layer, the first step for a chain, router + first steps for an MoE)."""
    total = (1 + BACKWARD_PER_FORWARD) * forward
    return total if input_needs_grad else total - input_forward


def input_step_flops(structure, rows):
    """Forward FLOPs of the first step of a compiled structure's chain (the one that reads the layer's input)."""
    return rows * forward_flops(structure.cores[0].macs)


TILES_PER_SHARE = 8  # the tiled dispatch's tile is 1/8 of an expert's even share of the assignments


def moe_tiles(assignments: int, experts: int) -> tuple[int, int]:
    """(rows per tile, tiles) of the tiled MoE dispatch for ``assignments`` = tokens x active.

    Each expert's assignments fill whole tiles of ``tile = ceil(assignments / (8 x experts))`` rows, so an expert
    with c assignments takes ceil(c / tile) tiles, and over any routing the tiles number at most
    ``(assignments + experts x (tile - 1)) // tile``: a fixed count, the one the dispatch allocates. The rows it
    computes, tile x tiles, exceed the assignments by less than ``experts x tile`` (about 1/8 of them on a
    large batch; none when tile is 1)."""
    tile = max(1, -(-assignments // (TILES_PER_SHARE * experts)))
    return tile, (assignments + experts * (tile - 1)) // tile


def moe_expert_rows(batch, experts, active, dispatch: str):
    """Rows summed over experts that an MoE's dispatch path pushes through expert networks."""
    if dispatch == "tiled":
        tile, tiles = moe_tiles(batch * active, experts)
        return tile * tiles
    return batch * (experts if dispatch == "dense" else active)


def moe_flops(router, expert_rows, expert_flops_per_row):
    """Forward FLOPs of an MoE: the router's plus each routed row's expert work."""
    return router + expert_rows * expert_flops_per_row


def attention_flops(context, width):
    """Forward FLOPs per token per layer of attention's two matmuls (QK^T and AV), no causal halving."""
    return 2 * dense_flops(1, context, width)
