"""CIFAR-10/100 with the ICML residual MLP: pixels shuffled by a fixed permutation (THEORY 7).

Data: a local folder in the standard python pickle format (CIFAR-10: data_batch_1..5 and test_batch;
CIFAR-100: train and test). Pickles are read with a restricted unpickler that only builds dicts, lists,
bytes and numpy arrays, so a hostile file cannot run code. Model: input Linear(3072, d), 3 residual
blocks (LN, W1 d -> 4d, GELU, W2 4d -> d), LN, head; the block linears are structured, the input layer
and head stay dense; the input layer's rate is multiplied by 0.1. Training uses MixUp (alpha 0.8) and
label smoothing 0.3; the held-out loss is plain cross-entropy on the test split.
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError, SearchError
from ..models.mlp import ResidualMLP
from .base import Hyper, Task

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise DataError(
            f"{path!r} is not a CIFAR python pickle ({e}); use the 'python version' of the data set"
        ) from None
    if not isinstance(obj, dict) or b"data" not in obj:
        raise DataError(f"{path!r} is not a CIFAR batch (no b'data' entry); use the 'python version' of the data set")
    return obj


def load_cifar(folder: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """(train x uint8 N x 3072, train labels, test x, test labels, classes) from a CIFAR python folder."""
    if not isinstance(folder, (str, os.PathLike)) or not str(folder):
        raise DataError("the cifar task needs data=FOLDER, e.g. data='cifar-10-batches-py/'")
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise DataError(f"CIFAR folder {folder!r} does not exist; pass the unpacked 'cifar-10-batches-py' folder")
    c10 = [os.path.join(folder, f"data_batch_{i}") for i in range(1, 6)]
    if os.path.exists(os.path.join(folder, "train")):
        train, test, key, classes = [os.path.join(folder, "train")], os.path.join(folder, "test"), b"fine_labels", 100
    elif any(os.path.exists(p) for p in c10):
        train = [p for p in c10 if os.path.exists(p)]
        test, key, classes = os.path.join(folder, "test_batch"), b"labels", 10
    else:
        raise DataError(
            f"{folder!r} holds no CIFAR batches: expected data_batch_1..5 and test_batch (CIFAR-10) or "
            "train and test (CIFAR-100) in the python pickle format"
        )
    if not os.path.exists(test):
        raise DataError(f"{folder!r} has no {os.path.basename(test)!r} file; the test split is needed for evaluation")

    def read(paths):
        xs, ys = [], []
        for p in paths:
            d = _load(p)
            x = np.asarray(d[b"data"], dtype=np.uint8)
            y = np.asarray(d.get(key, []), dtype=np.int64)
            if x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x):
                raise DataError(f"{p!r} has data of shape {x.shape} and {len(y)} labels; expected N x 3072 and N")
            if len(y) and (y.min() < 0 or y.max() >= classes):
                raise DataError(f"{p!r} has labels outside 0..{classes - 1}")
            xs.append(x)
            ys.append(y)
        return np.concatenate(xs), np.concatenate(ys)

    tx, ty = read(train)
    vx, vy = read([test])
    return tx, ty, vx, vy, classes


@dataclass(frozen=True)
class CifarConfig:
    data: str = ""
    depth: int = 3
    batch: int = 256
    lr: float = 3e-3
    mixup: float = 0.8
    label_smoothing: float = 0.3
    input_lr_mult: float = 0.1
    eval_size: int = 2000
    permutation_seed: int = 0
    widths: tuple[int, ...] = (64, 128, 256, 512, 1024)


class Cifar(Task):
    name = "cifar"
    select = "intermediate"
    data_fed = frozenset({"inp"})

    def __init__(self, config: CifarConfig | None = None, *, data=None, **overrides):
        config = config or CifarConfig()
        if data is not None:
            overrides["data"] = os.fspath(data)
        try:
            self.config = replace(config, **overrides)
            self.config = replace(self.config, widths=tuple(self.config.widths))
        except TypeError as e:
            raise SearchError(f"cifar task: {e}; settings are {', '.join(config.__dataclass_fields__)}") from None
        c = self.config
        tx, ty, vx, vy, self.classes = load_cifar(c.data)
        if len(tx) < c.batch:
            raise DataError(f"{c.data!r} has {len(tx)} training images, fewer than one batch of {c.batch}")
        perm = torch.randperm(3072, generator=torch.Generator().manual_seed(c.permutation_seed))
        mean, std = tx.mean(0), tx.std(0) + 1e-6

        def prep(x):
            return torch.from_numpy(((x - mean) / std).astype(np.float32))[:, perm]

        self.train_x, self.train_y = prep(tx), torch.from_numpy(ty)
        self.val_x, self.val_y = prep(vx[: c.eval_size]), torch.from_numpy(vy[: c.eval_size])
        self.widths = c.widths
        self.hyper = Hyper(lr=c.lr, batch=c.batch, input_lr_mult=c.input_lr_mult)

    def make_model(self, width: int, device="cpu"):
        with torch.device(device):
            model = ResidualMLP(3072, width, self.classes, self.config.depth, hidden_mult=4, act="gelu")
        model.width = width
        return model

    def batch(self, step, generator, device):
        idx = torch.randint(0, len(self.train_x), (self.config.batch,), generator=generator)
        x, y = self.train_x[idx], self.train_y[idx]
        lam = float(np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=generator))).beta(
            self.config.mixup, self.config.mixup)) if self.config.mixup > 0 else 1.0
        perm = torch.randperm(len(x), generator=generator)
        x = lam * x + (1 - lam) * x[perm]
        return x.to(device), y.to(device), y[perm].to(device), lam

    def loss(self, model, batch):
        x, y, y2, lam = batch
        logits = model(x).float()
        ls = self.config.label_smoothing
        return lam * F.cross_entropy(logits, y, label_smoothing=ls) + (1 - lam) * F.cross_entropy(
            logits, y2, label_smoothing=ls)

    @torch.no_grad()
    def eval_loss(self, model, device):
        total = torch.zeros((), device=device)
        for xb, yb in zip(self.val_x.split(1000), self.val_y.split(1000)):
            total += F.cross_entropy(model(xb.to(device)).float(), yb.to(device), reduction="sum")
        return total / len(self.val_y)
