"""The task protocol: a model family at any width, its data, its loss, and its exact FLOPs per step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

import einstruct as es

from .. import flops
from ..errors import SearchError, TrainingMemoryError


@dataclass(frozen=True)
class Hyper:
    """Training defaults of a task; train.run may override lr and schedule."""

    lr: float
    batch: int  # examples (or sequences) per step
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_frac: float = 0.05
    max_warmup: int = 2000
    clip: float = 1.0
    input_lr_mult: float = 1.0


class Task:
    """Base class. Subclasses set name, config, hyper, widths and implement the data/model hooks."""

    name: str = ""
    widths: tuple[int, ...] = ()
    base_width: int = 64
    select: str = "intermediate"  # which nn.Linear layers es.structure replaces
    data_fed: frozenset[str] = frozenset()  # module names whose input is raw data (no input gradient)
    ffn_moe: bool = False  # make_model(width, device, moe=MoEConfig) builds standard-MoE FFNs
    hyper: Hyper

    # ---- hooks -------------------------------------------------------------------------------
    def make_model(self, width: int, device="cpu") -> nn.Module:
        raise NotImplementedError

    def rows_per_step(self) -> int:
        """Rows through each linear layer per optimizer step (examples, or tokens for the LM)."""
        return self.hyper.batch

    def extra_train_flops(self, width: int) -> int:
        """FLOPs per step of matmuls that are not linear layers (attention), counted analytically."""
        return 0

    def batch(self, step: int, generator: torch.Generator, device) -> tuple:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: tuple) -> torch.Tensor:
        raise NotImplementedError

    def eval_loss(self, model: nn.Module, device) -> torch.Tensor:
        """Held-out loss as a 0-dim tensor (read back by the caller, once per evaluation)."""
        raise NotImplementedError

    def prepare(self, seed: int) -> float:
        """Make or load data for this seed; returns the seconds spent (reported, not charged)."""
        return 0.0

    # ---- shared ------------------------------------------------------------------------------
    def check_width(self, width) -> int:
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise SearchError(f"width must be a positive integer, got {width!r}")
        return width

    def split_moe(self, spec) -> tuple[object, es.MoEConfig | None]:
        """(structure spec, MoE setting) of a candidate: an es.MoEConfig is an MoE candidate (BTT-MoE
        linears, or standard-MoE FFNs with dense experts); anything else is a plain structure."""
        if isinstance(spec, es.MoEConfig):
            return None, spec
        return spec, None

    def build(self, spec, width: int, *, device="cpu", seed: int = 0, shapes: nn.Module | None = None) -> nn.Module:
        """The task's model at ``width`` with its selected linears structured by ``spec`` (None: dense).

        ``spec`` may be an es.MoEConfig: kind 'btt' makes the selected linears BTT-MoE layers, kind 'ffn'
        builds the model with standard-MoE FFNs (tasks with ``ffn_moe``). On a real device the whole model is
        first built on the meta device and refused (SearchError) if training it cannot fit (check_memory);
        ``shapes`` is that meta model when the caller has it already (search.train keeps one per candidate).
        """
        width = self.check_width(width)
        if _kind(device) != "meta":
            meta = shapes if shapes is not None else self._build(spec, width, device="meta", seed=seed)
            self.check_memory(meta, device)
        return self._build(spec, width, device=device, seed=seed)

    # ---- memory ------------------------------------------------------------------------------
    def training_bytes(self, model: nn.Module, activation_bytes: int = 4) -> int:
        """A lower bound on the memory one training step of ``model`` takes: 16 bytes per parameter (fp32
        weight, gradient and AdamW's two moments) and, for one step's rows, the input and output of every
        linear layer at ``activation_bytes`` a value (4: fp32; 2 under CUDA's bf16 autocast), plus the task's
        ``extra_training_bytes``. Embeddings and the head are counted like every other parameter."""
        params = sum(p.numel() for p in model.parameters())
        rows = self.rows_per_step()
        acts = 0
        for m in model.modules():
            if isinstance(m, (nn.Linear, es.StructuredLinear)):
                acts += rows * (int(m.in_features) + int(m.out_features)) * activation_bytes
        return 16 * params + acts + self.extra_training_bytes(_width_of(model))

    def extra_training_bytes(self, width: int) -> int:
        """Memory of a training step besides parameters and linear layers' activations (e.g. a softmax)."""
        return 0

    def memory_hint(self) -> str:
        return "use a smaller width (or a smaller batch in the task's settings)"

    def check_memory(self, model: nn.Module, device) -> None:
        """Refuse (TrainingMemoryError, a SearchError) a model, built on the meta device, whose training cannot
        fit on ``device``."""
        limit = es.training_memory_limit(device)
        if limit is None:
            return
        need = self.training_bytes(model, 2 if _kind(device) == "cuda" else 4)
        if need > limit:
            params = sum(p.numel() for p in model.parameters())
            show = es.human_bytes
            raise TrainingMemoryError(
                f"the {self.name} model at width {_width_of(model)} has {es.count(params)} parameters and needs at "
                f"least {show(need)} to train, more than the {show(limit)} of memory on {_kind(device)} this "
                f"process may use; {self.memory_hint()}"
            )

    def _build(self, spec, width: int, *, device="cpu", seed: int = 0) -> nn.Module:
        spec, moe = self.split_moe(spec)
        if _kind(device) in ("cpu", "meta"):  # the CPU generator only: torch.manual_seed formats a stack per call
            torch.default_generator.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        if moe is not None and moe.kind == "ffn":
            if not self.ffn_moe:
                raise SearchError(
                    f"task {self.name!r} has no standard-MoE (FFN experts) model; use a BTT-MoE "
                    "(es.MoEConfig(kind='btt')) or the lm task"
                )
            model = self.make_model(width, device=device, moe=moe)
            model.moe_config = moe  # the base model for muP rates needs the same MoE
            if spec is not None and not _is_dense(spec):
                es.structure(model, spec, select=self.select)  # experts and other linears; routers stay dense
        else:
            model = self.make_model(width, device=device)
            if moe is not None:
                es.structure(model, None, select=self.select, moe=moe)
            elif spec is not None and not _is_dense(spec):
                es.structure(model, spec, select=self.select)
        return model

    def base_model(self, moe: es.MoEConfig | None = None, width: int | None = None) -> nn.Module:
        """The dense architecture (with the same standard-MoE FFNs, if any) at the base width (or ``width``)
        on the meta device, for muP rates."""
        width = self.base_width if width is None else width
        cache = self.__dict__.setdefault("_base_models", {})  # shapes only, read by param_groups: built once
        if (moe, width) not in cache:
            if moe is not None:
                cache[moe, width] = self.make_model(width, device="meta", moe=moe)
            else:
                cache[moe, width] = self.make_model(width, device="meta")
        return cache[moe, width]

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        moe = getattr(model, "moe_config", None)
        return es.param_groups(  # delta: the architecture at another width tells which fan-ins grow (mup's way)
            model,
            lr,
            base=self.base_model(moe),
            delta=self.base_model(moe, width=2 * self.base_width),
            weight_decay=self.hyper.weight_decay,
            input_lr_mult=self.hyper.input_lr_mult,
        )

    def flops_per_step(self, model: nn.Module) -> int:
        """Training FLOPs of one optimizer step of ``model`` (THEORY 8), exact for the linear layers."""
        width = _width_of(model)
        return flops.model_train_flops(model, self.rows_per_step(), self.data_fed) + self.extra_train_flops(width)

    def describe(self) -> dict:
        cfg = getattr(self, "config", None)
        return {"task": self.name, **({} if cfg is None else cfg.__dict__)}


def to_device(batch, device):
    """``batch`` (a tensor, or a tuple or list of tensors and other values) with its tensors on ``device``.

    Every task moves its training and evaluation batches with this, so the transfer is decided in one place:
    a tensor already on ``device`` is returned as it is (no copy; on CPU nothing changes), and a host tensor
    bound for CUDA is copied into pinned (page-locked) memory and sent with ``non_blocking=True``, so the copy
    runs on the stream without the host waiting for the GPU (a copy from ordinary memory would synchronise)."""
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(t, device) for t in batch)
    if not isinstance(batch, torch.Tensor):
        return batch
    dev = torch.device(device)
    if batch.device == dev:
        return batch
    if dev.type == "cuda" and batch.device.type == "cpu":
        if not batch.is_pinned():
            batch = batch.pin_memory()
        return batch.to(dev, non_blocking=True)
    return batch.to(dev)


def _is_dense(spec) -> bool:
    if isinstance(spec, str):
        return spec.strip().lower() == "dense"
    return isinstance(spec, es.Spec) and len(spec.cores) == 1 and spec.label == "dense"


def _kind(device) -> str:
    return getattr(device, "type", None) or (str(device).split(":")[0] if device is not None else "cpu")


def _width_of(model: nn.Module) -> int:
    return int(getattr(model, "width", 0))


def check_positive(name: str, value, kind=int) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int)
    if not ok or not math.isfinite(value) or value <= 0:
        raise SearchError(f"{name} must be a positive {'number' if kind is float else 'integer'}, got {value!r}")
    return value
