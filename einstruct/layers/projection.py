"""from_dense: the closest structured layer (in Frobenius norm) to a dense weight matrix.

Supported structures are those whose closest member has a closed form:

- **one core** (dense ``i,io->o``, block diagonal ``ga,gae->ge``): copy the entries the core can hold
  (for block axes, the diagonal blocks); everything else must be zero and is dropped.
- **two cores joined by bond axes** (low rank ``i,ir,ro->o``, Kronecker ``ab,ac,bd->cd``,
  Tensor-Train ``ab,acr,bdr->cd``, BTT ``ga,gafr,fgre->fe``, Monarch ``ga,gafr,fgre->ef`` and the
  theta family): the axes of x and y split into *block* axes S (in both cores), axes P only in the
  first core and axes Q only in the second. For each block index s the structured matrix restricted to
  that block is ``M_s[P, Q] = sum_r C1[s, P, r] C2[s, Q, r]``, a rank-R problem (R = product of the
  bond sizes). Its best solution is the top-R truncated SVD of the block (Eckart-Young), with the
  singular values split as sqrt between the two cores (the per-block SVD of the ICML appendix; for low
  rank this is the truncated SVD of W, for Kronecker the Van Loan-Pitsianis nearest Kronecker product).

- **any other spec the compiler accepts** (three or more cores, or bond axes in one core only): no closed
  form; the cores are *fitted* by alternating least squares (:mod:`einstruct.layers.fit`: deterministic,
  a local optimum, exact when W already has the structure in the cases the tests cover).

Specs it cannot project raise a SpecError naming them: those with an axis of x or y in no core (such as
``ga,A:ab->gb``, one block repeated along g: the matrix is then the same along that axis).
``layer.projection_error`` is the relative error ``||W - layer.to_dense()||_F / ||W||_F`` reached (0 for a
zero W); es.summary shows it.

A layer whose sizes are padded (THEORY 2) is fitted to W embedded in zeros at its padded size.
"""

from __future__ import annotations

import math

import torch

from ..compiler import Structure
from ..errors import SpecError

SUPPORTED = (
    "every axis of x and y in some core (closed form for one core or two cores joined by bond axes, a "
    "least-squares fit otherwise)"
)


def from_dense(W, spec, bias=None, **layer_kwargs):
    """A StructuredLinear(in, out, spec) whose matrix is the closest structured matrix to W (out, in).

    ``bias`` (a tensor of shape (out,) or None) is copied; ``layer_kwargs`` go to StructuredLinear
    (``zero_init`` is ignored: the cores are overwritten). With ``normalize=True`` each core's gain is set
    so that the normalised core equals the projected one.
    """
    from .linear import StructuredLinear

    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        got = f"a tensor of shape {tuple(W.shape)}" if isinstance(W, torch.Tensor) else type(W).__name__
        raise SpecError(f"from_dense needs a 2-d weight tensor of shape (out_features, in_features), got {got}")
    if W.is_meta:
        raise SpecError("from_dense cannot read a weight on the meta device; load or materialise the weights first")
    if not (W.is_floating_point() or W.is_complex()):
        raise SpecError(f"from_dense needs a floating-point weight, got dtype {W.dtype}")
    d_out, d_in = W.shape
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (d_out,)):
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise SpecError(f"from_dense: bias must be a tensor of shape ({d_out},) or None, got {got}")
    layer_kwargs = dict(layer_kwargs)
    layer_kwargs.pop("zero_init", None)
    layer_kwargs.setdefault("device", W.device)
    layer_kwargs.setdefault("dtype", W.dtype)
    layer = StructuredLinear(d_in, d_out, spec, bias=bias is not None, **layer_kwargs)
    cores = project(W.detach(), layer.structure)
    with torch.no_grad():
        for name, value in cores.items():
            getattr(layer, name).copy_(value)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        _match_gains(layer, cores)
        scale = float(W.detach().double().norm())
        miss = float((layer.to_dense().double() - W.detach().double()).norm())
    layer.projection_error = miss / scale if scale > 0 else 0.0
    return layer


