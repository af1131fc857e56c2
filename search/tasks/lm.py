"""Character-level (or token-file) language modelling with a small GPT (THEORY 7).

Data: a local text file read as bytes and mapped to 96 symbols (newline, space and the 94 printable
ASCII characters; every other byte, tabs and the bytes of non-ASCII characters included, becomes '?'),
or a nanoGPT-style token file (``.bin``, little-endian uint16). The last 10% is held out. Every linear
layer is structured except the output head (the attention projections included).

Configurations: ``cpu`` (default: 3 layers, context 128, 32 sequences = 4,096 tokens per step, warmup 5%
of the steps) and ``paper`` (65,536 tokens per step, 2000 warmup steps) for GPUs. Attention FLOPs are
counted analytically: QK^T and AV are 2*L*d each per token per layer forward (L the context), without
causal halving (the full L x L scores are computed), times 3 for training.

Mixture of experts (THEORY 6), set per task with ``moe`` (``experts``, ``active``, ``moe_dispatch``):
``moe="ffn"`` makes every block's MLP a standard MoE of FFN experts, whose linears take the candidate's
structure like any other; ``moe="btt"`` runs the BTT candidates (``btt``/``btt(rank=1)``) as BTT-MoE, every
other candidate unchanged. A candidate that is an es.MoEConfig (the ``moe`` search space) is an MoE
whatever this setting. The training loss adds ``es.AUX_WEIGHT`` x the layers' load-balancing losses; the
held-out loss is the cross-entropy alone. The default dispatch is ``sparse``, so a candidate pays for the
experts it runs (active/E of them).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

import einstruct as es

from ..errors import DataError, SearchError
from ..models.gpt import GPT
from .base import Hyper, Task, to_device

log = logging.getLogger(__name__)

VOCAB = 96
UNKNOWN = "?"
TOKEN_IDS = 65536  # a .bin file holds uint16 token ids: a vocabulary of up to 65,536 (GPT-2's is 50,257)
SPARSE_VOCAB = 4  # warn when the vocabulary is more than this many times the distinct tokens in the file


def encode_text(raw: bytes) -> np.ndarray:
    """Bytes -> symbol ids in [0, 96): newline 0, space 1, '!'..'~' 2..95, anything else '?'."""
    table = np.full(256, ord(UNKNOWN) - 33 + 2, dtype=np.uint8)
    table[ord("\n")] = 0
    table[ord(" ")] = 1
    table[33:127] = np.arange(2, 96, dtype=np.uint8)
    return table[np.frombuffer(raw, dtype=np.uint8)]


def decode(ids) -> str:
    chars = ["\n", " "] + [chr(c) for c in range(33, 127)]
    return "".join(chars[int(i)] for i in ids)


def token_counts(tokens, chunk: int = 1 << 22) -> np.ndarray:
    """How often each uint16 token id occurs, read in chunks (a memory-mapped file is never loaded whole)."""
    counts = np.zeros(TOKEN_IDS, dtype=np.int64)
    for i in range(0, len(tokens), chunk):
        counts += np.bincount(np.asarray(tokens[i : i + chunk]), minlength=TOKEN_IDS)
    return counts


def load_tokens(path: str) -> tuple[np.ndarray, int]:
    """(token ids, vocabulary size) from a text file or a .bin uint16 token file."""
    tokens, vocab, _ = _load(path)
    return tokens, vocab


def _load(path) -> tuple[np.ndarray, int, int]:
    """(token ids, vocabulary size: the largest id + 1, distinct ids in the file)."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise DataError("the lm task needs data=PATH: a text file, or a .bin file of uint16 tokens")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"data file {path!r} does not exist; pass data= a local text file or a .bin token file")
    if os.path.isdir(path):
        raise DataError(f"data path {path!r} is a folder; the lm task needs a text file or a .bin token file")
    size = os.path.getsize(path)
    if size == 0:
        raise DataError(f"data file {path!r} is empty; give a text file with some text in it")
    if path.endswith(".bin"):
        if size % 2:
            raise DataError(f"{path!r} has an odd number of bytes ({size}), so it is not a uint16 token file")
        tokens = np.memmap(path, dtype=np.uint16, mode="r")
        seen = np.flatnonzero(token_counts(tokens))
        return tokens, int(seen[-1]) + 1, len(seen)
    with open(path, "rb") as f:
        raw = f.read()
    if b"\x00" in raw[:4096]:
        raise DataError(f"{path!r} looks binary (it has NUL bytes); give a text file, or a token file ending in .bin")
    ids = encode_text(raw)
    return ids, VOCAB, len(np.unique(ids))


