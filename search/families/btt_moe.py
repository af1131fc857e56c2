"""The BTT-MoE family (THEORY 6): every structured linear a BTT-MoE over (experts, active), tiled dispatch."""

from __future__ import annotations

from .moe import MoEFamily

FAMILY = MoEFamily("btt_moe", "BTT-MoE", kind="btt")
