"""StructureConfig: JSON round trip, es.structure(model, config) equal to the keyword call, clear errors;
and the structure record every structured model carries."""

import json
import re

import pytest
import torch
from torch import nn

import einstruct as es
from einstruct.config import spec_from_dict, spec_to_dict
from einstruct.layers.record import model_record


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


CONFIGS = [
    es.StructureConfig(),
    es.StructureConfig(spec="btt", spec_args={"rank": 2}, select="all", normalize=True),
    es.StructureConfig(spec=es.theta(0.5, 0, 0.5, 0, 0.5, 0.5, 0), select=re.compile(r"[02]"), init="project"),
    es.StructureConfig(spec=es.Spec("i,A:ir,B:ro->o", i="d_in", o="d_out", r=3), select=["0", "4"]),
    es.StructureConfig(spec="btt", moe=dict(experts=4, active=2, dispatch="sparse"), layer_options={"zero_init": True}),
    es.StructureConfig(
        spec="low_rank", spec_args={"rank": 4}, layer_options={"low_rank_init": True, "pad_tolerance": 0.3}
    ),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=range(len(CONFIGS)))
def test_config_json_round_trip(cfg):
    text = cfg.to_json()
    json.loads(text)  # plain JSON
    back = es.StructureConfig.from_json(text)
    assert back == cfg
    assert back.resolved_spec() == cfg.resolved_spec()
    assert back.to_json() == text


@pytest.mark.parametrize(
    "spec", [es.presets.btt(rank=3), es.theta(0.5, 0.25, 0.25, 0.25, 0.5, 0.25, 0.25), es.presets.kron()]
)
def test_spec_dict_round_trip_keeps_label_theta_and_sizes(spec):
    back = spec_from_dict(json.loads(json.dumps(spec_to_dict(spec))))
    assert back == spec and back.label == spec.label and back.theta == spec.theta


@pytest.mark.parametrize("cfg", CONFIGS, ids=range(len(CONFIGS)))
def test_structure_with_a_config_equals_the_keyword_call(cfg):
    a, b = mlp(), mlp()
    es.structure(a, cfg)
    kw = cfg.structure_kwargs()
    torch.manual_seed(1)
    es.structure(b, cfg.resolved_spec(), **kw)
    assert [type(m).__name__ for m in a.modules()] == [type(m).__name__ for m in b.modules()]
    assert model_record(a) == model_record(b)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


def test_config_errors_name_the_problem():
    with pytest.raises(es.SpecError, match="unknown preset 'bt'"):
        es.StructureConfig(spec="bt")
    with pytest.raises(es.SpecError, match="spec_args are a preset's arguments"):
        es.StructureConfig(spec=es.presets.btt(), spec_args={"rank": 2})
    with pytest.raises(es.SpecError, match="init must be 'mup'"):
        es.StructureConfig(init="svd")
    with pytest.raises(es.SpecError, match="callable select cannot be written to JSON"):
        es.StructureConfig(select=lambda n, m: True).to_json()
    with pytest.raises(es.SpecError, match="unknown field 'rank'"):
        es.StructureConfig.from_dict({"rank": 2})
    with pytest.raises(es.SpecError, match="format_version 99"):
        es.StructureConfig.from_dict({"format_version": 99})
    with pytest.raises(es.SpecError, match="takes every setting from the StructureConfig; got select"):
        es.structure(mlp(), es.StructureConfig(), select="all")


def test_record_names_each_layer_a_callable_chose_with_its_resolved_spec():
    model = mlp()
    pick = lambda name, m: es.presets.low_rank(rank=2) if name == "2" else name == "0"
    es.structure(model, "btt", select=pick, normalize=True)
    rec = model_record(model)
    assert rec["format_version"] == 1
    assert list(rec["layers"]) == ["0", "2"]
    e0, e2 = rec["layers"]["0"], rec["layers"]["2"]
    assert e0["module"] == "StructuredLinear" and e0["replaced"] == "Linear" and e0["bias"] is True
    assert spec_from_dict(e0["spec"]) == es.presets.btt()
    assert e0["resolved"] == {"einsum": model[0].structure.spec.einsum, "sizes": dict(model[0].structure.sizes)}
    assert e0["options"] == {"normalize": True}
    assert spec_from_dict(e2["spec"]) == es.presets.low_rank(rank=2)
    json.dumps(rec)


def test_record_of_a_submodule_gets_qualified_names_and_accumulates():
    outer = nn.Sequential(mlp(), nn.Linear(10, 10))
    es.structure(outer[0], "btt", select="0")
    es.structure(outer, "low_rank", select="0.2")
    assert list(model_record(outer)["layers"]) == ["0.0", "0.2"]
    outer[0][0] = nn.Linear(64, 64)  # swapped by hand: the record no longer describes the model
    with pytest.raises(es.SpecError, match=r"names '0\.0' as a StructuredLinear, but the model has Linear"):
        model_record(outer)
