"""Mixture-of-experts layers: BTTMoE (the rank slices of a BTT are the experts) and MoE (E whole FFNs).

The package: ``config`` (MoEConfig and the checks, torch-free), ``routing`` (router, gates, losses, the sparse
and tiled dispatches), ``btt`` (BTTMoE), ``ffn`` (MoE), ``models`` (MOE_LAYERS, moe_aux_loss). Importing the package
or its config does not import torch; the layers load on first use.

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

Three execution paths, chosen by ``dispatch`` (a fixed option, never measured):

- ``"dense"`` (the default): every expert runs on every token and the gates of the unchosen experts are 0.
  One batched matmul per step, no host reads, so it suits torch.compile and CUDA graphs; it computes
  E/active times the expert work of the sparse path, and ``flops(batch)`` says so.
- ``"sparse"``: tokens are grouped per expert (a stable sort of the token-to-expert assignments) and each
  expert runs only on its own tokens, so the expert work is active/E of the dense path. Sizing the groups
  reads the E token counts back to the host once per forward (one device sync per layer on CUDA).
  Results are put back in token order and summed over the ``active`` choices with plain indexing and a
  sum, with no atomic adds, so both paths are deterministic.
- ``"tiled"``: the grouping of ``"sparse"`` with fixed shapes and no host read (no device sync, so it suits
  CUDA and graph capture): each expert's tokens fill whole tiles of ``tile`` rows, and the tiles number
  what any routing can need (``es.rules.moe_tiles``: tile = ceil(n k / 8E), tiles = (n k + E (tile - 1)) //
  tile, both from the batch alone), so no token is ever dropped and the result equals the dense path's.
  Each tile runs its expert as one batched matmul with that expert's weights gathered per tile; the
  padding rows are zeros, computed and counted: ``flops(batch)`` reports tile x tiles rows, fewer than
  n k / 8 + E more than ``"sparse"`` (9,088 for 8,192 assignments at 4,096 tokens, E = 8, k = 2). The FFN
  ``MoE`` needs dense experts for it. On CPU its weight gradient is summed in order; on CUDA that sum
  (index_add) uses atomic adds, so it is run-to-run deterministic only under
  ``torch.use_deterministic_algorithms(True)``.

Gradients never divide by a gate: the gates only multiply. ``layer.flops(batch)`` is the forward FLOPs of
the path that runs (router included), equal to what FlopCounterMode counts; ``layer.table()`` shows the
paths. ``layer.router_stats()`` returns detached tensors (mean per-token router entropy in nats, the load
of each expert, its mean router probability) without reading anything back to the host.
"""

from __future__ import annotations

from importlib import import_module

from .config import AUX_WEIGHT, DISPATCHES, KINDS, Z_LOSS_WEIGHT, MoEConfig, is_btt_expert_spec

_LAZY = {"BTTMoE": ".btt", "MoE": ".ffn", "MOE_LAYERS": ".models", "moe_layers": ".models", "moe_aux_loss": ".models"}

__all__ = ["AUX_WEIGHT", "DISPATCHES", "KINDS", "Z_LOSS_WEIGHT", "MoEConfig", "is_btt_expert_spec", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
