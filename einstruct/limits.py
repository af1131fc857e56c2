"""Memory limits: a layer or a forward whose tensors cannot fit is refused, with its size, before allocating.

The limit is the total memory of the device the tensors would live on (physical RAM for the CPU, the
card's memory for CUDA; none for the meta device), or ``MAX_BYTES`` when it is set. A request above it
can never succeed, so it is refused with a MemoryLimitError that gives its size in bytes instead of letting the
allocator fail deep inside torch (or, worse, succeed lazily and swap). Torch is imported only for CUDA.
"""

from __future__ import annotations

import math
import os

from .errors import MemoryLimitError

MAX_ELEMENTS = 2**62  # no tensor holds more elements than this (torch counts them in an int64)
MAX_BYTES: int | None = None  # override the device's memory (e.g. a tighter limit for a shared machine)

_cache: dict[tuple[str, int | None], int | None] = {}


def count(n: int) -> str:
    """A possibly astronomically large integer in 3 significant digits (``1.33e+89``), never overflowing."""
    if n < 10**15:
        return f"{n:.3g}" if n >= 10**6 else str(n)
    e = math.floor(math.log10(n))  # exact enough for display; works for ints beyond float range
    return f"{n / 10 ** (e - 2) / 100:.2f}e+{e}" if e < 300 else f"about 10^{e}"


def human_bytes(n: int) -> str:
    """``1536`` -> ``'1.5 KiB (1536 bytes)'``; ``'N bytes'`` below a KiB."""
    if n < 1024:
        return f"{int(n)} bytes"
    units = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    i = min(len(units) - 1, (int(n).bit_length() - 1) // 10 - 1)
    v = int(n) // 1024 ** (i + 1)
    shown = f"{n / 1024 ** (i + 1):.3g}" if v < 10**6 else count(v)
    return f"{shown} {units[i]} ({count(int(n))} bytes)"


def physical_memory() -> int | None:
    """Total RAM in bytes, or None where the platform does not say."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def device_memory(device) -> int | None:
    """The byte limit for tensors on ``device`` (a torch.device, a string or None for the CPU)."""
    kind = getattr(device, "type", None) or (str(device).split(":")[0] if device is not None else "cpu")
    if kind == "meta":  # shapes only, nothing is allocated
        return None
    if MAX_BYTES is not None:
        return MAX_BYTES
    index = getattr(device, "index", None)
    key = (kind, index)
    if key not in _cache:
        if kind == "cpu":
            _cache[key] = physical_memory()
        elif kind == "cuda":
            import torch

            try:
                i = torch.cuda.current_device() if index is None else index
                _cache[key] = int(torch.cuda.get_device_properties(i).total_memory)
            except (RuntimeError, AssertionError):
                _cache[key] = None
        else:  # meta, mps, xpu, ...: not known here
            _cache[key] = None
    return _cache[key]


def check_fits(what, n_bytes: int, device, fix: str) -> None:
    """Raise MemoryLimitError if ``n_bytes`` for ``what`` exceed the memory of ``device``.

    ``what`` is a string or a callable giving it, so a check that runs on every forward builds no
    message unless it fails.
    """
    limit = device_memory(device)
    if limit is not None and n_bytes > limit:
        where = getattr(device, "type", None) or device or "cpu"
        what = what() if callable(what) else what
        raise MemoryLimitError(
            f"{what} need {human_bytes(n_bytes)}, more than the {human_bytes(limit)} of memory on {where}; {fix}"
        )


def process_memory_limit() -> int | None:
    """The most memory this process may still map, in bytes: what its address-space limit (RLIMIT_AS,
    ``ulimit -v``) leaves above what it maps now, or its cgroup's memory limit (a container's), whichever is
    lower; None when neither is set."""
    out = []
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft not in (resource.RLIM_INFINITY, -1) and soft > 0:
            out.append(max(0, int(soft) - _mapped()))
    except (ImportError, ValueError, OSError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:  # cgroup v1 says 'no limit' with a huge number
            out.append(int(text))
    return min(out) if out else None


def _mapped() -> int:
    """Bytes of address space this process maps now (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def training_memory_limit(device) -> int | None:
    """The memory a model on ``device`` may use: the device's (``device_memory``), and for the CPU no more than
    the process may map (``process_memory_limit``). None when unknown (or on the meta device)."""
    limit = device_memory(device)
    kind = getattr(device, "type", None) or (str(device).split(":")[0] if device is not None else "cpu")
    if kind == "cpu" and MAX_BYTES is None:
        proc = process_memory_limit()
        if proc is not None:
            limit = proc if limit is None else min(limit, proc)
    return limit
