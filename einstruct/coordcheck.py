"""coord_check: does a structure's feature update stay the same size as width grows? (THEORY 4, CBS Fig. 2a)

A 2-hidden-layer MLP ``x (16) -> Linear -> ReLU -> hidden (width x width, the structure under test) ->
ReLU -> Linear (zero init) -> 1`` is trained with Adam on a synthetic regression task (a fixed random
teacher), with the muP rates of :func:`einstruct.param_groups` against the same MLP at ``base_width``.
At each step the last hidden activation is recomputed on a fixed probe batch; the result is the RMS of
its per-step change, averaged over the steps. Under muP it stays roughly constant across widths; with the
naive dense rate for every core (``structured_rates=False``) it shrinks for BTT and Kronecker.

The hidden layer has no bias (a bias moves every feature by about lr per step at any width and would mask
the weight's update). The input layer is frozen by default so that the hidden layer's own update is what
moves the features (with it training the contrast is much weaker; THEORY 4, calibration).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .errors import SpecError
from .spec import Spec

D_DATA = 16
TEACHER_WIDTH = 64


@dataclass(frozen=True)
class CoordCheckResult:
    """RMS of the per-step change of the last hidden activation, per width (mean over the steps)."""

    label: str
    widths: tuple[int, ...]
    rms: tuple[float, ...]
    structured_rates: bool
    steps: int
    lr: float
    base_width: int

    @property
    def ratios(self) -> tuple[float, ...]:
        """rms relative to the smallest width."""
        return tuple(r / self.rms[0] for r in self.rms)

    @property
    def spread(self) -> float:
        """max(rms) / min(rms): 1 means a perfectly width-independent update."""
        return max(self.rms) / min(self.rms)

    def __str__(self) -> str:
        rates = "structure-aware (muP with kappa)" if self.structured_rates else "naive (dense rate per core)"
        lines = [
            f"coord check: {self.label}, {rates} rates, Adam lr {self.lr:g} at width {self.base_width}, "
            f"{self.steps} steps",
            f"{'width':>7}  {'rms dh':>10}  {'x first':>8}",
        ]
        lines += [f"{w:>7}  {r:>10.4g}  {q:>8.3f}" for w, r, q in zip(self.widths, self.rms, self.ratios)]
        lines.append(f"spread max/min: {self.spread:.3f}")
        return "\n".join(lines)


class _MLP(nn.Module):
    def __init__(self, width: int, spec, device=None):
        super().__init__()
        from .layers.linear import StructuredLinear

        self.inp = nn.Linear(D_DATA, width, device=device)
        if spec is None:
            self.hidden = nn.Linear(width, width, bias=False, device=device)
        else:
            self.hidden = StructuredLinear(width, width, spec, bias=False, device=device)
        self.out = nn.Linear(width, 1, device=device)
        if device is None or torch.device(device).type != "meta":
            from .mupinit import mup_init

            mup_init(self)  # spectral init of the dense layers, zero biases, the output layer at zero

    def features(self, x):
        return torch.relu(self.hidden(torch.relu(self.inp(x))))

    def forward(self, x):
        return self.out(self.features(x))


def _teacher(gen: torch.Generator):
    w1 = torch.randn(TEACHER_WIDTH, D_DATA, generator=gen) / math.sqrt(D_DATA)
    w2 = torch.randn(1, TEACHER_WIDTH, generator=gen) / math.sqrt(TEACHER_WIDTH)
    return lambda x: math.sqrt(2.0) * torch.relu(x @ w1.T) @ w2.T


def _spec(spec):
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "dense"):
        return None, "dense"
    from .layers.model import _as_spec

    s = _as_spec(spec, "coord_check spec")
    return s, s.label or s.einsum


def coord_check(
    spec,
    widths=(64, 128, 256, 512, 1024),
    *,
    structured_rates: bool = True,
    steps: int = 60,
    lr: float = 3e-3,
    base_width: int = 64,
    batch: int = 64,
    freeze_input: bool = True,
    seed: int = 0,
    data=None,
    loss_fn=None,
    optimizer: str = "adam",
    out=None,
):
    """Train the MLP at each width and measure the per-step feature-update RMS (see the module docstring).

    ``spec``: an es.Spec, a preset name, or 'dense'/None for an nn.Linear hidden layer. Or a callable
    ``make_model(width) -> nn.Module``: the check on that model instead, with ``data`` (``(x, y)``
    batches), ``loss_fn``, ``optimizer`` and ``out`` (a directory for its table and plot), both rate rules
    side by side (:func:`einstruct.coordcheck_model.coord_check_model`; ``structured_rates``, ``batch``
    and ``freeze_input`` are this MLP's settings and do not apply).
    """
    if callable(spec) and not isinstance(spec, (str, Spec)):
        from .coordcheck_model import coord_check_model

        return coord_check_model(
            spec,
            widths,
            data=data,
            loss_fn=loss_fn,
            steps=steps,
            lr=lr,
            base_width=base_width,
            optimizer=optimizer,
            out=out,
            seed=seed,
        )
    if data is not None or loss_fn is not None or out is not None:
        raise SpecError(
            "data=, loss_fn= and out= are for coord_check(make_model, ...) on your own model; the spec form "
            "trains its own MLP on a synthetic task"
        )
    sp, label = _spec(spec)
    ws = tuple(widths)
    if not ws or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in ws):
        raise SpecError(f"widths must be positive integers, got {widths!r}")
    for name, v in (("steps", steps), ("batch", batch), ("base_width", base_width)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise SpecError(f"{name} must be a positive integer, got {v!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise SpecError(f"lr must be a positive number, got {lr!r}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ops are tiny: extra threads only add contention (restored below)
    try:
        rms = [_run(sp, w, base_width, structured_rates, steps, lr, batch, freeze_input, seed) for w in ws]
    finally:
        torch.set_num_threads(threads)
    return CoordCheckResult(label, ws, tuple(rms), structured_rates, steps, float(lr), base_width)


def _run(
    sp,
    w: int,
    base_width: int,
    structured_rates: bool,
    steps: int,
    lr: float,
    batch: int,
    freeze_input: bool,
    seed: int,
) -> float:
    """Train the MLP at width ``w``; the mean over steps of the RMS of the per-step feature change."""
    from .mup import assign, groups

    gen = torch.Generator().manual_seed(seed)
    teacher = _teacher(gen)
    probe = torch.randn(batch, D_DATA, generator=gen)
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed + w)
        base = _MLP(base_width, sp)  # only its shapes are read; tiny, so built on the CPU
        model = _MLP(w, sp)
    if freeze_input:
        model.inp.requires_grad_(False)
    opt = torch.optim.Adam(groups(model, assign(model, base, optimizer="adam", structured=structured_rates), lr, None))
    with torch.no_grad():
        prev = model.features(probe)
    total = 0.0
    for _ in range(steps):
        x = torch.randn(batch, D_DATA, generator=gen)
        loss = (model(x) - teacher(x)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            h = model.features(probe)
            total += float((h - prev).pow(2).mean().sqrt())
            prev = h
    return total / steps