@dataclass(frozen=True)
class LMConfig:
    data: str = ""
    depth: int = 3
    context: int = 128
    batch: int = 32  # sequences per step
    d_head: int = 64
    lr: float = 3e-3
    warmup_frac: float = 0.05
    max_warmup: int = 2000
    eval_batches: int = 8
    explicit_attention: bool = False  # plain matmuls instead of SDPA (so FlopCounterMode sees attention)
    widths: tuple[int, ...] = (64, 128, 192, 256, 384, 512)
    moe: str = ""  # "", "btt" (BTT candidates become BTT-MoE) or "ffn" (MLPs are standard MoEs)
    experts: int = 8
    active: int = 2
    moe_dispatch: str = "sparse"


CONFIGS = {
    "cpu": LMConfig(),
    "paper": LMConfig(
        depth=6, batch=512, warmup_frac=1.0, max_warmup=2000, eval_batches=32, widths=(128, 256, 384, 512, 768, 1024)
    ),
}


class LanguageModel(Task):
    name = "lm"
    select = "all_but_last"  # the head is the last linear registered
    data_fed = frozenset()  # embeddings feed the first linear, and they need gradients
    ffn_moe = True

    def __init__(self, config: str | LMConfig = "cpu", *, data=None, **overrides):
        if isinstance(config, str):
            if config not in CONFIGS:
                raise SearchError(f"unknown lm config {config!r}; choose one of {', '.join(CONFIGS)}")
            config = CONFIGS[config]
        if data is not None:
            overrides["data"] = os.fspath(data) if isinstance(data, os.PathLike) else data
        try:
            self.config = replace(config, **overrides)
            self.config = replace(self.config, widths=tuple(self.config.widths))
        except TypeError as e:
            raise SearchError(f"lm task: {e}; settings are {', '.join(config.__dataclass_fields__)}") from None
        c = self.config
        tokens, self.vocab, self.distinct = _load(c.data)
        split = int(len(tokens) * 0.9)
        self.train_tokens, self.val_tokens = tokens[:split], tokens[split:]
        for label, part in (("training", self.train_tokens), ("held-out", self.val_tokens)):
            if len(part) < c.context + 1:
                raise DataError(
                    f"{c.data!r} has {len(tokens)} tokens, so its {label} part ({len(part)}) is shorter than one "
                    f"sequence of context {c.context} + 1; give a longer file (at least "
                    f"{math.ceil((c.context + 1) / 0.1)} tokens) or a smaller context"
                )
        if c.moe not in ("", "btt", "ffn"):
            raise SearchError(
                f"lm task: moe={c.moe!r} is not known; use '' (none), 'btt' (BTT candidates become "
                "BTT-MoE) or 'ffn' (every MLP a standard MoE)"
            )
        try:
            self.moe = es.MoEConfig(experts=c.experts, active=c.active, kind=c.moe or "btt", dispatch=c.moe_dispatch)
        except es.SpecError as e:
            raise SearchError(f"lm task: {e}") from None
        if not c.moe:
            self.moe = None
        self.widths = c.widths
        self.hyper = Hyper(
            lr=c.lr,
            batch=c.batch,
            betas=(0.9, 0.95),
            weight_decay=0.0,
            warmup_frac=c.warmup_frac,
            max_warmup=c.max_warmup,
        )
        if self.vocab > SPARSE_VOCAB * self.distinct and self.vocab > VOCAB:
            log.warning(self._sparse_vocab_note())

    def _sparse_vocab_note(self) -> str:
        """What a vocabulary far larger than the tokens in use costs, at the smallest width of the grid."""
        w = min(self.widths) if self.widths else self.base_width
        try:
            total = self.flops_per_step(self.build(None, w, device="meta"))
        except (SearchError, es.SpecError):
            total = 0
        head = es.rules.train_flops(
            es.rules.dense_flops(self.rows_per_step(), w, self.vocab)
        )  # the head (input needs grad)
        share = (
            f" ({head / total:.0%} of the {total:.3g} training FLOPs per step of dense at width {w})" if total else ""
        )
        return (
            f"{self.config.data!r} holds {self.distinct:,} distinct tokens, but its largest token id "
            f"{self.vocab - 1} makes a vocabulary of {self.vocab:,}: the embedding, the head and its softmax are "
            f"sized for all of them; the head alone costs {head:.3g} training FLOPs per step{share} and each "
            f"step's logits take {4 * self.rows_per_step() * self.vocab / 2**20:,.0f} MiB; renumber the tokens "
            f"0..{self.distinct - 1} if the ids need not be kept"
        )

    def extra_training_bytes(self, width: int) -> int:
        """The fp32 log-softmax of a step's logits and its gradient: 2 x rows x vocabulary x 4 bytes (the logits
        themselves are the head's output, counted with the linear layers)."""
        return 2 * self.rows_per_step() * self.vocab * 4

    def memory_hint(self) -> str:
        return (
            f"use a smaller width, fewer sequences per step (batch) or a shorter context (each step's logits "
            f"are {self.rows_per_step():,} rows x a vocabulary of {self.vocab:,})"
        )

    def check_width(self, width) -> int:
        width = super().check_width(width)
        d_head = min(self.config.d_head, width)
        if width % d_head:
            raise SearchError(f"lm width {width} is not a multiple of d_head={d_head}; use a multiple of {d_head}")
        return width

    def split_moe(self, spec):
        if isinstance(spec, es.MoEConfig) or self.moe is None:
            return super().split_moe(spec)
        if self.moe.kind == "ffn":
            return spec, self.moe
        if spec is not None and es.is_btt_expert_spec(spec):
            return None, self.moe
        return spec, None

    def make_model(self, width: int, device="cpu", moe=None):
        c = self.config
        with torch.device(device):
            model = GPT(
                self.vocab,
                width,
                c.depth,
                c.context,
                d_head=min(c.d_head, width),
                explicit=c.explicit_attention,
                moe=moe,
            )
        model.width = width
        return model

    def rows_per_step(self) -> int:
        return self.config.batch * self.config.context

    def extra_train_flops(self, width: int) -> int:
        c = self.config
        return es.rules.train_flops(es.rules.attention_flops(c.context, width) * c.depth * self.rows_per_step())

    def _sample(self, tokens, n: int, generator: torch.Generator, device):
        c = self.config
        starts = torch.randint(0, len(tokens) - c.context, (n,), generator=generator).numpy()
        rows = np.stack([np.asarray(tokens[s : s + c.context + 1], dtype=np.int64) for s in starts])
        t = to_device(torch.from_numpy(rows), device)
        return t[:, :-1], t[:, 1:]

    def batch(self, step, generator, device):
        return self._sample(self.train_tokens, self.config.batch, generator, device)

    def loss(self, model, batch):
        x, y = batch
        logits = model(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))
        if model.training and any(isinstance(m, (es.BTTMoE, es.MoE)) for m in model.modules()):
            loss = loss + es.AUX_WEIGHT * es.moe_aux_loss(model)
        return loss

    @torch.no_grad()
    def eval_loss(self, model, device):
        g = torch.Generator().manual_seed(1234)  # the same held-out sequences at every evaluation
        total = torch.zeros((), device=device)
        for _ in range(self.config.eval_batches):
            total += self.loss(model, self._sample(self.val_tokens, self.config.batch, g, device))
        return total / self.config.eval_batches

    def unigram_entropy(self) -> float:
        """Entropy (nats per token) of the training text's unigram distribution: the bar to beat."""
        counts = np.bincount(np.asarray(self.train_tokens), minlength=self.vocab).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())
