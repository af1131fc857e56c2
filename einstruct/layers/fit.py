"""fit_cores: a least-squares fit of any spec's cores to a dense matrix (alternating least squares).

For specs with no closed-form projection (three or more cores, see :mod:`einstruct.layers.projection`)
the cores minimising ``||W - dense(cores)||_F`` are fitted by alternating least squares: starting from a
seeded draw of the cores at their init stds, each sweep solves, for one core at a time with the others
fixed, the exact linear least-squares problem in that core (its normal equations, one small system per
index of the axes it shares with x or y, solved with a rank-revealing ``lstsq``). Each step can only
lower the error, so the sweeps stop when a sweep improves the squared error by less than ``tol`` of it,
or after ``sweeps``. The result is a local optimum, not always the global one (the problem is not convex
for three or more cores); the caller reports the relative error it reached. Deterministic: float64, a
fixed seed, no data-dependent threading.

Entries of W that no structured matrix can hold (off the diagonal of block axes shared by x and y) are
left out of the fit (they count in the reported error). The fitted cores are rescaled, without changing
their product, so that each core's RMS is its init std times one common factor.
"""

from __future__ import annotations

import math

import torch

from ..compiler import Structure
from ..errors import SpecError

SWEEPS = 100
TOL = 1e-12
_MAX_INDICES = 52  # torch.einsum's sublist format numbers indices below 52


def fit_cores(
    T: torch.Tensor, st: Structure, *, sweeps: int = SWEEPS, tol: float = TOL, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Cores (name -> float64 tensor in the core's spec axis order) fitted to T, W's (y axes, x axes) tensor."""
    spec, sizes = st.spec, st.sizes
    letters = spec.y + spec.x
    out_axes = "".join(dict.fromkeys(letters))  # block axes (in x and y) once: the diagonal is what cores reach
    D = torch.einsum(f"{letters}->{out_axes}", T)
    names = [c.name for c in st.cores]
    axes = {c.name: c.axes for c in st.cores}
    ids = {a: i for i, a in enumerate(spec.axes)}
    spare = iter(range(len(ids), _MAX_INDICES))  # second copies of the summed (bond) axes
    twin = {}
    for a in spec.axes:
        if a not in out_axes:
            try:
                twin[a] = next(spare)
            except StopIteration:
                raise SpecError(
                    f"from_dense: {spec.einsum!r} has too many axes for the least-squares fit (at most "
                    f"{_MAX_INDICES} indices with the bond axes twice); use fewer axes"
                ) from None
    gen = torch.Generator(device="cpu").manual_seed(seed)
    cores = {
        c.name: (torch.randn(c.shape, generator=gen, dtype=torch.float64) * c.init_std).to(T.device) for c in st.cores
    }
    idx = lambda ax: [ids[a] for a in ax]
    idx2 = lambda ax: [twin.get(a, ids[a]) for a in ax]
    norm2 = float(D.pow(2).sum())
    if norm2 == 0:
        return {n: torch.zeros_like(c) for n, c in cores.items()}

    def error() -> float:
        ops = [x for n in names for x in (cores[n], idx(axes[n]))]
        return float((D - torch.einsum(*ops, idx(out_axes))).pow(2).sum())

    last = error()
    for _ in range(sweeps):
        for k in names:
            others = [n for n in names if n != k]
            seen = {a for n in others for a in axes[n]}
            # the core's x/y axes: those the other cores share (one system each) and its own (same system)
            s = "".join(a for a in axes[k] if a in out_axes and a in seen)
            own = "".join(a for a in axes[k] if a in out_axes and a not in seen)
            b = "".join(a for a in axes[k] if a not in out_axes)
            env1 = [x for n in others for x in (cores[n], idx(axes[n]))]
            env2 = [x for n in others for x in (cores[n], idx2(axes[n]))]
            G = torch.einsum(*env1, *env2, idx(s) + idx(b) + idx2(b))
            rhs = torch.einsum(D, idx(out_axes), *env1, idx(s) + idx(own) + idx(b))
            size = lambda ax: math.prod(sizes[a] for a in ax)
            ns, no, nb = size(s), size(own), size(b)
            G = G.reshape(ns, nb, nb)
            rhs = rhs.reshape(ns, no, nb).transpose(1, 2)  # (s, b, own): one right-hand side per own index
            sol = torch.linalg.lstsq(G.cpu(), rhs.cpu(), driver="gelsd").solution.to(T.device)  # (s, b, own)
            new = sol.transpose(1, 2).reshape(*[sizes[a] for a in s + own + b])
            s = s + own
            cores[k] = torch.einsum(f"{s}{b}->{axes[k]}", new)
        err = error()
        done = err <= tol * norm2 or last - err <= tol * last  # exact, or a sweep gained under tol of the error
        last = err
        if done:
            break
    return _balance(cores, st)


def _balance(cores: dict[str, torch.Tensor], st: Structure) -> dict[str, torch.Tensor]:
    """Rescale the cores (product unchanged) so that RMS(core) / init_std is the same for every core."""
    ratio = {}
    for c in st.cores:
        rms = float(cores[c.name].pow(2).mean().sqrt())
        if rms == 0:
            return cores  # a zero core: the product is zero whatever the others
        ratio[c.name] = rms / c.init_std
    common = math.exp(sum(math.log(r) for r in ratio.values()) / len(ratio))
    return {n: t * (common / ratio[n]) for n, t in cores.items()}
