"""How many intra-op CPU threads a trial trains with (``--threads``).

A level-0 trial of the default search trains a width-32 MLP: each op of its step works on a few thousand
numbers, and spreading one over several threads costs more in synchronisation than it saves. On a machine
whose cores are busy (other workers, other users) a thread that waits for a core stalls the whole op, so
several threads per small op are far slower than one (``python -m benchmarks.threads`` measures both side by
side). Large steps gain from threads. Hence:

- ``--threads 0`` (auto, the default): a trial whose training step costs fewer than :data:`SMALL_STEP_FLOPS`
  runs on one thread; a larger one on this worker's share of the cores, which is torch's thread count when
  the process starts (``OMP_NUM_THREADS`` if set, else the cores), divided by the CPU workers ``search.run``
  starts on this machine (each worker it starts is given ``OMP_NUM_THREADS`` = its share).
- ``--threads N``: every CPU trial runs on N threads.

GPU trials are left alone. The thread count changes the order of floating-point sums inside a matmul, so
two runs at different counts may differ in the last bits; it is not a keyed option (the study's settings
do not depend on it).
"""

from __future__ import annotations

import contextlib
import os

import torch

# Training FLOPs per step below which a trial runs on one thread. On this project's 2-core machine two threads
# were slower, and erratic, for every step of the CPU task grids (regression widths 32-512, up to 1.2e9 FLOPs a
# step: best of 3, 2 threads / 1 thread from 0.7x to 38x, python -m benchmarks.threads); steps of the tasks'
# GPU-sized configurations (1e10 and more) get the share.
SMALL_STEP_FLOPS = 1e10


def cores() -> int:
    """The cores this process may run on (its affinity where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def share(cpu_workers: int) -> int:
    """Threads each of ``cpu_workers`` CPU workers on this machine may use: this process's thread count
    (``OMP_NUM_THREADS``, else the cores) split evenly, at least 1."""
    return max(1, torch.get_num_threads() // max(1, cpu_workers))


def for_trial(setting: int, per_step_flops: float, device: torch.device, ceiling: int) -> int | None:
    """The threads a trial uses (None: leave them as they are, for a GPU trial); ``setting`` is ``--threads``
    (0: auto), ``ceiling`` this worker's share."""
    if device.type != "cpu":
        return None
    if setting:
        return setting
    return 1 if per_step_flops < SMALL_STEP_FLOPS else ceiling


@contextlib.contextmanager
def used(n: int | None):
    """Run the block on ``n`` intra-op threads (None: unchanged), restoring the count after it."""
    if n is None or n == torch.get_num_threads():
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
