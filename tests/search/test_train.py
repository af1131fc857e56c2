"""Budgeted training: never over the allowance, deterministic, divergence ends with a reason."""

import math

import pytest

import einstruct as es
from search import tasks, train
from search.errors import SearchError

from .test_tasks import TINY_REGRESSION


@pytest.fixture(scope="module")
def task():
    return tasks.get("regression", **TINY_REGRESSION)


@pytest.mark.parametrize(
    "spec", [None, es.presets.btt(rank=1), es.presets.low_rank(rank=2)], ids=lambda s: getattr(s, "label", "dense")
)
def test_training_spends_at_most_its_allowance_and_as_much_as_fits(task, spec):
    _, per_step = train.plan(task, spec, 64, 1.0)
    allowance = 40.5 * per_step
    r = train.run(task, spec, width=64, train_flops=allowance, seed=0)
    assert train.plan(task, spec, 64, allowance) == (40, per_step)
    assert r.train_flops <= allowance < r.train_flops + r.flops_per_step
    assert (r.steps, r.flops_per_step) == (40, per_step)
    assert r.train_flops == r.steps * r.flops_per_step
    assert r.curve[-1][0] == r.train_flops and math.isfinite(r.loss) and r.loss == r.curve[-1][1]
    assert r.curve[0][1] > r.curve[-1][1]  # it learns


def test_same_seed_same_curve_other_seed_other_curve(task):
    spec = es.presets.btt(rank=1)
    a = train.run(task, spec, width=64, train_flops=1e8, seed=1)
    b = train.run(task, spec, width=64, train_flops=1e8, seed=1)
    c = train.run(task, spec, width=64, train_flops=1e8, seed=2)
    assert a.curve == b.curve and a.train_curve == b.train_curve
    assert a.curve != c.curve


def test_absurd_learning_rate_ends_with_a_reason_not_an_exception(task):
    r = train.run(task, es.presets.btt(rank=1), width=64, train_flops=3e8, seed=0, lr=1e4, warmup=1)
    assert r.diverged and r.reason and math.isnan(r.loss)
    assert r.train_flops < 3e8


def test_cosine_schedule_and_callback(task):
    seen = []
    r = train.run(task, None, width=64, train_flops=1e8, seed=0, schedule="cosine", callback=seen.append)
    assert seen and seen[-1]["step"] == r.steps and seen[-1]["train_flops"] == r.train_flops
    assert train.lr_factor(r.steps - 1, r.steps, 1, "cosine") < 0.01
    assert train.lr_factor(0, 100, 10, "constant") == pytest.approx(0.1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(train_flops=10.0), "less than one step"),
        (dict(train_flops=-1), "positive number"),
        (dict(train_flops=1e8, schedule="linear"), "schedule"),
        (dict(train_flops=1e8, lr=0), "lr must be"),
        (dict(train_flops=1e8, device="tpu"), "unknown device"),
        (dict(train_flops=1e8, width=0), "width must be"),
    ],
)
def test_bad_training_settings(task, kwargs, match):
    kwargs = {"width": 64, **kwargs}
    with pytest.raises(SearchError, match=match):
        train.run(task, es.presets.btt(rank=1), seed=0, **kwargs)
