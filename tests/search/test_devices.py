"""One worker per device (search.devices): which worker gets which device, the environment each started worker
process receives (the launch intercepted: no process starts, nothing trains), the per-device wall-time estimate,
and what --dry-run prints. GPUs are simulated (torch.cuda.is_available / device_count patched); CPU lists are real."""

import subprocess

import pytest
import torch

import search.loop
from search import devices, run
from search.errors import SearchError


@pytest.fixture
def gpus(monkeypatch):
    """A machine with ``n`` simulated CUDA GPUs; returns the devices torch.cuda.set_device was called with."""
    chosen = []

    def make(n: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(str(d)))
        return chosen

    return make


@pytest.fixture
def no_probe(monkeypatch):
    """The throughput probe stubbed: 1e9 FLOP/s and 0.01 s per trial on every device, the devices probed kept."""
    probed = []

    def probe(task, widths, device, threads=None):
        probed.append(device)
        return {"flops_per_second": 1e9, "seconds_per_trial": 0.01, "probe_width": min(widths)}

    monkeypatch.setattr(search.loop, "probe", probe)
    return probed


def test_assignment_on_simulated_gpus(gpus):
    gpus(4)
    assert devices.assign(None, None, "cuda", "cuda") == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]  # one per GPU
    assert devices.assign(None, 6, None, "cuda") == ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0", "cuda:1"]
    assert devices.assign(None, 3, "cuda:2", "cuda:2") == ["cuda:2"] * 3  # a GPU named: every worker on it
    assert devices.assign("cuda:3,cuda:1", None, None, "auto") == ["cuda:3", "cuda:1"]  # one per listed device
    assert devices.assign("cuda:0,cuda:0", 2, "cuda", "cuda") == ["cuda:0", "cuda:0"]  # one GPU, two workers
    assert devices.assign(None, None, None, "auto") == ["auto"]  # auto and no list: one worker, as before
    assert devices.assign(None, 5, None, "auto") == ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0"]  # spread


def test_assignment_without_gpus_and_on_cpu_lists(gpus):
    gpus(0)
    assert devices.assign("cpu,cpu,cpu", None, "cpu", "cpu") == ["cpu"] * 3
    assert devices.assign(None, 2, None, "cpu") == ["cpu", "cpu"]
    assert devices.assign(None, 2, None, "auto") == ["cpu", "cpu"]
    with pytest.raises(SearchError, match=r"^--devices 'cuda:0': no CUDA GPU is available here; list cpu"):
        devices.assign("cuda:0", None, None, "auto")


@pytest.mark.parametrize(
    "text, workers, device, message",
    [
        ("cuda:0,cuda:2", None, None, r"^--devices: cuda:2 is not on this machine, which has 2 CUDA GPU\(s\), cuda:0 "),
        ("cuda:0,cuda:1", None, "cpu", r"^--devices cuda:0,cuda:1 does not match --device cpu: with --devices leave"),
        ("cuda:0,cuda:1", None, "cuda:1", r"does not match --device cuda:1"),
        ("cuda:0,cuda:1", 3, None, r"^--workers 3 but --devices lists 2 device\(s\); give one device per worker"),
        ("cuda", None, None, r"^--devices: 'cuda' is not a device; list cpu or cuda:N \(a GPU's index each\)"),
        ("cpu,cuda:0", None, None, r"mixes cpu and cuda; list one kind"),
        ("cuda:0,", None, None, r"has an empty entry"),
    ],
)
def test_assignment_errors_are_one_line(gpus, text, workers, device, message):
    gpus(2)
    with pytest.raises(SearchError, match=message) as e:
        devices.assign(text, workers, device, device or "auto")
    assert "\n" not in str(e.value)


def test_pinning_is_each_workers_own_environment():
    assert devices.pinned("cuda:3") == ({"CUDA_VISIBLE_DEVICES": "3"}, "cuda:0")  # sees its GPU only, as cuda:0
    assert devices.pinned("cpu") == ({"CUDA_VISIBLE_DEVICES": ""}, "cpu")  # sees no GPU
    assert devices.describe(0, "cuda:3") == "this process"
    assert devices.describe(2, "cuda:3") == "a process with CUDA_VISIBLE_DEVICES=3 --device cuda:0"


