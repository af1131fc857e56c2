"""Argument checks shared by the torch layers (torch-free): sizes given as positive integers."""

from __future__ import annotations

from ..errors import SpecError


def check_features(value, name: str) -> int:
    """``value`` if it is a positive integer (not a bool), else a SpecError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpecError(f"StructuredLinear: {name} must be a positive integer, got {value!r}")
    return value
