"""muP rates from es.param_groups in a plain training loop and in transformers.Trainer (``optimizers=``).

    python examples/trainer_integration.py            # a few seconds of training each way on a CPU

The model is a tiny GPT-2 (transformers' GPT2LMHeadModel built from a config: no download) whose MLP
layers are structured with BTT; without transformers installed, a small PyTorch character model stands
in and only the plain loop runs. The text is this project's README (``--data FILE`` for another). The
optimizer is built from ``es.param_groups(model, lr, base=...)``, where ``base`` is the same model at the
base width on the meta device; Trainer takes it through ``optimizers=(optimizer, None)`` and wraps it in
its own schedule, which scales every group's rate by the same factor, so the muP ratios between groups are
kept (Trainer's ``learning_rate`` is not used). Trainer also needs ``accelerate``; without it that part
is skipped with a note.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import einstruct as es

ROOT = Path(__file__).resolve().parents[1]
HAVE_HF = importlib.util.find_spec("transformers") is not None
HAVE_TRAINER = HAVE_HF and importlib.util.find_spec("accelerate") is not None


class CharModel(nn.Module):
    """The stand-in without transformers: embed, an MLP on each position, predict the next character."""

    def __init__(self, vocab: int, width: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.fc, self.proj = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, input_ids, labels=None):
        h = self.tok(input_ids)
        logits = self.head(h + self.proj(F.gelu(self.fc(h))))
        return {"logits": logits, "loss": None if labels is None else causal_loss(logits, labels)}


def causal_loss(logits, labels):
    """Next-token cross-entropy: position t predicts token t + 1 (GPT-2 computes the same internally)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


def make_model(vocab: int, width: int, context: int) -> nn.Module:
    if HAVE_HF:
        from transformers import AutoModelForCausalLM, GPT2Config

        cfg = GPT2Config(
            n_embd=width,
            n_layer=2,
            n_head=width // 16,
            vocab_size=vocab,
            n_positions=context,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = AutoModelForCausalLM.from_config(cfg)
    else:
        model = CharModel(vocab, width)
    # GPT-2's MLP (Conv1D c_fc, c_proj) or the stand-in's fc/proj become BTTs; attention and head stay dense
    mlp = lambda name, m: name in ("fc", "proj") or name.endswith((".mlp.c_fc", ".mlp.c_proj"))
    return es.structure(model, "btt", select=mlp)


class Chunks(torch.utils.data.Dataset):
    """Fixed-length windows of the token ids, as dicts of input_ids and labels (what Trainer expects)."""

    def __init__(self, ids: torch.Tensor, context: int):
        self.ids, self.context = ids, context

    def __len__(self):
        return (len(self.ids) - 1) // self.context

    def __getitem__(self, i):
        x = self.ids[i * self.context : (i + 1) * self.context]
        return {"input_ids": x, "labels": x.clone()}


def loss_of(model, batch) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], labels=batch["labels"])
    return out["loss"] if isinstance(out, dict) else out.loss


def plain_loop(model, optimizer, data, steps: int, batch: int) -> list[float]:
    loader = torch.utils.data.DataLoader(
        data, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    losses, it = [], iter(loader)
    model.train()
    for _ in range(steps):
        try:
            b = next(it)
        except StopIteration:
            it = iter(loader)
            b = next(it)
        loss = loss_of(model, b)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT / "README.md")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--base-width", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)

    text = args.data.read_text(encoding="utf-8", errors="replace")
    chars = sorted(set(text))
    data = Chunks(torch.tensor([chars.index(c) for c in text], dtype=torch.long), args.context)
    vocab = len(chars)

    def fresh():
        torch.manual_seed(0)
        model = make_model(vocab, args.width, args.context)
        with torch.device("meta"):
            base = make_model(vocab, args.base_width, args.context)
        return model, es.param_groups(model, lr=args.lr, base=base, weight_decay=0.0)

    print(f"model: {'GPT-2 (transformers)' if HAVE_HF else 'PyTorch stand-in'}, uniform guess {math.log(vocab):.3f}")
    model, groups = fresh()
    for g in groups:
        print(f"  group lr {g['lr']:.2e} (x{g['lr_mult']:.3g})  {len(g['params'])} tensors, e.g. {g['name'][0]}")
    losses = plain_loop(model, torch.optim.AdamW(groups), data, args.steps, args.batch)
    print(f"plain loop: {args.steps} steps, train loss {losses[0]:.3f} -> {sum(losses[-5:]) / len(losses[-5:]):.3f}")

    if not HAVE_TRAINER:
        print("transformers.Trainer: skipped (it needs transformers and accelerate installed)")
        return
    from transformers import Trainer, TrainingArguments

    model, groups = fresh()
    optimizer = torch.optim.AdamW(groups)
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch,
            lr_scheduler_type="constant",  # any schedule scales all groups alike; constant keeps the printout plain
            logging_steps=max(1, args.steps // 4),
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
        )
        trainer = Trainer(model=model, args=targs, train_dataset=data, optimizers=(optimizer, None))
        result = trainer.train()
    rates = sorted({round(g["lr"] / args.lr, 6) for g in trainer.optimizer.param_groups})
    print(f"transformers.Trainer: {args.steps} steps, mean train loss {result.training_loss:.3f}; lr x {rates}")


if __name__ == "__main__":
    main()
