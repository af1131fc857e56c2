"""MoE in the search: lm task settings and MoE candidates are counted at their real cost, the moe space."""

import random

import optuna
import pytest
import torch

import einstruct as es
from search import space, tasks, train
from search.errors import SearchError
from search.families import BUILTIN
from search.families import moe as moe_family

from .test_tasks import TINY_LM, counted_step_flops

MOE_SPECS = [
    es.MoEConfig(experts=8, active=2, dispatch="sparse"),
    es.MoEConfig(experts=4, active=2, dispatch="dense"),
    es.MoEConfig(experts=4, active=2, kind="ffn", dispatch="sparse"),
    es.MoEConfig(experts=4, active=2, dispatch="tiled"),
    es.MoEConfig(experts=4, active=2, kind="ffn", dispatch="tiled"),
    es.MoEConfig(experts=2, active=1, kind="ffn", dispatch="dense"),
]


@pytest.mark.parametrize("spec", MOE_SPECS, ids=lambda s: f"{s.label}-{s.dispatch}")
def test_lm_moe_candidates_flops_per_step_match_flop_counter(corpus, spec):
    task = tasks.get("lm", data=corpus, **TINY_LM)
    model = task.build(spec, 64)
    assert any(isinstance(m, (es.BTTMoE, es.MoE)) for m in model.modules())
    assert task.flops_per_step(model) == counted_step_flops(task, model)


@pytest.mark.parametrize(
    "setting, spec, kind",
    [
        ("ffn", es.presets.btt(rank=1), es.MoE),
        ("ffn", None, es.MoE),
        ("btt", "btt", es.BTTMoE),
    ],
)
def test_lm_moe_task_setting(corpus, setting, spec, kind):
    task = tasks.get("lm", data=corpus, moe=setting, experts=4, active=2, **TINY_LM)
    model = task.build(spec, 64)
    layers = [m for m in model.modules() if isinstance(m, (es.BTTMoE, es.MoE))]
    assert layers and all(isinstance(m, kind) and m.num_experts == 4 and m.dispatch == "sparse" for m in layers)
    assert task.flops_per_step(model) == counted_step_flops(task, model)
    if setting == "ffn" and spec is not None:  # the candidate's structure reaches the experts, not the routers
        assert isinstance(layers[0].experts[0].fc, es.StructuredLinear)
        assert isinstance(layers[0].router, torch.nn.Linear)
    groups = task.param_groups(model, 1e-3)  # muP groups against a base with the same MoE
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)


def test_lm_btt_setting_leaves_other_structures_alone(corpus):
    task = tasks.get("lm", data=corpus, moe="btt", **TINY_LM)
    assert not any(isinstance(m, es.BTTMoE) for m in task.build(es.presets.kron(), 64).modules())
    assert not any(isinstance(m, es.BTTMoE) for m in task.build(None, 64).modules())


def test_sparse_moe_costs_less_per_step_than_dense_dispatch(corpus):
    task = tasks.get("lm", data=corpus, **TINY_LM)
    model = task.build(es.MoEConfig(8, 2, dispatch="sparse"), 64, device="meta")
    sparse = task.flops_per_step(model)
    dense = task.flops_per_step(task.build(es.MoEConfig(8, 2, dispatch="dense"), 64, device="meta"))
    rank8 = task.flops_per_step(task.build(es.presets.btt(rank=8), 64, device="meta"))
    rows, layers = task.rows_per_step(), [m for m in model.modules() if isinstance(m, es.BTTMoE)]
    assert len(layers) == 6 * TINY_LM["depth"]  # q, k, v, o, fc, proj; not the head
    # dense dispatch = the rank-8 BTT plus the routers; sparse skips 6 of the 8 experts per token
    assert dense - rank8 == sum(3 * 2 * rows * m.in_features * 8 for m in layers)
    assert dense - sparse == sum(3 * rows * 6 * m.expert_flops_per_token() for m in layers)


