"""The dense family: an nn.Linear, no arguments; every space's reference point."""

from __future__ import annotations

from .base import Family


class Dense(Family):
    name = label = group = "dense"

    def build(self, args):
        return None

    def structure_label(self, args) -> str:
        return "dense"

    def references(self):
        return ({},)

    def cheap_points(self):
        return ({},)


FAMILY = Dense()
