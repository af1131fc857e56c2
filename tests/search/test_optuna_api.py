"""Each of Optuna's internals that search.optuna_api relies on, exercised against the installed Optuna, which must be
the version the module was checked against: an upgrade fails here first, naming what to re-check."""

from __future__ import annotations

import contextlib

import optuna
import pytest
import sqlalchemy as sa
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from search import optuna_api as oa
from search.loop import make_sampler
from search.storage import open_storage


def test_the_installed_optuna_is_the_version_the_internals_were_checked_against():
    assert optuna.__version__ == oa.TESTED_VERSION, (
        f"Optuna {optuna.__version__} is installed, but search/optuna_api.py was checked against "
        f"{oa.TESTED_VERSION}: run tests/search/test_optuna_api.py, fix what fails, then set TESTED_VERSION"
    )


@pytest.fixture
def storage(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return open_storage("sqlite:///" + str(tmp_path / "o.db"))


def test_trial_ids_are_unique_across_the_studies_of_a_storage_and_name_the_stored_trial(storage):
    a = optuna.create_study(study_name="s.L0", storage=storage)
    b = optuna.create_study(study_name="s.L1", storage=storage)
    ta, tb = a.ask(), b.ask()
    assert ta.number == tb.number == 0 and oa.trial_id(ta) != oa.trial_id(tb)
    (frozen,) = a.get_trials(deepcopy=False)
    assert oa.trial_id(frozen) == oa.trial_id(ta)
    assert oa.get_trial(a, oa.trial_id(tb)).number == 0 and oa.get_trial(b, oa.trial_id(tb)).state == TrialState.RUNNING


def test_attributes_are_written_by_trial_id_and_a_finished_trial_refuses_them(storage):
    st = optuna.create_study(study_name="s.L0", storage=storage)
    t = st.ask()
    tid = oa.trial_id(t)
    oa.set_system_attr(st, tid, "einstruct_owner", "w1")
    oa.set_user_attr(st, tid, "record", {"loss": 0.5})
    got = oa.get_trial(st, tid)
    assert got.system_attrs["einstruct_owner"] == "w1" and got.user_attrs["record"] == {"loss": 0.5}
    st.tell(t.number, 1.0)
    with pytest.raises(UpdateFinishedTrialError):  # what search.recovery.set_attrs reads as "finished elsewhere"
        oa.set_user_attr(st, tid, "record", {})


def test_queued_params_are_where_enqueue_trial_keeps_them(storage):
    st = optuna.create_study(study_name="s.L0", storage=storage)
    st.enqueue_trial({"width": 64, "family": "btt"}, user_attrs={"reference": True})
    (waiting,) = st.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert oa.queued_params(waiting) == {"width": 64, "family": "btt"}
    t = st.ask()
    t.suggest_categorical("width", [32, 64])
    assert oa.queued_params(oa.get_trial(st, oa.trial_id(t))) == {"width": 64, "family": "btt"}
    st.tell(t.number, 1.0)
    proposed = st.ask()
    assert oa.queued_params(oa.get_trial(st, oa.trial_id(proposed))) is None


def test_the_engine_and_the_studies_table_are_the_storages(storage):
    engine = oa.engine(storage)
    assert isinstance(engine, sa.engine.Engine)
    optuna.create_study(study_name="my_s.L0", storage=storage)
    tables = set(sa.inspect(engine).get_table_names())
    with engine.connect() as c:
        assert oa.has_studies(c, tables, "my_s.L")
        assert not oa.has_studies(c, tables, "myxs.L")  # '_' is a character, not a LIKE wildcard
        assert not oa.has_studies(c, tables, "my_s.L1")
        assert not oa.has_studies(c, set(), "my_s.L")  # Optuna's tables are not there: nothing is read


def test_trial_marks_count_each_studys_trials_by_state_and_a_finished_trial_refuses_every_write(storage):
    a = optuna.create_study(study_name="s.L0", storage=storage)
    b = optuna.create_study(study_name="s.L1", storage=storage)
    assert oa.study_id(a) != oa.study_id(b) and storage.get_study_id_from_name("s.L1") == oa.study_id(b)
    ids = [oa.study_id(a), oa.study_id(b)]
    assert oa.trial_marks(oa.engine(storage), ids) == {i: () for i in ids}
    a.enqueue_trial({"x": 1.0})
    t = a.ask()
    u = a.ask()
    a.tell(u, 1.0)
    marks = oa.trial_marks(oa.engine(storage), [oa.study_id(a)])
    assert marks == {oa.study_id(a): (("COMPLETE", 1, oa.trial_id(u)), ("RUNNING", 1, oa.trial_id(t)))}
    a.tell(t, state=TrialState.PRUNED)
    for write in (
        lambda: oa.set_system_attr(a, oa.trial_id(t), "k", 1),
        lambda: oa.set_user_attr(a, oa.trial_id(t), "k", 1),
        lambda: a.tell(t.number, 2.0),
    ):
        with pytest.raises((UpdateFinishedTrialError, ValueError)):
            write()


def _propose(study, params: int, reads: list, shared: bool) -> list:
    """Ask one trial and suggest ``params`` floats, inside one_sampling_read when ``shared``; counts storage reads."""
    real = study._storage.get_all_trials

    def counting(*a, **k):
        reads.append(1)
        return real(*a, **k)

    study._storage.get_all_trials = counting
    try:
        with oa.one_sampling_read(study) if shared else contextlib.nullcontext():
            trial = study.ask()
            values = [trial.suggest_float(f"x{i}", 0.0, 1.0) for i in range(params)]
    finally:
        del study._storage.get_all_trials
    return trial, values


def test_one_sampling_read_gives_tpe_with_a_liar_one_read_per_ask_and_the_same_proposals(storage, tmp_path):
    """The search's TPE (constant_liar=True) reads the study at each suggestion; inside
    one_sampling_read an ask and its suggestions read it once besides ask's queue read, and propose the same values
    (another worker's running trial is still seen: the liar)."""
    other = open_storage("sqlite:///" + str(tmp_path / "p.db"))
    runs = {}
    for shared, store in ((False, storage), (True, other)):
        sampler = make_sampler("tpe", 3)  # the search's: multivariate, grouped, with the liar
        study = optuna.create_study(study_name="s.L0", storage=store, sampler=sampler)
        reads, proposals = [], []
        for n in range(14):
            if n == 12:  # a trial another worker is running
                running = study.ask()
                running.suggest_float("x0", 0.0, 0.01)
                running.suggest_float("x1", 0.0, 0.01)
                running.suggest_float("x2", 0.0, 0.01)
            per = []
            trial, values = _propose(study, 3, per, shared)
            reads.append(len(per))
            proposals.append(values)
            study.tell(trial, sum((v - 0.3) ** 2 for v in values))
        assert not hasattr(study, "__dict__") or "_get_trials" not in study.__dict__  # the method is Study's again
        runs[shared] = reads, proposals
    assert runs[True][1] == runs[False][1]
    assert max(runs[True][0]) <= 2 < min(runs[False][0][11:])  # after the startup trials TPE reads per suggestion


def test_no_other_module_of_the_search_reaches_into_optuna():
    import os
    import re

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    private = re.compile(
        r"\._trial_id\b|\._storage\b|fixed_params|\b(?!self\b|optuna_api\b)\w+\.engine\b|\boptuna\.[\w.]*\._\w+"
    )
    found = []
    for folder, _, names in os.walk(os.path.join(root, "search")):
        for n in names:
            path = os.path.join(folder, n)
            if n.endswith(".py") and os.path.abspath(path) != os.path.abspath(oa.__file__):
                text = open(path).read()
                found += [f"{os.path.relpath(path, root)}: {m.group(0)}" for m in private.finditer(text)]
    assert not found, found
