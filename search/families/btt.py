"""The Block Tensor-Train family: integer bond rank r (THEORY 1), r from a fixed grid."""

from __future__ import annotations

import einstruct as es

from .base import Family

RANKS = (1, 2, 4)


class BTT(Family):
    name = "btt"
    label = group = "BTT"
    keys = legacy_columns = ("rank",)

    def suggest(self, trial):
        return {"rank": trial.suggest_categorical("rank", list(RANKS))}

    def params_for(self, args):
        return {"rank": args["rank"]}

    def random_params(self, rng):
        return {"rank": rng.choice(RANKS)}

    def normalize(self, args):
        return {"rank": int(args["rank"])}

    def build(self, args):
        return es.presets.btt(rank=args["rank"])

    def structure_label(self, args) -> str:
        return f"btt(r={args['rank']})"

    def columns(self, args):
        return {"rank": args["rank"]}

    def from_columns(self, row):
        return {"rank": int(float(row["rank"]))}

    def references(self):
        return ({"rank": 1},)

    def cheap_points(self):
        return tuple({"rank": r} for r in RANKS)


FAMILY = BTT()
