"""The planner's per-device cost table: CPU plans unchanged, the table chosen by the layer's device, calibration.

``data/cpu_plans.json`` holds, per structure, size and route (cost-model or plain forms), the cost, the matmul
forms and a digest of the whole layout as the planner gave them before its costs became a table (commit
d79bde3, constants in einstruct/layers/layout.py): the built-in 'cpu' table must give the same plans.
Regenerate it only on purpose, for a planner change that is meant to change CPU plans:
``python -m tests.layers.test_cost_table --write``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import einstruct as es
from einstruct.layers.layout import plan_chain

P = es.presets
PLANS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "cpu_plans.json")
STRUCTURES = {  # the layer tests' presets and the benchmark table's structures
    "dense": P.dense,
    "low_rank1": lambda: P.low_rank(rank=1),
    "low_rank3": lambda: P.low_rank(rank=3),
    "low_rank64": lambda: P.low_rank(rank=64),
    "kron": P.kron,
    "tt2": lambda: P.tt(rank=2),
    "tt4": lambda: P.tt(rank=4),
    "btt1": lambda: P.btt(rank=1),
    "btt2": lambda: P.btt(rank=2),
    "btt3": lambda: P.btt(rank=3),
    "btt4": lambda: P.btt(rank=4),
    "monarch2": lambda: P.monarch(blocks=2),
    "monarch4": lambda: P.monarch(blocks=4),
    "monarch16": lambda: P.monarch(blocks=16),
    "block_diag4": lambda: P.block_diag(blocks=4),
    "theta_A": lambda: es.theta(0.5, 0.25, 0.25, 0.25, 0.5, 0.25, 0.25),
    "theta_B": lambda: es.theta(0.75, 0, 0.25, 0, 0.75, 0.25, 0.25),
}
SIZES = [(64, 64), (144, 36), (256, 256), (1000, 500), (1024, 512), (1024, 1024), (4096, 4096), (8192, 8192)]


def _form(s) -> str:
    return ("t" if s.act_kr else "p") + ("t" if s.core_left else "p")


def describe(chain) -> dict:
    """What the planner chose: its cost, the forms, and a digest of every field of the layout."""
    whole = repr((chain.steps, chain.in_shape, chain.final_perm, chain.fuse_bias, chain.cost))
    return {
        "cost": chain.cost,
        "forms": ",".join(_form(s) for s in chain.steps),
        "digest": hashlib.sha256(whole.encode()).hexdigest()[:16],
    }


def current_plans(**kw) -> dict:
    out = {}
    for name, make in STRUCTURES.items():
        for d_in, d_out in SIZES:
            try:
                st = es.compile(make(), d_in, d_out)
            except es.SpecError:  # a size this structure cannot split into (e.g. theta at 144 x 36)
                continue
            for plain in (False, True):
                out[f"{name} {d_in}x{d_out}{' plain' if plain else ''}"] = describe(plan_chain(st, plain=plain, **kw))
    return out


def test_builtin_cpu_table_gives_the_plans_of_before():
    with open(PLANS) as f:
        before = json.load(f)
    now = current_plans()
    assert len(now) > 200 and any(v["forms"] != "pp" and "plain" not in k for k, v in now.items())
    assert now == before


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    with open(PLANS, "w") as f:
        json.dump(current_plans(), f, indent=0, sort_keys=True)
        f.write("\n")
