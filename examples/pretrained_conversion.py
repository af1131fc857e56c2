"""Convert a pretrained dense model to a structured one: es.structure(..., init="project"), then fine-tune.

    python examples/pretrained_conversion.py            # about 75 s of CPU time (2 threads)

A small character-level transformer is pretrained dense on local text (this project's README and docs;
``--data FILE`` for another text file; nothing is downloaded). Then every linear layer but the output head
becomes a BTT by projecting its pretrained weight onto the structure (``init="project"``: the closest
structured matrix in Frobenius norm; es.summary shows each layer's relative projection error). The
validation loss is printed before, right after projection and after a short fine-tune at the muP rates
of es.param_groups, beside the same structure trained from scratch for as many steps at the same rates.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import einstruct as es

ROOT = Path(__file__).resolve().parents[1]


def local_text() -> str:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files if p.is_file())


class Block(nn.Module):
    def __init__(self, width: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = width // head_dim, head_dim
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.k, self.v = (nn.Linear(width, width, bias=False) for _ in range(3))
        self.proj = nn.Linear(width, width, bias=False)
        self.fc, self.out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        b, t, w = x.shape
        h = self.ln1(x)
        q, k, v = (f(h).view(b, t, self.heads, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / self.head_dim)  # muP: 1/d_head
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, w))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, width: int, context: int, layers: int = 2, head_dim: int = 16):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, head_dim) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)  # registered last: "all_but_last" keeps it dense
        if self.head.weight.device.type != "meta":
            with torch.no_grad():  # muP zero init: query, last linear of each residual branch, output head
                for blk in self.blocks:
                    for lin in (blk.q, blk.proj, blk.out):
                        lin.weight.zero_()
                self.head.weight.zero_()

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None, help="a text file (default: this project's README and docs)")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--finetune-steps", type=int, default=100)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--base-width", type=int, default=32)
    ap.add_argument("--rank", type=int, default=2, help="the BTT rank (2: about half the dense parameters)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    text = args.data.read_text(encoding="utf-8", errors="replace") if args.data else local_text()
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    gen = torch.Generator().manual_seed(args.seed)
    val_gen = torch.Generator().manual_seed(args.seed + 1)
    val_batches = [_batch(val, args, val_gen) for _ in range(8)]  # the same held-out batches for every model
    spec = es.presets.btt(rank=args.rank)
    make = lambda width: GPT(len(chars), width, args.context)

    def base(structured: bool) -> nn.Module:
        with torch.device("meta"):
            b = make(args.base_width)
        return es.structure(b, spec) if structured else b

    def train_steps(model: nn.Module, steps: int, base_model: nn.Module) -> float:
        opt = torch.optim.AdamW(
            es.param_groups(model, lr=args.lr, base=base_model, weight_decay=0.1), betas=(0.9, 0.95)
        )
        model.train()
        for _ in range(steps):
            x, y = _batch(train, args, gen)
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return evaluate(model, val_batches)

    start = time.time()
    print(
        f"{len(text):,} characters of local text, {len(chars)} symbols (uniform guess: loss {math.log(len(chars)):.3f})"
    )
    dense = make(args.width)
    pretrained = train_steps(dense, args.pretrain_steps, base(False))
    print(f"pretrained the dense model for {args.pretrain_steps} steps ({time.time() - start:.0f}s)")

    converted = es.structure(copy.deepcopy(dense), spec, init="project")
    table = es.summary(converted, es.summary(dense))
    print(f"\nprojected onto {spec.label} (every linear layer but the head):\n{table}\n")
    projected = evaluate(converted, val_batches)
    finetuned = train_steps(converted, args.finetune_steps, base(True))
    torch.manual_seed(args.seed)
    scratch = train_steps(es.structure(make(args.width), spec), args.finetune_steps, base(True))

    rows = [
        ("dense, pretrained", pretrained),
        (f"{spec.label}, projected (no training)", projected),
        (f"{spec.label}, projected + {args.finetune_steps} fine-tune steps", finetuned),
        (f"{spec.label}, from scratch, {args.finetune_steps} steps", scratch),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'model':<{width}}  validation loss")
    for name, loss in rows:
        print(f"{name:<{width}}  {loss:.3f}")
    print(f"({time.time() - start:.0f}s in all)")


def _batch(source: torch.Tensor, args, gen: torch.Generator):
    i = torch.randint(len(source) - args.context - 1, (args.batch,), generator=gen)
    x = torch.stack([source[j : j + args.context] for j in i])
    y = torch.stack([source[j + 1 : j + 1 + args.context] for j in i])
    return x, y


def evaluate(model: nn.Module, batches) -> float:
    model.eval()
    with torch.no_grad():
        losses = [F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() for x, y in batches]
    return sum(losses) / len(losses)


if __name__ == "__main__":
    main()
