"""One trial on two processes (torchrun, gloo): the same loss and FLOPs as one process on the same data."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SETTINGS = json.dumps(dict(pool=2048, eval_size=512, batch=32, teacher_width=32, teacher_depth=2))
ARGS = ["-m", "search.train", "--spec", "btt", "--width", "32", "--train-flops", "6e7", "--task-settings", SETTINGS]


def run(prefix):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run(
        [sys.executable, *prefix, *ARGS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, proc.stdout  # rank 0 reports, once
    return json.loads(lines[0])


def test_two_process_torchrun_matches_one_process():
    pytest.importorskip("torch.distributed")
    one = run([])
    two = run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"])
    assert (one["ranks"], two["ranks"]) == (1, 2)
    assert two["steps"] == one["steps"] > 20
    assert two["train_flops"] == one["train_flops"]  # summed over ranks: each spent half of every step
    assert math.isclose(two["loss"], one["loss"], rel_tol=1e-4)
    for (f1, l1), (f2, l2) in zip(one["curve"], two["curve"]):
        assert f1 == f2 and math.isclose(l1, l2, rel_tol=1e-4)


def test_split_batch_must_divide():
    from search import distributed
    from search.errors import SearchError

    world = distributed.World(rank=1, size=3)
    with pytest.raises(SearchError, match="does not split over 3 ranks"):
        distributed.shard((None,), world, 32)
    import torch

    x = torch.arange(12)
    assert distributed.shard((x, 0.5), distributed.World(rank=1, size=3), 12)[0].tolist() == [4, 5, 6, 7]


def test_a_torchrun_rank_exits_without_interpreter_shutdown(monkeypatch):
    """Under torchrun (WORLD_SIZE > 1) search.train's process ends through os._exit with the run's code, after
    flushing what it printed; a plain process raises SystemExit as usual."""
    import io

    from search import distributed

    class Out(io.StringIO):
        flushed = ""

        def flush(self):
            self.flushed = self.getvalue()

    out = Out()
    exits = []

    class Exited(Exception):  # os._exit does not return
        pass

    def fake_exit(code):
        exits.append((code, out.flushed))
        raise Exited

    monkeypatch.setattr(distributed.os, "_exit", fake_exit)
    monkeypatch.setattr(distributed.sys, "stdout", out)
    monkeypatch.setenv("WORLD_SIZE", "2")
    print('{"loss": 1}', end="")  # what the rank printed: flushed before the exit
    with pytest.raises(Exited):
        distributed.exit_process(3)
    assert exits == [(3, '{"loss": 1}')]
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(SystemExit) as e:
        distributed.exit_process(4)
    assert e.value.code == 4 and len(exits) == 1
