"""Named structures of THEORY 1 as Specs: dense, low_rank, kron, tt, monarch, btt, block_diag."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from .errors import SpecError
from .sizes import parse_size
from .spec import Spec


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise SpecError(f"{name} must be a positive integer, got {v!r}")
    return v


def _rank(v):
    """A rank is a bond size: an integer or a monomial such as 'd^1/4'."""
    parse_size(v, "r (rank)")
    return v


def dense() -> Spec:
    return Spec("i,W:io->o", i="d_in", o="d_out", label="dense")


def low_rank(rank=1) -> Spec:
    return Spec("i,V:ir,U:ro->o", i="d_in", o="d_out", r=_rank(rank), label=f"low_rank(rank={rank})")


def kron() -> Spec:
    return Spec("ab,A:ac,B:bd->cd", a="d_in^1/2", b="d_in^1/2", c="d_out^1/2", d="d_out^1/2", label="kron")


def tt(rank=1) -> Spec:
    return Spec(
        "ab,acr,bdr->cd",
        a="d_in^1/2",
        b="d_in^1/2",
        c="d_out^1/2",
        d="d_out^1/2",
        r=_rank(rank),
        label=f"tt(rank={rank})",
    )


def btt(rank=1) -> Spec:
    return Spec(
        "ga,R:gafr,L:fgre->fe",
        g="d_in^1/2",
        a="d_in^1/2",
        f="d_out^1/2",
        e="d_out^1/2",
        r=_rank(rank),
        label=f"btt(rank={rank})",
    )


def monarch(blocks=4) -> Spec:
    """P L P^T R with b blocks; middle width min(d_in, d_out), so r = d/b^2 (THEORY 1)."""
    b = _positive_int("blocks", blocks)
    return Spec(
        "ga,R:gafr,L:fgre->ef",
        g=b,
        f=b,
        a=f"d_in/{b}",
        e=f"d_out/{b}",
        r=f"d/{b * b}",
        label=f"monarch(blocks={b})",
    )


def block_diag(blocks=4) -> Spec:
    b = _positive_int("blocks", blocks)
    return Spec("ga,B:gae->ge", g=b, a=f"d_in/{b}", e=f"d_out/{b}", label=f"block_diag(blocks={b})")


PRESETS: dict[str, Callable[..., Spec]] = {
    "dense": dense,
    "low_rank": low_rank,
    "kron": kron,
    "tt": tt,
    "btt": btt,
    "monarch": monarch,
    "block_diag": block_diag,
}


SHOWN_RANK = 2  # any bond > 1 keeps its axis; the einsum's text is the same for every such rank


def declared(name: str) -> Spec:
    """A preset's Spec with every axis it declares, for display: the default bond (rank 1) is an axis of size 1,
    which a Spec drops (so that low_rank() is 'i,i,o->o' and tt() is Kronecker); a rank of 2 keeps it. The
    Spec's sizes are the preset's own, apart from that rank."""
    fn = PRESETS[name]
    return fn(rank=SHOWN_RANK) if "rank" in inspect.signature(fn).parameters else fn()


def listing() -> list[tuple[str, str, str]]:
    """(name, einsum with its bond axes, sizes and defaults) per preset, as `python -m einstruct list` shows it."""
    rows = []
    for name, fn in PRESETS.items():
        spec, params = declared(name), inspect.signature(fn).parameters
        sizes = ", ".join(f"{a}={'rank' if a == 'r' and 'rank' in params else s}" for a, s in spec.size_items)
        defaults = ", ".join(f"{k}={p.default}" for k, p in params.items())
        if "rank" in params and params["rank"].default == 1:
            defaults += ", where r has size 1 and is dropped"
        rows.append((name, spec.einsum, sizes + (f" (default {defaults})" if defaults else "")))
    return rows


def get(name: str, **kwargs) -> Spec:
    """A preset by name with its arguments (defaults: rank 1, 4 blocks)."""
    key = name.strip().lower().replace("-", "_") if isinstance(name, str) else name
    if key not in PRESETS:
        hint = " (an einsum string needs sizes: use es.Spec(...))" if isinstance(name, str) and "->" in name else ""
        raise SpecError(f"unknown preset {name!r}{hint}; presets are {', '.join(PRESETS)}")
    try:
        return PRESETS[key](**kwargs)
    except TypeError:
        args = ", ".join(inspect.signature(PRESETS[key]).parameters) or "no arguments"
        raise SpecError(f"preset {key!r} takes {args}; got {', '.join(kwargs)}") from None
