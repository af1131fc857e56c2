"""The Block Tensor-Train family: integer bond rank r (THEORY 1), r from a fixed grid; rank 1 is the reference."""

from __future__ import annotations

import einstruct as es

from .grid import GridFamily

RANKS = (1, 2, 4)

FAMILY = GridFamily("btt", "BTT", "rank", "r", RANKS, es.presets.btt, reference=1)
