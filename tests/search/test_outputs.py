"""trials.csv's rows from the storage: a TrialReader that skips unchanged level studies reads what a full read does."""

from __future__ import annotations

import optuna
import pytest

from search import optuna_api as oa
from search import outputs
from search.storage import open_storage


@pytest.fixture
def url(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return "sqlite:///" + str(tmp_path / "o.db")


def _same(reader, studies, other_studies):
    """The reader's trials are a full read's, trial for trial (number, state, value, attributes), also as another
    process (its own storage object) reads them."""

    def key(level_trials):
        return [
            (lv, [(t.number, t.state, t.value, t.user_attrs, t.system_attrs, t.params) for t in ts])
            for lv, ts in level_trials
        ]

    got = key(reader.read(studies))
    assert got == key(outputs.read_trials(studies)) == key(outputs.read_trials(other_studies))
    return got


def test_a_reader_sees_every_change_of_every_study_by_this_process_or_another(url):
    mine, theirs = open_storage(url), open_storage(url)  # two workers' storages on one database
    a = [(i, optuna.create_study(study_name=f"s.L{i}", storage=mine)) for i in range(2)]
    b = [(i, optuna.load_study(study_name=f"s.L{i}", storage=theirs)) for i in range(2)]
    reader = outputs.TrialReader(oa.engine(mine))
    _same(reader, a, b)  # empty studies
    a[0][1].enqueue_trial({"x": 1.0}, user_attrs={"reference": True})
    first = _same(reader, a, b)
    assert _same(reader, a, b) == first  # kept: nothing changed
    t = b[0][1].ask()  # the other worker pops the queued trial: no new trial, one WAITING fewer
    assert _same(reader, a, b)[0][1][0][1].name == "RUNNING"
    b[0][1].tell(t, 0.5)
    assert _same(reader, a, b)[0][1][0][1].name == "COMPLETE"
    u = b[1][1].ask()  # a RUNNING trial of the other level, whose attributes change without a new state
    u.suggest_float("x", 0, 1)
    _same(reader, a, b)
    oa.set_user_attr(b[1][1], oa.trial_id(u), "record", {"loss": 1.0})
    assert _same(reader, a, b)[1][1][0][3] == {"record": {"loss": 1.0}}
    b[1][1].tell(u, state=optuna.trial.TrialState.PRUNED)
    assert _same(reader, a, b)[1][1][0][1].name == "PRUNED"
    v = a[1][1].ask()  # this process's own trial
    a[1][1].tell(v, 2.0)
    assert [n for n, *_ in _same(reader, a, b)[1][1]] == [0, 1]


def test_a_reader_reads_only_the_studies_that_changed(url, monkeypatch):
    storage = open_storage(url)
    studies = [(i, optuna.create_study(study_name=f"s.L{i}", storage=storage)) for i in range(3)]
    for _, st in studies:
        st.tell(st.ask(), 1.0)
    reader = outputs.TrialReader(oa.engine(storage))
    reader.read(studies)
    reads = []
    real = optuna.Study.get_trials
    counted = lambda self, **kw: reads.append(self.study_name) or real(self, **kw)
    monkeypatch.setattr(optuna.Study, "get_trials", counted)
    reader.read(studies)
    assert reads == []
    monkeypatch.setattr(optuna.Study, "get_trials", real)
    studies[1][1].enqueue_trial({"x": 0.0})
    monkeypatch.setattr(optuna.Study, "get_trials", counted)
    reader.read(studies)
    assert reads == ["s.L1"]