def test_estimate_probes_each_device_once_and_shares_a_shared_device():
    calls = []
    figures = {"cuda:0": (4e9, 0.2), "cuda:1": (2e9, 0.5)}

    def probe(d):
        calls.append(d)
        return {"flops_per_second": figures[d][0], "seconds_per_trial": figures[d][1], "probe_width": 32}

    est = devices.estimate(probe, ["cuda:0", "cuda:0", "cuda:1"], 1.2e12, 30)
    assert calls == ["cuda:0", "cuda:1"]
    assert [w["flops_per_second"] for w in est["workers"]] == [2e9, 2e9, 2e9]  # two workers share cuda:0's rate
    assert [w["seconds_per_trial"] for w in est["workers"]] == [0.2, 0.2, 0.5]
    assert est["flops_per_second"] == pytest.approx(6e9)
    assert est["seconds"] == pytest.approx(1.2e12 / 6e9 + 30 * (0.9 / 3) / 3)
    one = devices.estimate(probe, ["cuda:1"], 1.2e12, 30)  # one worker: budget / rate + trials * overhead
    assert one["seconds"] == pytest.approx(1.2e12 / 2e9 + 30 * 0.5)


class _Launch:
    """subprocess.Popen intercepted: records each worker's command and environment, starts nothing."""

    def __init__(self, launched):
        self.launched = launched

    def __call__(self, argv, stdout=None, stderr=None, env=None):
        self.launched.append((argv, env))
        return self

    def terminate(self):
        pass

    def wait(self):
        return 0


def _main_with_launches(monkeypatch, argv):
    """run.main with the launch and the search intercepted: (exit code, launches, what run_search was given)."""
    launched, searched = [], []
    monkeypatch.setattr(subprocess, "Popen", _Launch(launched))

    def run_search(study, **kw):
        searched.append(kw)
        raise SearchError("stopped by the test")

    monkeypatch.setattr(search.loop, "run_search", run_search)
    code = run.main(argv)
    return code, launched, searched


def _flag(argv, name):
    return argv[argv.index(name) + 1]


def test_each_started_worker_is_pinned_to_its_gpu(gpus, monkeypatch, tmp_path):
    chosen = gpus(4)
    argv = ["--study", "s", "--out", str(tmp_path), "--devices", "cuda:2,cuda:0,cuda:3", "--no-progress"]
    code, launched, searched = _main_with_launches(monkeypatch, argv)
    assert code == 2  # the intercepted search's error
    assert searched[0]["device"] == "cuda:2" and chosen == ["cuda:2"]  # worker 0: this process, by name
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in launched] == ["0", "3"]
    assert [_flag(a, "--device") for a, _ in launched] == ["cuda:0", "cuda:0"]
    assert [_flag(a, "--worker-index") for a, _ in launched] == ["1", "2"]


def test_two_cpu_workers_each_get_their_device(monkeypatch, tmp_path):
    argv = ["--study", "s", "--out", str(tmp_path), "--devices", "cpu,cpu", "--no-progress"]
    code, launched, searched = _main_with_launches(monkeypatch, argv)
    assert code == 2 and searched[0]["device"] == "cpu"
    assert len(launched) == 1
    ((child, env),) = launched
    assert env["CUDA_VISIBLE_DEVICES"] == "" and _flag(child, "--device") == "cpu"


def test_default_is_one_worker_per_visible_gpu(gpus, monkeypatch, tmp_path):
    gpus(3)
    argv = ["--study", "s", "--out", str(tmp_path), "--device", "cuda", "--no-progress"]
    code, launched, searched = _main_with_launches(monkeypatch, argv)
    assert code == 2 and searched[0]["device"] == "cuda:0"
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in launched] == ["1", "2"]


def test_dry_run_prints_each_workers_device(gpus, no_probe, capsys, tmp_path):
    gpus(2)
    code = run.main(["--study", "s", "--out", str(tmp_path), "--devices", "cuda:1,cuda:0,cuda:0", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    assert no_probe == ["cuda:1", "cuda:0"]  # each device probed once
    assert "throughput probe: 2e+09 FLOP/s" in out  # cuda:1 alone, cuda:0 shared by two
    assert "worker 0: cuda:1 (this process), 1e+09 FLOP/s, 0.01 s per trial" in out
    assert "worker 1: cuda:0 (a process with CUDA_VISIBLE_DEVICES=0 --device cuda:0), 5e+08 FLOP/s" in out
    assert "worker 2: cuda:0 (a process with CUDA_VISIBLE_DEVICES=0 --device cuda:0), 5e+08 FLOP/s" in out


def test_gpu_checks_two_workers_on_one_gpu_parse(gpus):
    """benchmarks.gpu runs `--workers 2 --devices cuda:0,cuda:0` when --help lists --devices."""
    gpus(1)
    assert "--devices" in run.parser().format_help()
    args = run.parser().parse_args(["--workers", "2", "--devices", "cuda:0,cuda:0"])
    assert devices.assign(args.devices, args.workers, args.device, "auto") == ["cuda:0", "cuda:0"]
