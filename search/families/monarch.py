"""The Monarch family: b blocks (THEORY 1), b from a fixed grid; 4 blocks is the reference."""

from __future__ import annotations

import einstruct as es

from .grid import GridFamily

BLOCKS = (2, 4, 8, 16)

FAMILY = GridFamily("monarch", "Monarch", "blocks", "b", BLOCKS, es.presets.monarch, reference=4)
