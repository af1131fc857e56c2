"""Synthetic teacher-student regression (NeurIPS Fig. 5): a fixed random MLP teacher, an MLP student, MSE.

Teacher: ``d_in`` inputs, hidden layers with weights N(0, 1/fan_in), no bias, activation sqrt(2)*ReLU,
scalar output with weights N(0, 1/width), standardised to mean 0, std 1 on probe inputs. Inputs N(0, I).
Student: residual MLP (input Linear, ``depth`` blocks h + W(gelu(LN(h))), LN, head); the hidden block
linears are structured, the first and last layers stay dense.

Configurations: ``cpu`` (default) uses a smaller teacher and a pool of teacher samples drawn once per
seed and cached in memory, so each step costs only the student; ``paper`` is the NeurIPS setup (teacher
6 x 1024, fresh inputs every step, batch 4096, widths 64..4096) for GPUs. Making data is reported in
``Result.data_seconds``, never charged to the training FLOPs.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, replace
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..errors import SearchError
from ..models.mlp import ResidualMLP
from .base import Hyper, Task, to_device


@dataclass(frozen=True)
class RegressionConfig:
    inputs: int = 8
    teacher_width: int = 256
    teacher_depth: int = 4
    depth: int = 3  # student residual blocks
    batch: int = 256
    pool: int = 65536  # teacher samples drawn once per seed; 0 = fresh inputs every step
    eval_size: int = 4096
    lr: float = 1e-3
    widths: tuple[int, ...] = (32, 64, 128, 256, 512)


CONFIGS = {
    "cpu": RegressionConfig(),
    "paper": RegressionConfig(
        teacher_width=1024,
        teacher_depth=6,
        batch=4096,
        pool=0,
        eval_size=16384,
        widths=(64, 128, 256, 512, 1024, 2048, 4096),
    ),
}


class Teacher(torch.nn.Module):
    def __init__(self, cfg: RegressionConfig, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(10_000 + seed)
        dims = [cfg.inputs] + [cfg.teacher_width] * cfg.teacher_depth
        self.weights = [torch.randn(o, i, generator=g) / math.sqrt(i) for i, o in itertools.pairwise(dims)]
        self.out = torch.randn(1, cfg.teacher_width, generator=g) / math.sqrt(cfg.teacher_width)
        probe = torch.randn(8192, cfg.inputs, generator=g)
        raw = self.raw(probe)
        self.mean, self.std = raw.mean(), raw.std()

    @torch.no_grad()
    def raw(self, x: torch.Tensor) -> torch.Tensor:
        for w in self.weights:
            x = math.sqrt(2.0) * F.relu(x @ w.T)
        return x @ self.out.T

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.raw(x) - self.mean) / self.std


@lru_cache(maxsize=4)
def _pool(cfg: RegressionConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(train x, train y, eval x, eval y, seconds): drawn once per (config, seed) and cached."""
    t0 = time.perf_counter()
    teacher = Teacher(cfg, seed)
    g = torch.Generator().manual_seed(20_000 + seed)
    ex = torch.randn(cfg.eval_size, cfg.inputs, generator=g)
    ey = torch.cat([teacher(c) for c in ex.split(4096)])
    if cfg.pool:
        x = torch.randn(cfg.pool, cfg.inputs, generator=g)
        y = torch.cat([teacher(c) for c in x.split(4096)])
    else:
        x = y = torch.empty(0)
    return x, y, ex, ey, time.perf_counter() - t0


class Regression(Task):
    name = "regression"
    select = "intermediate"
    data_fed = frozenset({"inp"})

    def __init__(self, config: str | RegressionConfig = "cpu", **overrides):
        if isinstance(config, str):
            if config not in CONFIGS:
                raise SearchError(f"unknown regression config {config!r}; choose one of {', '.join(CONFIGS)}")
            config = CONFIGS[config]
        try:
            self.config = replace(config, **overrides)
            self.config = replace(self.config, widths=tuple(self.config.widths))
        except TypeError as e:
            raise SearchError(f"regression task: {e}; settings are {', '.join(config.__dataclass_fields__)}") from None
        c = self.config
        self.widths = c.widths
        self.hyper = Hyper(lr=c.lr, batch=c.batch)
        self._seed = 0
        self._teacher: Teacher | None = None

    def make_model(self, width: int, device="cpu"):
        with torch.device(device):
            model = ResidualMLP(self.config.inputs, width, 1, self.config.depth, hidden_mult=None, act="gelu")
        model.width = width
        return model

    def prepare(self, seed: int) -> float:
        self._seed = seed
        *_, seconds = _pool(self.config, seed)
        if not self.config.pool:
            t0 = time.perf_counter()
            self._teacher = Teacher(self.config, seed)
            seconds += time.perf_counter() - t0
        return seconds

    def batch(self, step: int, generator: torch.Generator, device):
        c = self.config
        if c.pool:
            x, y, *_ = _pool(c, self._seed)
            idx = torch.randint(0, c.pool, (c.batch,), generator=generator)
            return to_device((x[idx], y[idx]), device)
        x = torch.randn(c.batch, c.inputs, generator=generator)
        return to_device((x, self._teacher(x)), device)

    def loss(self, model, batch):
        x, y = batch
        return F.mse_loss(model(x).float(), y)

    @torch.no_grad()
    def eval_loss(self, model, device):
        _, _, ex, ey, _ = _pool(self.config, self._seed)
        total = torch.zeros((), device=device)
        for xb, yb in zip(ex.split(4096), ey.split(4096)):
            xb, yb = to_device((xb, yb), device)
            total += F.mse_loss(model(xb).float(), yb, reduction="sum")
        return total / len(ey)
