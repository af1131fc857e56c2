"""The error hierarchy: each site raises its own class, every class is an EinstructError and still a ValueError."""

import subprocess
import sys

import pytest
import torch
from torch import nn

import einstruct as es
from einstruct import limits
from search import tasks, train
from search.errors import DataError, SearchError, TrainingMemoryError

CLASSES = [es.SpecError, es.MemoryLimitError, es.MupError, SearchError, DataError, TrainingMemoryError]


@pytest.fixture
def tight(monkeypatch):
    def set_limit(n_bytes):
        monkeypatch.setattr(limits, "MAX_BYTES", n_bytes)

    return set_limit


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_error_is_an_einstruct_error_and_a_value_error(cls):
    assert issubclass(cls, es.EinstructError) and issubclass(cls, ValueError)


def test_the_classes_are_apart_and_exported():
    assert not issubclass(es.MemoryLimitError, es.SpecError) and not issubclass(es.MupError, es.SpecError)
    assert not issubclass(es.SpecError, es.MemoryLimitError) and not issubclass(SearchError, es.SpecError)
    assert issubclass(TrainingMemoryError, SearchError) and issubclass(TrainingMemoryError, es.MemoryLimitError)
    assert not issubclass(es.EinstructError, ValueError)  # the base leaves room for errors that are not values
    for name in ("EinstructError", "SpecError", "MemoryLimitError", "MupError"):
        assert name in es.__all__ and getattr(es, name).__module__ == "einstruct.errors"


def _raised(cls, fn, match):
    with pytest.raises(cls, match=match) as info:
        fn()
    assert isinstance(info.value, ValueError) and isinstance(info.value, es.EinstructError)
    assert "\n" not in str(info.value)
    return info.value


def test_spec_sites_raise_spec_error():
    e = _raised(es.SpecError, lambda: es.Spec("ab,bc->"), "has no axes")
    assert not isinstance(e, es.MemoryLimitError)
    spec = es.Spec("i,ir,ro->o", i="d_in", o="d_out", r="99999999999999999999999999999999*d^4")
    _raised(es.SpecError, lambda: es.compile(spec, 2**24), "more than any tensor can hold")  # on any device
    _raised(es.SpecError, lambda: es.StructuredLinear(64, 64, "nope"), "unknown preset")


def test_memory_sites_raise_memory_limit_error(tight):
    tight(10**5)  # 100 kB
    _raised(es.MemoryLimitError, lambda: es.StructuredLinear(512, 512, "dense"), "parameters of StructuredLinear")
    layer = es.StructuredLinear(64, 64, es.presets.btt(rank=4))
    _raised(es.MemoryLimitError, lambda: layer(torch.randn(512, 64)), "intermediates of the forward")
    tight(10**4)
    _raised(es.MemoryLimitError, lambda: layer.to_dense(), "dense matrix")


def test_structure_keeps_the_class_and_names_the_layer(tight):
    model = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 4))
    tight(10**5)
    e = _raised(es.MemoryLimitError, lambda: es.structure(model, "dense"), "cannot structure")
    assert "need" in str(e) and not isinstance(e, es.SpecError)
    tight(None)
    _raised(es.SpecError, lambda: es.structure(model, "nope"), "unknown preset")


def test_mup_sites_raise_mup_error():
    model = nn.Sequential(nn.Linear(8, 8))
    _raised(es.MupError, lambda: es.param_groups(model, lr=0), "lr must be a positive number")
    _raised(es.MupError, lambda: es.param_groups(model, lr=1e-3, optimizer="lion"), "optimizer 'lion'")
    _raised(es.MupError, lambda: es.param_groups(model, lr=1e-3, base="small"), "base must be an nn.Module")
    _raised(es.MupError, lambda: es.mup_init(model, zero_head="yes"), "zero_head must be True or False")


def test_a_task_model_too_large_to_train_is_a_training_memory_error(tight):
    task = tasks.get("regression", pool=256, eval_size=64, batch=8, teacher_width=16, teacher_depth=1)
    tight(10**5)
    e = _raised(TrainingMemoryError, lambda: task.build(None, 256, device="cpu"), "to train, more than the")
    assert isinstance(e, SearchError) and isinstance(e, es.MemoryLimitError)


@pytest.mark.parametrize(
    "error", [es.MemoryLimitError("a forward needs 1 TiB, more than the 2 GiB on cpu"), es.MupError("lr must be > 0")]
)
def test_search_train_reports_any_einstruct_error_in_one_line(monkeypatch, capsys, error):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(train, "run", fail)
    assert train.main(["--width", "64"]) == 2
    err = capsys.readouterr().err
    assert err == f"search.train: error: {error}\n"


def test_the_rules_and_errors_import_no_torch():
    code = (
        "import sys, einstruct as es; from einstruct import rules, errors; "
        "st = es.compile('btt', 256); st.symbolic(); rules.init_std(16, 16); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_parsing_sits_under_the_graph_layer():
    """einstruct/spec.py imports nothing of einstruct.network (nor a graph library), at any level."""
    import ast
    import pathlib

    tree = ast.parse(pathlib.Path(es.spec.__file__).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any("network" in n for n in names), names
    from einstruct.spec import floating_cores

    chain = es.Spec("a,ab,bc,cd->d", a=4, b=2, c=2, d=4)  # the middle core reaches x and y only through others
    assert floating_cores(chain) == []
    apart = es.Spec("i,i,o->o", i="d_in", o="d_out")  # x and y in different components: rank 1, not floating
    assert floating_cores(apart) == []
    with pytest.raises(es.SpecError, match="core G2 of 'a,ab,cd,cd->b' is joined to neither"):
        es.Spec("a,ab,cd,cd->b", a=4, b=4, c=2, d=2)
