"""Checkpoint files of a training run: few tensors, whole or absent, loaded with ``weights_only=True``.

A run's state (model and optimizer state dicts, generators, curves) is nested dicts and lists of tensors and
plain values. :func:`pack` turns it into the same structure with every tensor replaced by a reference into one
flat buffer per dtype, so ``torch.save`` writes a handful of tensors instead of one record per parameter, its
gradient moments and its step counter (a small model's checkpoint is mostly per-tensor overhead: 86
records for a 3-block MLP, 2 once packed). :func:`unpack` restores the tensors as they were (shapes, dtypes, values).

Files are written to a temporary file, then renamed (``search.train.save_checkpoint``), so a file on disk is
always complete. A file in the format of an earlier version, a damaged file or another run's file reads as no
checkpoint: the run trains from step 0.
"""

from __future__ import annotations

import os

import torch

FORMAT = 2  # 1: plain state dicts (before flat buffers); a checkpoint of another format is not resumed
_REF = "__tensor__"  # a packed tensor: {_REF: index}


def pack(state: dict) -> dict:
    """``state`` with its tensors moved into one flat buffer per dtype: {'format', 'tree', 'buffers', 'index'}."""
    tensors: list[torch.Tensor] = []

    def walk(obj):
        if isinstance(obj, torch.Tensor):
            tensors.append(obj.detach())
            return {_REF: len(tensors) - 1}
        if isinstance(obj, dict):
            return {k: walk(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [walk(v) for v in obj]
        return obj

    tree = walk(state)
    by_dtype: dict[str, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(str(t.dtype).removeprefix("torch."), []).append(i)
    buffers, index = {}, [None] * len(tensors)
    for name, ids in by_dtype.items():
        parts, offset = [], 0
        for i in ids:
            t = tensors[i]
            parts.append(t.reshape(-1))
            index[i] = [name, offset, list(t.shape)]
            offset += t.numel()
        buffers[name] = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
    return {"format": FORMAT, "tree": tree, "buffers": buffers, "index": index}


def unpack(packed: dict) -> dict:
    """The state :func:`pack` was given (tensors on the buffers' device, views of them)."""
    buffers, index = packed["buffers"], packed["index"]

    def walk(obj):
        if isinstance(obj, dict):
            if len(obj) == 1 and _REF in obj:
                name, offset, shape = index[obj[_REF]]
                n = 1
                for s in shape:
                    n *= int(s)
                return buffers[name][offset : offset + n].view(shape)
            return {k: walk(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [walk(v) for v in obj]
        return obj

    return walk(packed["tree"])


def load_checkpoint(path: str | None, key: str | None = None) -> dict | None:
    """The checkpoint at ``path`` (loaded with weights_only=True), or None if absent, unreadable, of another format
    or another run's."""
    if not path or not os.path.exists(path):
        return None
    try:
        packed = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(packed, dict) or packed.get("format") != FORMAT:
            return None
        state = unpack(packed)
    except Exception:  # a foreign or damaged file: train from scratch rather than fail the trial
        return None
    if not isinstance(state, dict) or (key is not None and state.get("key") != key):
        return None
    return state


def checkpoint_step(path: str | None, key: str | None = None) -> int:
    """The step a checkpoint would let a run with this key continue from (0 if none)."""
    state = load_checkpoint(path, key)
    return int(state["step"]) if state is not None else 0


def copy_checkpoint(src: str, dst: str) -> bool:
    """Give ``dst`` its own copy of checkpoint ``src`` (a hard link where the disk allows; whole or absent, never
    partial); False if there is no ``src``. The copy stays what it is when ``src`` is rewritten or removed."""
    import shutil

    from .outputs import temp_path

    if not os.path.exists(src):
        return False
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    tmp = temp_path(dst)
    try:
        try:
            os.link(src, tmp)
        except OSError:  # no hard links here (or another file system): copy
            shutil.copyfile(src, tmp)
    except FileNotFoundError:  # removed meanwhile: the same as none
        return False
    os.replace(tmp, dst)
    return True
