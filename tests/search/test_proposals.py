"""A seeded search over each built-in space proposes exactly the candidates recorded before the family registry.

tests/search/data/proposals.json was written by ``python -m tests.search._proposals`` on the code before the
search space became a registry of families; the same seed must still propose the same candidates (family,
structure, arguments, width), with the same Optuna parameters, the same exploration points and the same
cheapest-candidate set for the budget check.
"""

import json
from pathlib import Path

import pytest

from tests.search._proposals import SPACES, proposals

RECORD = json.loads((Path(__file__).parent / "data" / "proposals.json").read_text())


@pytest.mark.parametrize("name", SPACES)
def test_seeded_proposals_match_the_record(name):
    now = json.loads(json.dumps(proposals(name), sort_keys=True, default=str))
    want = RECORD[name]
    assert now["references"] == want["references"]
    assert now["reference_params"] == want["reference_params"]
    assert now["random"] == want["random"]
    assert now["cheapest_set"] == want["cheapest_set"]
    for i, (got, exp) in enumerate(zip(now["trials"], want["trials"])):
        assert got == exp, f"trial {i} of space {name}"
    assert len(now["trials"]) == len(want["trials"])
