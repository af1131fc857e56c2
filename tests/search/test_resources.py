"""Inputs that would take all the memory are refused, with one line and exit code 2, before anything is built.

CIFAR batch files are checked for their size and their rows (at most 10,000, 50,000 for CIFAR-100's train,
of 3,072 values) before any array is made, also under a 4 GB address-space limit (as `ulimit -v 4000000`);
a model is checked as a whole (embeddings and head included) against the memory it may use before it is
built; a token file's vocabulary is costed, and a vocabulary far larger than the tokens in use is warned of.
"""

import logging
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from search import tasks
from search.errors import DataError, SearchError

from .conftest import write_cifar

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIMIT = 4_000_000 * 1024  # ulimit -v 4000000 (KiB)


def limited(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter whose address space is limited to 4 GB."""
    head = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, ({LIMIT}, resource.getrlimit(resource.RLIMIT_AS)[1]))
    """)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    env.pop("EINSTRUCT_STORAGE", None)
    return subprocess.run(
        [sys.executable, "-c", head + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )


def one_line(p: subprocess.CompletedProcess, needle: str) -> str:
    err = p.stderr.strip()
    assert p.returncode == 2, (p.returncode, err[-2000:])
    assert len(err.splitlines()) == 1 and "Traceback" not in err and needle in err, err[-2000:]
    return err


def _dump(path, obj, protocol=2):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


# ---- CIFAR ---------------------------------------------------------------------------------------


def test_a_memoised_cifar_pickle_is_refused_under_a_4gb_limit(tmp_path):
    """1.6 MB on disk, 400,000 references to one row: 1.2 GB as uint8, 20 GB on the way there."""
    row = list(range(256)) * 12
    for name in ("data_batch_1", "test_batch"):
        _dump(tmp_path / name, {b"data": [row] * 400_000, b"labels": [0] * 400_000})
    assert os.path.getsize(tmp_path / "data_batch_1") < 2_000_000
    p = limited(f"""
        from search import run
        sys.exit(run.main(["--task", "cifar", "--data", {str(tmp_path)!r}, "--dry-run", "--no-progress",
                           "--out", {str(tmp_path / "out")!r}]))
    """)
    one_line(p, "holds 400,000 images; a CIFAR batch file holds at most 10,000")


ROWS_CASES = [
    (lambda row: [bytes(row)] * 20_000, "holds 20,000 images"),  # rows as bytes, memoised
    (lambda row: np.zeros((10_001, 3072), np.uint8), "holds 10,001 images"),
    (lambda row: [[row] * 3072] * 10, "row 0 holds a value that is not an integer"),  # 3072 x 3072 behind one row
    (lambda row: [row[:3071]] * 10, "row 0 is a list of length 3071"),
    (lambda row: [[0] * 3071 + [[0] * 10**6]] * 10, "not an integer"),  # a huge list as one value
    (lambda row: np.zeros((10, 3072), object), "an array of object"),
    (lambda row: np.full((10, 3072), 300, np.int64), "outside 0..255"),
]


@pytest.mark.parametrize("data, needle", ROWS_CASES, ids=[f"case{i}" for i in range(len(ROWS_CASES))])
def test_cifar_rows_are_checked_before_any_array_is_built(tmp_path, data, needle):
    write_cifar(tmp_path, n_train=64, n_test=16)
    _dump(tmp_path / "data_batch_1", {b"data": data(list(range(256)) * 12), b"labels": [0] * 10})
    with pytest.raises(DataError, match=needle):
        tasks.get("cifar", data=str(tmp_path), batch=8)


def test_cifar_100_train_may_hold_50000_rows_and_no_more(tmp_path):
    from search.tasks.cifar import ROWS, ROWS_TRAIN_100, _pixels

    assert (ROWS, ROWS_TRAIN_100) == (10_000, 50_000)
    big = np.zeros((50_001, 1), np.uint8)  # shape is checked before rows: a cheap stand-in of the wrong width
    with pytest.raises(DataError, match="shape"):
        _pixels(str(tmp_path / "train"), big)
    rows = [b"\x00" * 3072] * 50_001
    with pytest.raises(DataError, match="holds 50,001 images"):
        _pixels(str(tmp_path / "train"), rows)
    assert _pixels(str(tmp_path / "train"), rows[:50_000]).shape == (50_000, 3072)
    with pytest.raises(DataError, match="holds 10,001 images"):
        _pixels(str(tmp_path / "test"), rows[:10_001])


def test_an_oversized_file_and_a_lying_length_are_refused_unread(tmp_path):
    write_cifar(tmp_path, n_train=64, n_test=16)
    with open(tmp_path / "data_batch_2", "wb") as f:  # sparse: 400 MB that take no disk
        f.truncate(400 * 2**20)
    with pytest.raises(DataError, match="more than a CIFAR batch file can be"):
        tasks.get("cifar", data=str(tmp_path), batch=8)
    os.remove(tmp_path / "data_batch_2")
    # protocol 4's BINBYTES8 with a length of 2^40: the unpickler allocates that before reading
    (tmp_path / "data_batch_1").write_bytes(b"\x80\x04\x8e" + (2**40).to_bytes(8, "little") + b"x" * 64)
    with pytest.raises(DataError, match="not a CIFAR python pickle"):
        tasks.get("cifar", data=str(tmp_path), batch=8)


def test_a_real_sized_cifar_folder_loads_under_a_4gb_limit(tmp_path):
    """10,000 training and 10,000 test images as lists of bytes rows and as arrays: accepted, in little memory."""
    rng = np.random.default_rng(0)
    for name in ("data_batch_1", "test_batch"):
        x = rng.integers(0, 256, (10_000, 3072), dtype=np.uint8)
        _dump(
            tmp_path / name,
            {
                b"data": x if name == "test_batch" else [r.tobytes() for r in x],
                b"labels": rng.integers(0, 10, 10_000).tolist(),
            },
        )
    p = limited(f"""
        from search import tasks
        t = tasks.get("cifar", data={str(tmp_path)!r})
        print(tuple(t.train_x.shape), tuple(t.val_x.shape), t.train_x.dtype)
    """)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split("\n")[0] == "(10000, 3072) (2000, 3072) torch.float32"


# ---- a whole model's memory --------------------------------------------------------------------


def test_a_model_that_cannot_fit_is_refused_before_it_is_built():
    """Every layer is within es's limits, the whole regression model is not (8 GiB of activations and weights)."""
    p = limited("""
        from search import train
        sys.exit(train.main(["--spec", "low_rank", "--width", "1000000"]))
    """)
    one_line(p, "the regression model at width 1000000 has")
    assert "to train, more than the" in p.stderr and "this process may use" in p.stderr


def test_a_width_beyond_any_layer_is_one_line_quickly():
    p = limited("""
        from search import train
        sys.exit(train.main(["--spec", "low_rank", "--width", "300000000"]))
    """)
    one_line(p, "out of range")


@pytest.fixture
def sparse_bin(tmp_path):
    """8 KB of tokens below 200, and one token 65535: a vocabulary of 65,536 for 201 distinct tokens."""
    t = np.random.default_rng(0).integers(0, 200, 4096).astype(np.uint16)
    t[100] = 65535
    path = tmp_path / "tokens.bin"
    t.tofile(path)
    return str(path), len(np.unique(t))


def test_the_vocabulary_is_costed_and_refused_when_it_cannot_fit(sparse_bin, monkeypatch):
    from einstruct import limits

    path, distinct = sparse_bin
    task = tasks.get("lm", data=path)
    assert (task.vocab, task.distinct) == (65536, distinct)
    meta = task.build(None, 64, device="meta")
    params = sum(p.numel() for p in meta.parameters())
    assert params > 2 * 65536 * 64  # embedding and head
    rows = task.rows_per_step()
    assert task.training_bytes(meta) >= 16 * params + 3 * rows * 65536 * 4  # logits, log-softmax, gradient
    monkeypatch.setattr(limits, "MAX_BYTES", 2 * 2**30)
    with pytest.raises(SearchError, match="vocabulary of 65,536"):
        task.build(None, 64, device="cpu")
    small = tasks.get("lm", data=path, batch=2)  # 256 rows a step: the same vocabulary fits
    assert isinstance(small.build(None, 64, device="cpu"), torch.nn.Module)


def test_a_vocabulary_far_larger_than_the_tokens_in_use_is_warned_of(sparse_bin, corpus, tmp_path, caplog):
    path, distinct = sparse_bin
    with caplog.at_level(logging.WARNING, logger="search.tasks.lm"):
        tasks.get("lm", data=path)
    assert f"holds {distinct:,} distinct tokens" in caplog.text and "vocabulary of 65,536" in caplog.text
    assert "renumber the tokens" in caplog.text
    caplog.clear()
    dense = tmp_path / "dense.bin"
    np.arange(4096, dtype=np.uint16).tofile(dense)  # every id up to the largest is used
    with caplog.at_level(logging.WARNING, logger="search.tasks.lm"):
        assert tasks.get("lm", data=str(dense)).vocab == 4096
        tasks.get("lm", data=corpus)
    assert caplog.text == ""
