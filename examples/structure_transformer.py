"""Structure a tiny GPT with BTT and train it with muP rates: es.structure, es.summary, es.param_groups.

    python examples/structure_transformer.py            # about 30 steps, well under a minute on a CPU

A 2-layer character-level transformer (width 128) on a synthetic text made up in this script (no
downloads). Every linear layer but the output head becomes a rank-1 BTT with weight normalisation
(THEORY 5); the learning rates come from es.param_groups with the same model built at width 64 on the
meta device as the base (THEORY 4).
"""

from __future__ import annotations

import argparse
import random
import time

import torch
import torch.nn.functional as F
from torch import nn

import einstruct as es


def make_text(n_chars: int = 60_000, seed: int = 0) -> str:
    """Sentences from a small random grammar: enough structure for a loss that visibly falls."""
    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "my friend", "the old man", "she", "he", "the bird", "our teacher"]
    verbs = ["sees", "likes", "finds", "follows", "draws", "remembers", "carries", "paints"]
    objects = ["the red ball", "a small house", "the river", "an apple", "the moon", "a green door", "the map"]
    endings = [".", "!", " today.", " again.", " at night.", " in the garden."]
    parts = []
    while sum(len(p) for p in parts) < n_chars:
        parts.append(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}{rng.choice(endings)}\n")
    return "".join(parts)[:n_chars]


class Attention(nn.Module):
    def __init__(self, width: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = width // head_dim, head_dim
        self.q = nn.Linear(width, width, bias=False)
        self.k = nn.Linear(width, width, bias=False)
        self.v = nn.Linear(width, width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)

    def forward(self, x):
        b, t, w = x.shape
        q, k, v = (f(x).view(b, t, self.heads, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
        # muP attention: scores scaled by 1/d_head instead of 1/sqrt(d_head)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / self.head_dim)
        return self.proj(y.transpose(1, 2).reshape(b, t, w))


class Block(nn.Module):
    def __init__(self, width: int, head_dim: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = Attention(width, head_dim)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, width: int = 128, layers: int = 2, context: int = 64, head_dim: int = 32):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.ModuleList([Block(width, head_dim) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)  # registered last: "all_but_last" keeps it dense
        with torch.no_grad():  # muP zero init: query, last linear of each residual branch, output head
            for blk in self.blocks:
                for lin in (blk.attn.q, blk.attn.proj, blk.out):
                    lin.weight.zero_()
            self.head.weight.zero_()

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--base-width", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    text = make_text(seed=args.seed)
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]

    model = GPT(len(chars), args.width, context=args.context)
    before = es.summary(model)
    print(f"dense model:\n{before}\n")
    es.structure(model, es.presets.btt(rank=1), select="all_but_last", normalize=True)
    print(f"structured with BTT rank 1 (all but the head):\n{es.summary(model, baseline=before)}\n")

    with torch.device("meta"):
        base = GPT(len(chars), args.base_width, context=args.context)
    groups = es.param_groups(model, lr=args.lr, base=base, weight_decay=0.1)
    for g in groups:
        print(f"lr {g['lr']:.2e}  wd {g.get('weight_decay', 0):g}  {len(g['params'])} tensors, e.g. {g['name'][0]}")
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95))

    gen = torch.Generator().manual_seed(args.seed)

    def batch(source):
        i = torch.randint(len(source) - args.context - 1, (args.batch,), generator=gen)
        x = torch.stack([source[j : j + args.context] for j in i])
        y = torch.stack([source[j + 1 : j + 1 + args.context] for j in i])
        return x, y

    print(f"\ntraining {args.steps} steps (uniform guess: loss {torch.log(torch.tensor(len(chars))):.3f})")
    start = time.time()
    for step in range(1, args.steps + 1):
        x, y = batch(train)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step == 1 or step % 5 == 0:
            print(f"step {step:3d}  train loss {loss.item():.3f}  ({time.time() - start:.1f}s)")
    model.eval()
    with torch.no_grad():
        x, y = batch(val)
        print(f"validation loss {F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item():.3f}")


if __name__ == "__main__":
    main()
