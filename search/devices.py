"""Which device each worker of ``search.run --workers`` trains on, how it is pinned there, and the wall-time
estimate of workers on several devices.

Assignment (``assign``):

- ``--devices cuda:0,cuda:1,...``: worker i trains on the i-th listed device; a device may repeat (``cuda:0,cuda:0``:
  two workers on one GPU). Without ``--workers`` there is one worker per listed device; with it the counts must
  match. The list is all ``cpu`` or all ``cuda:N`` (an index each), and ``--device``, if given too, must be ``auto``
  or that kind.
- Without ``--devices``: ``--device cuda`` (no index) puts one worker on each visible GPU, or, with ``--workers N``,
  worker i on ``cuda:(i mod GPUs)``; so does ``--device auto`` (the default) with ``--workers N`` where a GPU is
  visible (else every worker on cpu); one worker on auto stays on auto; any other device puts every worker on it.

Pinning (``pinned``): worker 0 is the ``search.run`` process itself and trains on its device by name. Every worker it
starts gets an environment of its own: a GPU worker sees only its GPU (``CUDA_VISIBLE_DEVICES=N``) and is told
``--device cuda:0``, the one GPU it sees; a CPU worker sees no GPU (``CUDA_VISIBLE_DEVICES`` empty) and is told
``--device cpu``. No worker relies on a default device shared with the others.
"""

from __future__ import annotations

import re

import torch

from .errors import SearchError

_GPU = re.compile(r"cuda:(\d+)")


def parse(text: str) -> list[str]:
    """The devices of a ``--devices`` list, each ``cpu`` or ``cuda:N`` and present on this machine."""
    out = [d.strip() for d in text.split(",")]
    if not all(out):
        raise SearchError(f"--devices {text!r} has an empty entry; give a comma-separated list such as cuda:0,cuda:1")
    for d in out:
        if d != "cpu" and not _GPU.fullmatch(d):
            raise SearchError(
                f"--devices: {d!r} is not a device; list cpu or cuda:N (a GPU's index each), e.g. cuda:0,cuda:1"
            )
    if len({d.split(":")[0] for d in out}) > 1:
        raise SearchError(f"--devices {text!r} mixes cpu and cuda; list one kind (all cpu, or all cuda:N)")
    gpus = [int(d[5:]) for d in out if d != "cpu"]
    if gpus:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise SearchError(f"--devices {text!r}: no CUDA GPU is available here; list cpu, or leave --devices out")
        missing = sorted({f"cuda:{i}" for i in gpus if i >= count})
        if missing:
            raise SearchError(
                f"--devices: {', '.join(missing)} is not on this machine, which has {count} CUDA GPU(s), "
                f"cuda:0 .. cuda:{count - 1}; list only those"
            )
    return out


def assign(devices: str | None, workers: int | None, device: str | None, stored_device: str = "auto") -> list[str]:
    """The device of each worker (its index in the list): ``devices`` the ``--devices`` text, ``workers`` and
    ``device`` the ``--workers`` and ``--device`` given (None: not given), ``stored_device`` the device the study
    trains on otherwise (given, stored or default)."""
    if devices is not None:
        out = parse(devices)
        kind = out[0].split(":")[0]
        if device is not None and device not in ("auto", kind):
            raise SearchError(
                f"--devices {devices} does not match --device {device}: with --devices leave --device out (or give "
                f"--device {kind}), or drop --devices to train every worker on {device}"
            )
        if workers is not None and workers != len(out):
            raise SearchError(
                f"--workers {workers} but --devices lists {len(out)} device(s); give one device per worker (a device "
                f"may repeat, e.g. {out[0]},{out[0]}), or leave --workers out for one worker per listed device"
            )
        return out
    if stored_device == "auto" and (workers or 1) > 1:  # several workers: each on a device of its own kind
        stored_device = "cuda" if torch.cuda.is_available() else "cpu"
    if stored_device == "cuda" and torch.cuda.is_available():
        count = torch.cuda.device_count()
        return [f"cuda:{i % count}" for i in range(workers or count)]
    return [stored_device] * (workers or 1)


def pinned(device: str) -> tuple[dict, str]:
    """(environment variables, --device) of a started worker that trains on ``device``."""
    if device == "cpu":
        return {"CUDA_VISIBLE_DEVICES": ""}, "cpu"
    m = _GPU.fullmatch(device)
    if m:
        return {"CUDA_VISIBLE_DEVICES": m.group(1)}, "cuda:0"
    return {}, device  # auto, or a kind without GPUs: nothing to pin


def describe(worker: int, device: str) -> str:
    """How worker ``worker`` reaches ``device``, as --dry-run prints it."""
    if worker == 0:
        return "this process"
    env, dev = pinned(device)
    shown = " ".join(f"{k}={v!r}" if v == "" else f"{k}={v}" for k, v in env.items())
    return f"a process with {shown} --device {dev}" if shown else f"a process with --device {dev}"


def estimate(probe, devices: list[str], budget: float, trials: int) -> dict:
    """The wall-time estimate of workers on ``devices``: ``probe(device)`` (search.loop.probe's dict) once per
    distinct device; workers that share a device share its throughput, each worker's overhead per trial is its
    device's, and the trials are spread evenly over the workers:

        seconds = budget / sum(worker FLOP/s) + trials * mean(worker seconds per trial) / workers

    which is ``budget / rate + trials * overhead`` for one worker."""
    probes = {d: probe(d) for d in dict.fromkeys(devices)}
    rows = [
        {
            "worker": i,
            "device": d,
            "flops_per_second": probes[d]["flops_per_second"] / devices.count(d),
            "seconds_per_trial": probes[d]["seconds_per_trial"],
        }
        for i, d in enumerate(devices)
    ]
    rate = sum(r["flops_per_second"] for r in rows)
    overhead = sum(r["seconds_per_trial"] for r in rows) / len(rows)
    est = dict(probes[devices[0]])
    est.update(flops_per_second=rate, seconds_per_trial=overhead, workers=rows)
    est["seconds"] = budget / rate + trials * overhead / len(rows)
    return est
