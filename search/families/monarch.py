"""The Monarch family: b blocks (THEORY 1), b from a fixed grid."""

from __future__ import annotations

import einstruct as es

from .base import Family

BLOCKS = (2, 4, 8, 16)


class Monarch(Family):
    name = "monarch"
    label = group = "Monarch"
    keys = legacy_columns = ("blocks",)

    def suggest(self, trial):
        return {"blocks": trial.suggest_categorical("blocks", list(BLOCKS))}

    def params_for(self, args):
        return {"blocks": args["blocks"]}

    def random_params(self, rng):
        return {"blocks": rng.choice(BLOCKS)}

    def normalize(self, args):
        return {"blocks": int(args["blocks"])}

    def build(self, args):
        return es.presets.monarch(blocks=args["blocks"])

    def structure_label(self, args) -> str:
        return f"monarch(b={args['blocks']})"

    def columns(self, args):
        return {"blocks": args["blocks"]}

    def from_columns(self, row):
        return {"blocks": int(float(row["blocks"]))}

    def references(self):
        return ({"blocks": 4},)

    def cheap_points(self):
        return tuple({"blocks": b} for b in BLOCKS)


FAMILY = Monarch()
