"""CIFAR-10/100 with the ICML residual MLP: pixels shuffled by a fixed permutation (THEORY 7).

Data: a local folder in the standard python pickle format (CIFAR-10: data_batch_1..5 and test_batch;
CIFAR-100: train and test). Pickles are read with a restricted unpickler that only builds dicts, lists,
bytes and numpy arrays, so a hostile file cannot run code. Model: input Linear(3072, d), 3 residual
blocks (LN, W1 d -> 4d, GELU, W2 4d -> d), LN, head; the block linears are structured, the input layer
and head stay dense; the input layer's rate is multiplied by 0.1. Training uses MixUp (alpha 0.8) and
label smoothing 0.3; the held-out loss is plain cross-entropy on the test split.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError, SearchError
from ..models.mlp import ResidualMLP
from .base import Hyper, Task, to_device

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


PIXELS = 3072  # 32 x 32 x 3 values per image
ROWS = 10_000  # images in a CIFAR batch file (CIFAR-10's data_batch_i and test_batch, CIFAR-100's test)
ROWS_TRAIN_100 = 50_000  # images in CIFAR-100's train
SLACK = 16 * 2**20  # bytes a batch file may hold besides its pixels (labels, file names)


def _max_rows(path: str) -> int:
    return ROWS_TRAIN_100 if os.path.basename(path) == "train" else ROWS


def _load(path: str) -> dict:
    """One batch file, unpickled with the restricted unpickler, streamed from the file (never read whole)."""
    size = os.path.getsize(path)
    cap = 4 * _max_rows(path) * PIXELS + SLACK  # even a text-mode pickle of a full batch is smaller
    if size > cap:
        raise DataError(
            f"{path!r} is {size:,} bytes, more than a CIFAR batch file can be (at most {_max_rows(path):,} "
            f"images of {PIXELS:,} bytes); use the 'python version' of the data set"
        )
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise DataError(
            f"{path!r} is not a CIFAR python pickle ({e}); use the 'python version' of the data set"
        ) from None
    except (MemoryError, OverflowError):  # a length field claiming more than the file holds
        raise DataError(
            f"{path!r} is not a CIFAR python pickle (it declares objects far larger than the file); use "
            "the 'python version' of the data set"
        ) from None
    if not isinstance(obj, dict) or b"data" not in obj:
        raise DataError(f"{path!r} is not a CIFAR batch (no b'data' entry); use the 'python version' of the data set")
    return obj


def _kind(v) -> str:
    return f"a {type(v).__name__}" if v is not None else "None"


def _pixels(path: str, data) -> np.ndarray:
    """The b'data' entry as uint8 N x 3072, checked (type, shape, values 0..255) before any array is built."""
    limit = _max_rows(path)
    bad = f"{path!r} has b'data' that is {{}}; a CIFAR batch holds a uint8 array of N x {PIXELS} pixel values"
    if isinstance(data, np.ndarray):
        if data.ndim != 2 or data.shape[1] != PIXELS:
            raise DataError(bad.format(f"an array of shape {data.shape}"))
        n = data.shape[0]
    elif isinstance(data, (list, tuple)):
        n = len(data)
    else:
        raise DataError(bad.format(_kind(data)))
    if n > limit:
        raise DataError(
            f"{path!r} holds {n:,} images; a CIFAR batch file holds at most {ROWS:,} ({ROWS_TRAIN_100:,} "
            "for CIFAR-100's train), so it is not a CIFAR batch"
        )
    if isinstance(data, np.ndarray):
        if data.dtype.kind not in "ui":
            raise DataError(bad.format(f"an array of {data.dtype}"))
        if data.size and (data.min() < 0 or data.max() > 255):
            raise DataError(bad.format("an array with values outside 0..255"))
        return data.astype(np.uint8, copy=False)
    out = np.empty((n, PIXELS), dtype=np.uint8)  # at most 10,000 (50,000) x 3,072 bytes
    for i, row in enumerate(data):
        if isinstance(row, (bytes, bytearray)) and len(row) == PIXELS:
            out[i] = np.frombuffer(row, dtype=np.uint8)
            continue
        if isinstance(row, np.ndarray) and row.shape == (PIXELS,) and row.dtype.kind in "ui":
            if row.min() < 0 or row.max() > 255:
                raise DataError(bad.format(f"a list whose row {i} holds values outside 0..255"))
            out[i] = row
            continue
        if not isinstance(row, (list, tuple, np.ndarray)) or len(row) != PIXELS:
            what = f"{_kind(row)} of length {len(row)}" if hasattr(row, "__len__") else _kind(row)
            raise DataError(bad.format(f"a list whose row {i} is {what}"))
        try:  # element by element into 3,072 int64s: a nested list or a string fails here, costing nothing
            values = np.fromiter((v if type(v) is int else _int(v) for v in row), dtype=np.int64, count=PIXELS)
        except (TypeError, ValueError, OverflowError):
            raise DataError(bad.format(f"a list whose row {i} holds a value that is not an integer")) from None
        if values.min() < 0 or values.max() > 255:
            raise DataError(bad.format(f"a list whose row {i} holds values outside 0..255"))
        out[i] = values
    return out


def _int(v) -> int:
    if isinstance(v, np.integer):
        return int(v)
    raise TypeError(type(v).__name__)


def _labels(path: str, labels, n: int, key: bytes, classes: int) -> np.ndarray:
    """The labels entry as int64 of length n, each in 0..classes-1, checked before any array is built."""
    bad = f"{path!r} has {key!r} that is {{}}; a CIFAR batch holds a list of {n:,} integer labels"
    if labels is None:
        raise DataError(f"{path!r} has no {key!r} entry; a CIFAR batch holds a list of {n:,} integer labels")
    if isinstance(labels, np.ndarray):
        if labels.ndim != 1 or labels.dtype.kind not in "ui":
            raise DataError(bad.format(f"an array of shape {labels.shape} and {labels.dtype}"))
        y = labels.astype(np.int64)
    elif isinstance(labels, (list, tuple)):
        if len(labels) != n:
            raise DataError(f"{path!r} has {n:,} images and {len(labels):,} labels; expected one label per image")
        try:
            y = np.fromiter((v if type(v) is int else _int(v) for v in labels), dtype=np.int64, count=n)
        except (TypeError, ValueError, OverflowError):
            raise DataError(bad.format("a list holding a value that is not an integer")) from None
    else:
        raise DataError(bad.format(_kind(labels)))
    if len(y) != n:
        raise DataError(f"{path!r} has {n:,} images and {len(y):,} labels; expected one label per image")
    if n and (y.min() < 0 or y.max() >= classes):
        raise DataError(f"{path!r} has labels outside 0..{classes - 1}")
    return y


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
            x = _pixels(p, d[b"data"])
            xs.append(x)
            ys.append(_labels(p, d.get(key), len(x), key, classes))
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


def _moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel mean and standard deviation (+1e-6) as float32, accumulated in float64 over chunks."""
    total = np.zeros(x.shape[1])
    sq = np.zeros(x.shape[1])
    for i in range(0, len(x), 4096):
        part = x[i : i + 4096].astype(np.float64)
        total += part.sum(0)
        sq += (part * part).sum(0)
    mean = total / max(len(x), 1)
    var = np.maximum(sq / max(len(x), 1) - mean * mean, 0.0)
    return mean.astype(np.float32), (np.sqrt(var) + 1e-6).astype(np.float32)


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
        mean, std = _moments(tx)

        def prep(x):  # standardised float32, 4 bytes a value, made in chunks (no float64 copy of the whole set)
            out = torch.empty((len(x), PIXELS), dtype=torch.float32)
            for i in range(0, len(x), 4096):
                part = (x[i : i + 4096].astype(np.float32) - mean) / std
                out[i : i + 4096] = torch.from_numpy(part)[:, perm]
            return out

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
        lam = (
            float(
                np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=generator))).beta(
                    self.config.mixup, self.config.mixup
                )
            )
            if self.config.mixup > 0
            else 1.0
        )
        perm = torch.randperm(len(x), generator=generator)
        x = lam * x + (1 - lam) * x[perm]
        return to_device((x, y, y[perm], lam), device)

    def loss(self, model, batch):
        x, y, y2, lam = batch
        logits = model(x).float()
        ls = self.config.label_smoothing
        return lam * F.cross_entropy(logits, y, label_smoothing=ls) + (1 - lam) * F.cross_entropy(
            logits, y2, label_smoothing=ls
        )

    @torch.no_grad()
    def eval_loss(self, model, device):
        total = torch.zeros((), device=device)
        for xb, yb in zip(self.val_x.split(1000), self.val_y.split(1000)):
            xb, yb = to_device((xb, yb), device)
            total += F.cross_entropy(model(xb).float(), yb, reduction="sum")
        return total / len(self.val_y)
