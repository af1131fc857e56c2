"""The intra-op thread policy of CPU trials (search.threads, --threads)."""

from __future__ import annotations

import subprocess

import pytest
import torch

import einstruct as es
import search.loop
from search import run, threads, train
from search.errors import SearchError
from search.settings import Settings
from search.tasks import get

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


@pytest.fixture
def two_threads():
    """torch on 2 intra-op threads for the test (a 1-core machine can still set 2), restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield 2
    torch.set_num_threads(old)


def test_auto_runs_a_small_step_on_one_thread_and_a_large_one_on_the_share():
    small, large = threads.SMALL_STEP_FLOPS / 2, threads.SMALL_STEP_FLOPS * 2
    assert threads.for_trial(0, small, CPU, 4) == 1
    assert threads.for_trial(0, large, CPU, 4) == 4
    assert threads.for_trial(3, small, CPU, 4) == 3  # a number: every CPU trial
    assert threads.for_trial(0, small, GPU, 4) is None and threads.for_trial(3, large, GPU, 4) is None


def test_share_splits_the_process_threads_between_cpu_workers(two_threads):
    assert threads.share(1) == 2 and threads.share(2) == 1 and threads.share(5) == 1


def test_used_sets_the_count_inside_and_restores_it_after(two_threads):
    with threads.used(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError), threads.used(1):
        raise RuntimeError("a crash inside")
    assert torch.get_num_threads() == 2
    with threads.used(None):
        assert torch.get_num_threads() == 2


def _threads_while_training(setting):
    task = get("regression")
    _, per = train.plan(task, es.presets.btt(rank=1), 32, 1.0)
    seen = []
    train.run(
        task,
        es.presets.btt(rank=1),
        32,
        per * 20,
        device="cpu",
        evals=1,
        threads=setting,
        callback=lambda _: seen.append(torch.get_num_threads()),
    )
    return per, seen


def test_a_trial_trains_on_the_policys_threads_and_restores_them(two_threads):
    per, seen = _threads_while_training(0)
    assert per < threads.SMALL_STEP_FLOPS  # a level-0-sized step: auto gives it one thread
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2
    _, seen = _threads_while_training(None)  # train.run's own default: the count as it is
    assert set(seen) == {2}
    _, seen = _threads_while_training(2)
    assert set(seen) == {2}


def test_bad_threads_is_a_one_line_error():
    with pytest.raises(SearchError, match="--threads must be a whole number"):
        Settings(threads=-1).check()
    with pytest.raises(SearchError, match="--threads must be a whole number"):
        Settings(threads=1.5).check()
    assert run.main(["--threads", "-2", "--dry-run", "--no-progress"]) == 2


def test_cpu_workers_are_given_their_share_of_the_threads(monkeypatch, tmp_path, two_threads):
    launched = []

    class Launch:
        def __init__(self, argv, stdout=None, stderr=None, env=None):
            launched.append(env)

        def terminate(self):
            pass

        def wait(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", Launch)

    def stop(study, **kw):
        raise SearchError("stopped by the test")

    monkeypatch.setattr(search.loop, "run_search", stop)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: launched.append(("this process", n)))
    assert run.main(["--study", "s", "--out", str(tmp_path), "--devices", "cpu,cpu", "--no-progress"]) == 2
    assert ("this process", 1) in launched
    (env,) = [e for e in launched if isinstance(e, dict)]
    assert env["OMP_NUM_THREADS"] == "1"  # 2 threads between 2 CPU workers
