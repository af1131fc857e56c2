"""The standard MoE family (THEORY 6): each MLP is E dense FFNs, k active per token, tiled dispatch (tasks with
such a model, i.e. lm). Also the MoE family class that btt_moe shares.

Both MoE families run the tiled dispatch (es.BTTMoE's module docstring): the sparse grouping per expert with
fixed shapes, so the training step reads nothing back to the host (the sparse dispatch syncs once per layer
on a GPU); a candidate is charged the rows it runs, its active experts' plus the tiles' padding (fewer than
tokens x active / 8 + E rows more)."""

from __future__ import annotations

import einstruct as es

from .base import Family

EXPERTS = (4, 8, 16)
DISPATCH = "tiled"  # es.MoEConfig's dispatch for every MoE candidate
ACTIVE = (2, 4)  # active=1 gives gate 1: the router would learn from the balancing loss only
DEFAULT_EXPERTS, DEFAULT_ACTIVE = 8, 2  # the references, and a row that lacks the columns


class MoEFamily(Family):
    """(experts, active) from fixed grids; ``kind`` is es.MoEConfig's: 'btt' (BTT-MoE) or 'ffn'."""

    keys = legacy_columns = ("experts", "active")

    def __init__(self, name: str, label: str, kind: str):
        self.name, self.label, self.group, self.kind = name, label, label, kind

    def suggest(self, trial):
        experts = trial.suggest_categorical("experts", list(EXPERTS))
        active = trial.suggest_categorical("active", list(ACTIVE))
        return {"experts": experts, "active": min(active, experts)}

    def params_for(self, args):
        return {"experts": args["experts"], "active": args["active"]}

    def random_params(self, rng):
        return {"experts": rng.choice(EXPERTS), "active": rng.choice(ACTIVE)}

    def normalize(self, args):
        return {
            "experts": int(args.get("experts") or DEFAULT_EXPERTS),
            "active": int(args.get("active") or DEFAULT_ACTIVE),
        }

    def build(self, args):
        return es.MoEConfig(experts=args["experts"], active=args["active"], dispatch=DISPATCH, kind=self.kind)

    def structure_label(self, args) -> str:
        return f"{self.name}(E={args['experts']},k={args['active']})"

    def columns(self, args):
        return dict(args)

    def from_columns(self, row):
        num = lambda k: int(float(row.get(k) or 0)) or None
        return {"experts": num("experts"), "active": num("active")}

    def references(self):
        return ({"experts": DEFAULT_EXPERTS, "active": DEFAULT_ACTIVE},)

    def cheap_points(self):
        return tuple({"experts": e, "active": min(a, e)} for e in EXPERTS for a in ACTIVE)


FAMILY = MoEFamily("moe", "MoE", kind="ffn")
