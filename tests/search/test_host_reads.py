"""No host syncs in the training step: batch transfers (pinned, non-blocking on CUDA; untouched on CPU) and a count
of the operations that read device memory back to the host in search.train's steps."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import einstruct as es
from search import train
from search.families.btt_moe import FAMILY as BTT_MOE
from search.tasks import get
from search.tasks.base import to_device

from .conftest import TINY_TASK

# ---- batch transfers ----------------------------------------------------------------------------------


def test_cpu_batches_come_back_unchanged_without_a_copy():
    x, y = torch.randn(4, 3), torch.arange(4)
    out = to_device((x, y, 0.5), "cpu")
    assert isinstance(out, tuple) and out[0] is x and out[1] is y and out[2] == 0.5
    assert to_device([x], torch.device("cpu"))[0] is x
    assert to_device(x, "cpu") is x


def test_host_batches_bound_for_cuda_are_pinned_and_sent_without_blocking(monkeypatch):
    """On a (simulated) CUDA device: a host tensor is pinned, then copied with non_blocking=True; a tensor that
    is already pinned is not pinned again; values that are not tensors pass through."""
    calls = []

    def pin_memory(self):
        calls.append(("pin", self.shape))
        return self

    def to(self, *args, **kwargs):
        calls.append(("to", torch.device(args[0]), kwargs.get("non_blocking", False)))
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: False)
    x, y = torch.randn(4, 3), torch.arange(4)
    out = to_device((x, y, 0.25), "cuda:0")
    assert out[2] == 0.25
    cuda = torch.device("cuda:0")
    assert calls == [("pin", (4, 3)), ("to", cuda, True), ("pin", (4,)), ("to", cuda, True)]
    calls.clear()
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: True)
    to_device(x, torch.device("cuda"))
    assert calls == [("to", torch.device("cuda"), True)]


def test_every_task_moves_its_batches_with_the_one_helper(monkeypatch):
    """The regression task's training and evaluation batches go through to_device (so the policy lives there)."""
    import search.tasks.regression as regression

    seen = []

    def spy(batch, device):
        seen.append(device)
        return to_device(batch, device)

    monkeypatch.setattr(regression, "to_device", spy)
    task = get("regression", **TINY_TASK)
    task.prepare(0)
    x, y = task.batch(0, torch.Generator().manual_seed(0), "cpu")
    assert x.shape == (TINY_TASK["batch"], 8) and y.shape == (TINY_TASK["batch"], 1)
    model = task.build(None, 16)
    task.eval_loss(model, "cpu")
    assert len(seen) == 2 and set(seen) == {"cpu"}  # one training batch, one evaluation chunk of 256


# ---- host reads in the step ---------------------------------------------------------------------------

_SCALAR_READS = {"aten._local_scalar_dense", "aten.equal", "aten.is_nonzero", "aten.allclose"}
_DATA_SHAPED = {  # outputs whose shape depends on the values: the host must read them to allocate
    "aten.nonzero",
    "aten.masked_select",
    "aten._unique",
    "aten._unique2",
    "aten.unique_dim",
    "aten.unique_consecutive",
    "aten.bincount",
    "aten.masked_scatter",
}


