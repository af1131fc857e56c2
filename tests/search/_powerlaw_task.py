"""A synthetic task with a known answer, for calibrating the verdict through the whole loop (issue 17 part 6b).

Its held-out loss is not learnt: it is computed from the training FLOPs a run has spent so far (C), the run's
width w, its structure's known compute multiplier m and noise drawn from the run's seed, structure and width:

    L(C, w) = A * (m C / c_ref)^-b * (1 + k ln(w / w_opt)^2) * exp(e_seed + e_run + e_eval)
    w_opt   = w_ref * (m C / c_ref)^g        (the compute-optimal width grows with compute)

so a structure with multiplier m reaches, at every width, dense's loss with m times less compute: the envelope
over any width grid is dense's envelope shifted by m in compute, and the multiplier of the structure over dense
at any loss is exactly m. The noise is log-normal: e_seed ~ N(0, seed_sd) is shared by every structure of a
seed (a seed fixes the data both see, as on a real task; pairing cancels it), e_run ~ N(0, sigma) per (seed,
structure, width) and e_eval ~ N(0, eval_sd) per evaluation. Training is a real optimizer step on a tiny
residual MLP (so FLOPs, steps, checkpoints and the budget are the real ones) whose weights the loss ignores.

The space (``SPACE``): dense (m = 1); ``double`` (m = 2), an unnamed structure like one of theta's points (its
family's catch-all group); ``even`` (m = 1), a named structure like BTT. Confirmation then always confirms all
three (double tops exploration, even is the best named one, dense is the reference), and the verdict compares
double vs dense (truth 2), double vs even (truth 2) and even vs dense (truth 1).

The test registers the task under the name ``powerlaw`` for its studies (``register``).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

import einstruct as es
from search.errors import SearchError
from search.families.base import Family
from search.models.mlp import ResidualMLP
from search.tasks.base import Hyper, Task

# Both are a dense layer under another label (the same FLOPs and steps as dense): only their known multiplier differs.
DOUBLE = es.Spec("i,W:io->o", i="d_in", o="d_out", label="double")
EVEN = es.Spec("i,W:io->o", i="d_in", o="d_out", label="even")
TRUTH = {"dense": 1.0, "double": 2.0, "even": 1.0}  # each structure's compute multiplier over dense, by label


@dataclass(frozen=True)
class PowerLawConfig:
    widths: tuple[int, ...] = (16, 20, 24, 32, 40, 48, 64)
    c_ref: float = 3e6  # compute at which w_opt = w_ref and L = A (at m = 1, no noise)
    A: float = 1.0
    b: float = 0.3  # loss exponent in compute
    k: float = 0.2  # width penalty: a factor 2 off the optimal width costs a factor 1 + k ln(2)^2 (+10%)
    g: float = 0.25  # w_opt grows as C^g
    w_ref: float = 32.0
    sigma: float = 0.02  # run-level log-loss noise
    seed_sd: float = 0.05  # seed-level log-loss noise, shared by the structures of a seed
    eval_sd: float = 0.005  # per-evaluation log-loss noise
    inputs: int = 256  # a wide input layer: FLOPs per step grow about linearly with width (fewer steps to run)
    batch: int = 4


class PowerLaw(Task):
    name = "powerlaw"
    select = "intermediate"
    data_fed = frozenset({"inp"})

    def __init__(self, **settings):
        try:
            self.config = replace(PowerLawConfig(), **settings)
        except TypeError as e:
            raise SearchError(f"powerlaw task: {e}") from None
        self.config = replace(self.config, widths=tuple(int(w) for w in self.config.widths))
        self.widths = self.config.widths
        self.hyper = Hyper(lr=1e-3, batch=self.config.batch)
        self._seed = 0
        self._done = 0

    def make_model(self, width: int, device="cpu"):
        with torch.device(device):
            model = ResidualMLP(self.config.inputs, width, 1, 1, hidden_mult=None, act="gelu")
        model.width = width
        return model

    def build(self, spec, width, *, device="cpu", seed=0, shapes=None):
        model = super().build(spec, width, device=device, seed=seed, shapes=shapes)
        model.structure = getattr(spec, "label", None) or "dense"
        model.multiplier = TRUTH[model.structure]
        return model

    def prepare(self, seed: int) -> float:
        self._seed = int(seed)
        return 0.0

    def batch(self, step, generator, device):
        self._done = step + 1  # the steps this run has taken when it is next evaluated
        x = torch.randn(self.config.batch, self.config.inputs, generator=generator)
        return x.to(device), torch.zeros(len(x), 1, device=device)

    def loss(self, model, batch):
        x, y = batch
        return 1.0 + F.mse_loss(model(x).float(), y)  # about 1 throughout: never 10x its first value (divergence)

    def eval_loss(self, model, device):
        per_step = model.__dict__.get("_per_step") or self.flops_per_step(model)
        model._per_step = per_step
        value = self.law(self._done * per_step, model.width, model.multiplier, self._seed, model.structure)
        return torch.tensor(value)

    def law(self, compute: float, width: int, multiplier: float, seed: int, structure: str) -> float:
        """The held-out loss after ``compute`` training FLOPs (the module's formula)."""
        c = self.config
        x = multiplier * compute / c.c_ref
        w_opt = c.w_ref * x**c.g
        noise = (
            _normal(c.seed_sd, "seed", seed)
            + _normal(c.sigma, "run", seed, structure, width)
            + _normal(c.eval_sd, "eval", seed, structure, width, int(compute))
        )
        return c.A * x**-c.b * (1 + c.k * math.log(width / w_opt) ** 2) * math.exp(noise)


def _normal(sd: float, *key) -> float:
    """A N(0, sd) draw fixed by ``key`` (the same in every process and on resume)."""
    if sd == 0:
        return 0.0
    return sd * float(np.random.default_rng(zlib.crc32(repr(key).encode())).standard_normal())


class Double(Family):
    """m = 2, unnamed (its family's catch-all group, as theta's unnamed points)."""

    name = label = group = "double"
    groups = ("double",)

    def build(self, args):
        return DOUBLE

    def structure_label(self, args) -> str:
        return "double"

    def references(self):
        return ({},)


class Even(Family):
    """m = 1, a named structure (as BTT or Monarch)."""

    name = label = group = "even"

    def build(self, args):
        return EVEN

    def structure_label(self, args) -> str:
        return "even"

    def references(self):
        return ({},)  # queued at every level, as the built-in named structures are


SPACE = ["dense", Double(), Even()]


def register(monkeypatch) -> None:
    """Make ``task="powerlaw"`` name this task for search.tasks.get (the built-in tasks are a fixed table)."""
    from search import tasks

    monkeypatch.setitem(tasks._TASKS, "powerlaw", (__name__, "PowerLaw"))
