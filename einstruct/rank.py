"""Numerical check of the min-cut rank bound: materialise a small instance and take its matrix rank."""

from __future__ import annotations

import math

import numpy as np

from .errors import SpecError

MAX_ELEMENTS = 4_000_000


def dense_matrix(st, cores: dict | None = None, seed: int = 0) -> np.ndarray:
    """The (d_out_padded, d_in_padded) matrix of ``st`` with the given (or random normal) core tensors."""
    if st.d_in_padded * st.d_out_padded > MAX_ELEMENTS:
        raise SpecError(
            f"materialising a {st.d_out_padded}x{st.d_in_padded} matrix is too large for a rank check; "
            "compile at a smaller size"
        )
    rng = np.random.default_rng(seed)
    tensors = []
    for c in st.spec.cores:
        t = None if cores is None else cores.get(c.name)
        if t is None:
            t = rng.standard_normal(tuple(st.sizes[a] for a in c.axes))
        tensors.append(np.asarray(t, dtype=np.float64))
    expr = ",".join(c.axes for c in st.spec.cores) + "->" + st.spec.y + st.spec.x
    # x axes that are also output (block) axes are diagonal in the matrix: handle them with an identity.
    blocks = [a for a in st.spec.x if a in st.spec.y]
    if blocks:
        subs = [c.axes for c in st.spec.cores]
        ops = list(tensors)
        out = ""
        for a in st.spec.y:
            out += a
        xin = "".join(a.upper() if a in blocks else a for a in st.spec.x)
        for a in blocks:
            subs.append(a + a.upper())
            ops.append(np.eye(st.sizes[a]))
        expr = ",".join(subs) + "->" + out + xin
        tensors = ops
    w = np.einsum(expr, *tensors, optimize=True)
    return w.reshape(math.prod(st.sizes[a] for a in st.spec.y), math.prod(st.sizes[a] for a in st.spec.x))


def check_rank(st, seed: int = 0) -> tuple[int, int]:
    """(min-cut bound, numerical rank of the matrix with random normal cores) for a compiled structure."""
    w = dense_matrix(st, seed=seed)
    return st.rank, int(np.linalg.matrix_rank(w))