class HostReads(TorchDispatchMode):
    """Counts operations that force a read of device memory by the host: scalar reads (.item(), bool(), float()),
    data-dependent output shapes (nonzero, boolean-mask indexing, unique, repeat_interleave without
    output_size), copies to the CPU from another device; and (patched, since they bypass the dispatcher)
    Tensor.tolist, .numpy and .cpu."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket._qualified_op_name.replace("::", ".")
        if name in _SCALAR_READS or name in _DATA_SHAPED:
            self.reads.append(name)
        elif name == "aten.repeat_interleave" and kwargs.get("output_size") is None:
            self.reads.append(name)
        elif name in ("aten.index", "aten.index_put", "aten.index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())
        ):
            self.reads.append(f"{name} (boolean mask)")
        elif name in ("aten._to_copy", "aten.copy_"):
            src = args[1] if name == "aten.copy_" else args[0]
            dst = args[0].device if name == "aten.copy_" else kwargs.get("device")
            if dst is not None and torch.device(dst).type == "cpu" and src.device.type not in ("cpu", "meta"):
                self.reads.append(f"{name} to the host")
        return func(*args, **kwargs)


def _count_steps(monkeypatch, task):
    """Runs every search.train step (drawing its batch, then Step: forward, backward, clip, AdamW) under one
    HostReads; returns (the mode with its reads, a list with one entry per step counted)."""
    mode, counted, inside = HostReads(), [], []
    plain_call, plain_batch = train.Step.__call__, task.batch

    def counted_call(self, batch, factor, autocast):
        inside.append(1)
        try:
            with mode:
                return plain_call(self, batch, factor, autocast)
        finally:
            inside.pop()
            counted.append(1)

    def counted_batch(step, generator, device):
        inside.append(1)
        try:
            with mode:
                return plain_batch(step, generator, device)
        finally:
            inside.pop()

    for name in ("tolist", "numpy", "cpu"):  # they read memory without going through the dispatcher
        monkeypatch.setattr(torch.Tensor, name, _counting(getattr(torch.Tensor, name), name, mode, inside))
    monkeypatch.setattr(train.Step, "__call__", counted_call)
    monkeypatch.setattr(task, "batch", counted_batch)
    return mode, counted


def _counting(plain, name: str, mode: HostReads, inside: list):
    def read(self, *args, **kwargs):
        if inside:
            mode.reads.append(f"Tensor.{name}")
        return plain(self, *args, **kwargs)

    return read


TINY_MOE_TASK = dict(TINY_TASK, widths=[64])  # a BTT-MoE layer needs a square-root-like split (64)

CANDIDATES = {
    "dense": (None, 16, TINY_TASK, 0),
    "btt": (es.presets.btt(rank=1), 16, TINY_TASK, 0),
    "theta": (es.theta(0.566, 0.075, 0.359, 0.159, 0.827, 0.014, 0.068), 32, TINY_TASK, 0),
    "btt_moe (the search's)": (BTT_MOE.build({"experts": 4, "active": 2}), 64, TINY_MOE_TASK, 0),  # tiled
    "btt_moe dense": (es.MoEConfig(experts=4, active=2, dispatch="dense"), 64, TINY_MOE_TASK, 0),
    "btt_moe sparse": (es.MoEConfig(experts=4, active=2, dispatch="sparse"), 64, TINY_MOE_TASK, 1),
}


@pytest.mark.parametrize("name", CANDIDATES)
def test_the_training_step_reads_nothing_back_to_the_host(name, monkeypatch):
    """Dense, structured and MoE candidates: zero host reads per step (the sparse dispatch, which sizes its
    groups on the host, reads once per MoE layer per step: the count can fail). The loss is read back outside
    the step, once every ``check_every`` steps (train.run's documented read)."""
    spec, width, settings, reads_per_layer = CANDIDATES[name]
    task = get("regression", **settings)
    mode, counted = _count_steps(monkeypatch, task)
    steps = 4
    _, per_step = train.plan(task, spec, width, 1.0)
    result = train.run(task, spec, width, per_step * steps, seed=0, device="cpu", evals=1, check_every=2)
    assert result.steps == steps and len(counted) == steps and result.train_curve[-1][0] == steps * per_step
    assert len(result.train_curve) == steps // 2  # the loss read back every 2 steps, outside the step
    moe_layers = sum(isinstance(m, es.BTTMoE) for m in task.build(spec, width, device="meta").modules())
    assert moe_layers == (3 if "moe" in name else 0)  # the three hidden blocks
    assert len(mode.reads) == reads_per_layer * moe_layers * steps, mode.reads
    if reads_per_layer:
        assert set(mode.reads) == {"Tensor.tolist"}


CUDA_CANDIDATES = {
    "dense": None,
    "btt": es.presets.btt(rank=1),
    "btt_moe tiled": es.MoEConfig(experts=4, active=2, dispatch="tiled"),
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", CUDA_CANDIDATES)
def test_the_cuda_training_step_does_not_synchronise(name, monkeypatch):
    """On CUDA, each step after the first (which creates the optimizer state) and the drawing of its batch under
    torch.cuda.set_sync_debug_mode('error'): a synchronising call raises. The loss read-back every check_every
    steps and the evaluations synchronise by design, so they fall outside."""
    spec = CUDA_CANDIDATES[name]
    task = get("regression", **TINY_MOE_TASK)
    _, per_step = train.plan(task, spec, 64, 1.0)
    plain_call, plain_batch, checked = train.Step.__call__, task.batch, []

    def strict(fn, *args):
        torch.cuda.set_sync_debug_mode("error" if checked else "default")
        try:
            return fn(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    def strict_call(self, batch, factor, autocast):
        loss = strict(plain_call, self, batch, factor, autocast)
        checked.append(1)
        return loss

    monkeypatch.setattr(train.Step, "__call__", strict_call)
    monkeypatch.setattr(task, "batch", lambda step, gen, dev: strict(plain_batch, step, gen, dev))
    result = train.run(task, spec, 64, per_step * 6, seed=0, device="cuda", evals=1, check_every=3)
    assert result.steps == 6 and len(checked) == 6
