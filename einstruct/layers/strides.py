"""Stride arithmetic without torch: what ``permute`` and ``view`` give, and which matrices BLAS reads in place.

The plan decides once, from shapes alone, where a forward or backward can hand ``mm``/``bmm`` a strided view
instead of a copy. These functions mirror torch's own rules (``view`` is torch's ``computeStride``), so the
decisions are the ones a meta tensor would give, without building one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Shape = tuple[int, ...]


def contiguous(shape: Sequence[int]) -> Shape:
    """Strides of a contiguous (row-major) tensor of ``shape``."""
    out, step = [], 1
    for size in reversed(shape):
        out.append(step)
        step *= max(size, 1)
    return tuple(reversed(out))


def permute(shape: Sequence[int], strides: Sequence[int], perm: Sequence[int] | None) -> tuple[Shape, Shape]:
    """(shape, strides) of ``t.permute(perm)``; ``perm=None`` leaves them as they are."""
    if perm is None:
        return tuple(shape), tuple(strides)
    return tuple(shape[p] for p in perm), tuple(strides[p] for p in perm)


def view(shape: Sequence[int], strides: Sequence[int], new: Sequence[int]) -> Shape | None:
    """Strides of ``t.view(new)`` for a tensor of ``shape`` and ``strides``, or None where view would raise.

    torch's ``computeStride``: the new shape must split or merge only runs of dimensions that are contiguous
    with one another; dimensions of size 1 may carry any stride.
    """
    if math.prod(shape) != math.prod(new):
        return None
    if math.prod(shape) == 0 or not shape:
        return contiguous(new)
    out = [0] * len(new)
    view_d = len(new) - 1
    base = strides[-1]
    tensor_numel = view_numel = 1
    for d in range(len(shape) - 1, -1, -1):
        tensor_numel *= shape[d]
        if d == 0 or (shape[d - 1] != 1 and strides[d - 1] != tensor_numel * base):
            while view_d >= 0 and (view_numel < tensor_numel or new[view_d] == 1):
                out[view_d] = view_numel * base
                view_numel *= new[view_d]
                view_d -= 1
            if view_numel != tensor_numel:
                return None
            if d > 0:
                base = strides[d - 1]
                tensor_numel = view_numel = 1
    return tuple(out) if view_d == -1 else None


def blas_readable(strides: Shape | None) -> bool:
    """Whether a (batch of) matrix with these strides is read in place by mm/bmm: a unit stride in one of its
    two matrix dimensions (the batch index may have any stride)."""
    return strides is not None and (strides[-1] == 1 or strides[-2] == 1)


def permuted_view(
    shape: Sequence[int], perm: Sequence[int] | None, new: Sequence[int], strides: Sequence[int] | None = None
) -> Shape | None:
    """Strides of ``t.permute(perm).view(new)`` for ``t`` of ``shape`` (contiguous unless ``strides``), or None."""
    shape, st = permute(shape, contiguous(shape) if strides is None else strides, perm)
    return view(shape, st, new)