def test_lm_moe_trains_and_adds_the_balancing_loss(corpus):
    task = tasks.get("lm", data=corpus, context=32, batch=4, depth=1, d_head=32)
    spec = es.MoEConfig(experts=4, active=2, dispatch="sparse")
    model = task.build(spec, 64)
    batch = task.batch(0, torch.Generator().manual_seed(0), "cpu")
    model.eval()
    plain = task.loss(model, batch)
    model.train()
    with_aux = task.loss(model, batch)
    assert with_aux.item() == pytest.approx(plain.item() + es.AUX_WEIGHT * es.moe_aux_loss(model).item(), rel=1e-5)
    per_step = task.flops_per_step(model)
    r = train.run(task, spec, width=64, train_flops=5 * per_step, seed=0, evals=1, device="cpu")
    assert r.steps == 5 and r.train_flops == 5 * per_step and r.loss == r.loss
    assert r.spec == "btt_moe(E=4,k=2)"


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(moe="sparse"), "moe='sparse' is not known"),
        (dict(moe="btt", experts=2, active=3), "active=3 is more than experts=2"),
        (dict(moe="ffn", moe_dispatch="auto"), "dispatch 'auto' is not known"),
    ],
)
def test_lm_bad_moe_settings(corpus, bad, match):
    with pytest.raises(SearchError, match=match):
        tasks.get("lm", data=corpus, **bad)


def test_ffn_moe_on_a_task_without_it_is_a_search_error():
    task = tasks.get("regression", pool=256, eval_size=64, batch=16, teacher_width=16, teacher_depth=2)
    with pytest.raises(SearchError, match="no standard-MoE"):
        task.build(es.MoEConfig(kind="ffn"), 64)
    model = task.build(es.MoEConfig(experts=4, active=2, dispatch="sparse"), 64)  # BTT-MoE works anywhere
    assert sum(isinstance(m, es.BTTMoE) for m in model.modules()) > 0


def test_moe_space_samples_and_round_trips_moe_candidates():
    sp = space.make_space("moe", (64, 128))
    assert set(sp.families) == {"dense", "btt", "btt_moe", "moe"}
    assert "btt_moe" not in space.make_space("full", (64,)).families  # opt-in
    refs = space.references(sp)
    assert {r.label for r in refs} >= {"btt_moe(E=8,k=2)", "moe(E=8,k=2)", "dense"}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    rng = random.Random(0)
    seen = set()
    for _ in range(30):
        study.enqueue_trial(sp.random_params(rng))
        trial = study.ask()
        cand = sp.suggest(trial)
        study.tell(trial, 0.0)
        seen.add(cand.family)
        if cand.family in ("btt_moe", "moe"):
            experts, active = cand.arguments["experts"], cand.arguments["active"]
            assert experts in moe_family.EXPERTS and 1 <= active <= experts
            spec = cand.spec()
            assert isinstance(spec, es.MoEConfig) and spec.dispatch == "tiled"  # no host read in the step
            assert spec.kind == ("btt" if cand.family == "btt_moe" else "ffn")
            row = {**cand.columns(), "width": cand.width}
            assert space.Candidate.from_row({k: str(v) for k, v in row.items()}) == cand
            legacy = {k: str(v) for k, v in row.items() if k != "family_params"}  # a row from before the column
            assert space.Candidate.from_row(legacy) == cand
            study2 = optuna.create_study()
            study2.enqueue_trial(sp.params_for(cand))
            assert sp.suggest(study2.ask()) == cand
    assert seen >= {"btt_moe", "moe"}


def test_moe_candidate_structure_spec_for_tables():
    cand = space.Candidate.of(BUILTIN["btt_moe"], 128, {"experts": 16, "active": 2})
    st = es.compile(cand.structure_spec(), 128)
    assert st.sizes["r"] == 16  # the weights are a rank-16 BTT
    rebuilt = space.Candidate.from_row({"family": "moe", "width": "64", "experts": "", "active": ""})
    assert rebuilt.arguments == {"experts": moe_family.DEFAULT_EXPERTS, "active": moe_family.DEFAULT_ACTIVE}