def project(W: torch.Tensor, st: Structure) -> dict[str, torch.Tensor]:
    """The cores (name -> tensor in the core's spec axis order) of the structured matrix closest to W."""
    spec = st.spec
    sizes = st.sizes
    cores = st.cores
    d_out, d_in = W.shape
    if (d_in, d_out) != (st.d_in, st.d_out):
        raise SpecError(f"W has shape {tuple(W.shape)} but the structure is for ({st.d_out}, {st.d_in})")
    dtype = W.dtype
    work = torch.complex128 if W.is_complex() else torch.float64
    Wp = torch.zeros(st.d_out_padded, st.d_in_padded, dtype=work, device=W.device)
    Wp[:d_out, :d_in] = W.to(work)
    T = Wp.reshape(*[sizes[a] for a in spec.y], *[sizes[a] for a in spec.x])
    xy = set(spec.x) | set(spec.y)
    where = {a: [c.name for c in cores if a in c.axes] for a in spec.axes}
    unreached = [a for a in spec.x + spec.y if not where[a]]
    if unreached:
        raise SpecError(
            f"from_dense: axis '{unreached[0]}' of {spec.einsum!r} is in no core at this size, so the layer "
            f"is not a general map along it; supported specs have {SUPPORTED}"
        )
    letters = spec.y + spec.x  # repeated letters (block axes in x and y) take the diagonal
    if len(cores) == 1:
        (c,) = cores
        bonds = [a for a in c.axes if a not in xy]
        if bonds:
            raise SpecError(
                f"from_dense: the single core {c.name}:{c.axes} sums over axis '{bonds[0]}', which is in "
                f"neither x nor y; supported specs have {SUPPORTED}"
            )
        return {c.name: torch.einsum(f"{letters}->{c.axes}", T).to(dtype)}
    if len(cores) != 2 or any(a not in xy and len(where[a]) != 2 for a in spec.axes):
        if W.is_complex():
            raise SpecError(
                f"from_dense fits {spec.einsum!r} by least squares, which needs a real weight; got {W.dtype}"
            )
        from .fit import fit_cores

        return {name: t.to(dtype) for name, t in fit_cores(T, st).items()}
    c1, c2 = sorted(cores, key=lambda c: c.index)
    S = "".join(a for a in spec.axes if a in xy and a in c1.axes and a in c2.axes)
    P = "".join(a for a in spec.axes if a in xy and a in c1.axes and a not in c2.axes)
    Q = "".join(a for a in spec.axes if a in xy and a in c2.axes and a not in c1.axes)
    B = "".join(a for a in spec.axes if a not in xy)
    size = lambda axes: math.prod(sizes[a] for a in axes)
    ns, n_p, nq, nb = size(S), size(P), size(Q), size(B)
    blocks = torch.einsum(f"{letters}->{S}{P}{Q}", T).reshape(ns, n_p, nq)
    U, sv, Vh = torch.linalg.svd(blocks, full_matrices=False)  # (s, p, k), (s, k), (s, k, q)
    k = min(nb, sv.shape[-1])
    root = sv[:, :k].sqrt().to(work)
    A = torch.zeros(ns, n_p, nb, dtype=work, device=W.device)
    C = torch.zeros(ns, nq, nb, dtype=work, device=W.device)
    A[:, :, :k] = U[:, :, :k] * root[:, None, :]
    C[:, :, :k] = Vh[:, :k, :].transpose(1, 2) * root[:, None, :]
    shape = lambda axes: [sizes[a] for a in axes]
    A = A.reshape(*shape(S), *shape(P), *shape(B))
    C = C.reshape(*shape(S), *shape(Q), *shape(B))
    return {
        c1.name: torch.einsum(f"{S}{P}{B}->{c1.axes}", A).to(dtype),
        c2.name: torch.einsum(f"{S}{Q}{B}->{c2.axes}", C).to(dtype),
    }


def _match_gains(layer, cores: dict[str, torch.Tensor]) -> None:
    """With weight normalisation, set each gain so that g * min(1, sigma / RMS(M)) * M equals M."""
    from .linear import RMS_EPS

    if getattr(layer, "gains", None) is None:
        return
    for name, value in cores.items():
        sigma = layer.init_stds[name]
        rms = math.sqrt(float(value.double().abs().pow(2).mean()) + RMS_EPS)
        layer.gains[name].fill_(max(1.0, rms / sigma))
