"""Structure families as plugins: the Family protocol, the built-in registry, and user spaces (TOML, entry point).

    from search.families import BUILTIN, Family, Candidate
    BUILTIN["btt"].build({"rank": 2})         # es.presets.btt(rank=2)

Built-ins, one file each: dense, theta, monarch, btt, btt_moe, moe and mpo3 (the continuous three-core family,
docs/mpo3.md). A user's own families come from a space file or a Python entry point (search.families.loader).
"""

from .base import Candidate, Family
from .registry import BUILTIN, SPACES, legacy_columns, lookup, report_groups
from .spec_family import SpecFamily

__all__ = ["BUILTIN", "SPACES", "Candidate", "Family", "SpecFamily", "legacy_columns", "lookup", "report_groups"]
