"""The registry of built-in families (name -> Family, in report and reference order) and the built-in spaces.

Adding a built-in family is one file in search/families/ with a ``FAMILY`` object, named here once.
"""

from __future__ import annotations

from ..errors import SearchError
from . import btt, btt_moe, dense, moe, monarch, mpo3, theta
from .base import Family

BUILTIN: dict[str, Family] = {
    f.name: f for f in (dense.FAMILY, theta.FAMILY, monarch.FAMILY, btt.FAMILY, btt_moe.FAMILY, moe.FAMILY, mpo3.FAMILY)
}

# space name -> its families (a name, or a Family for a variant such as theta's BTT subspace)
SPACES: dict[str, tuple] = {
    "full": ("theta", "dense", "monarch", "btt"),
    "theta": ("theta",),
    "btt": (theta.BTT_SUBSPACE,),  # theta with beta = delta = 0
    "moe": ("dense", "btt", "btt_moe", "moe"),  # opt-in: MoE candidates train slower per FLOP on a CPU
    "mpo3": ("mpo3", "dense"),  # opt-in: the continuous three-core family, with dense as the yardstick
}


def lookup(name: str) -> Family:
    """The built-in family ``name``; SearchError naming the choices."""
    if name not in BUILTIN:
        raise SearchError(
            f"unknown structure family {name!r}; the built-in families are {', '.join(BUILTIN)} (a study's own "
            "families come from its --space file)"
        )
    return BUILTIN[name]


def builtin_space(name: str) -> tuple[Family, ...]:
    return tuple(lookup(f) if isinstance(f, str) else f for f in SPACES[name])


def legacy_columns() -> tuple[str, ...]:
    """The built-in families' own trials.csv columns (theta's entries, blocks, rank, experts, active), in order."""
    out: list[str] = []
    for f in BUILTIN.values():
        out += [c for c in f.legacy_columns if c not in out]
    return tuple(out)


def order(fam: Family) -> int:
    """Position in the registry (a study's own families come after the built-ins)."""
    names = list(BUILTIN)
    return names.index(fam.name) if fam.name in BUILTIN else len(names)


def report_groups(families=()) -> tuple[str, ...]:
    """Every group the built-ins (then ``families``) may give, in report order."""
    out: list[str] = []
    for f in (*BUILTIN.values(), *families):
        out += [g for g in f.report_groups() if g not in out]
    return tuple(out)
