"""A small GPT: pre-LN, QK layer norm, muP attention scale 1/d_head, zero-init head and query (THEORY 7).

``moe`` (an es.MoEConfig of kind 'ffn') makes each block's MLP a standard MoE of FFN experts
(``block.moe``, an es.MoE width -> 4 width -> width with zero-initialised expert projections).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import einstruct as es


class Attention(nn.Module):
    def __init__(self, width: int, d_head: int, explicit: bool):
        super().__init__()
        self.heads, self.d_head, self.explicit = width // d_head, d_head, explicit
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.o = nn.Linear(width, width)
        self.q_norm, self.k_norm = nn.LayerNorm(d_head), nn.LayerNorm(d_head)
        nn.init.zeros_(self.q.weight)  # muP: zero-init query
        nn.init.zeros_(self.o.weight)  # last linear of the residual branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        split = lambda z: z.view(b, t, self.heads, self.d_head).transpose(1, 2)
        q, k, v = self.q_norm(split(self.q(x))), self.k_norm(split(self.k(x))), split(self.v(x))
        scale = 1.0 / self.d_head  # muP attention scale
        if self.explicit:  # plain matmuls, so FlopCounterMode sees the attention work
            att = (q @ k.transpose(-2, -1)) * scale
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            att = att.masked_fill(~mask, float("-inf")).softmax(-1)
            y = att @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return self.o(y.transpose(1, 2).reshape(b, t, w))


class Block(nn.Module):
    def __init__(self, width: int, d_head: int, explicit: bool, moe: es.MoEConfig | None = None):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width, d_head, explicit)
        if moe is None:
            self.fc, self.proj = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
            nn.init.zeros_(self.proj.weight)
        else:
            self.moe = es.MoE(
                width,
                width,
                experts=moe.experts,
                active=moe.active,
                hidden=moe.hidden_ratio * width,
                dispatch=moe.dispatch,
                zero_init=True,
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        if hasattr(self, "moe"):
            return x + self.moe(self.ln2(x))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(
        self,
        vocab: int,
        width: int,
        depth: int,
        context: int,
        d_head: int = 64,
        explicit: bool = False,
        moe: es.MoEConfig | None = None,
    ):
        super().__init__()
        if moe is not None and moe.kind != "ffn":
            raise es.SpecError(
                f"GPT(moe=...) makes the MLPs standard MoEs and needs kind 'ffn', got {moe.kind!r}; "
                "make linears BTT-MoE with es.structure(model, 'btt', moe=...)"
            )
        self.context = context
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, d_head, explicit, moe) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        nn.init.zeros_(self.head.weight)  # muP: zero-init output head

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x))
