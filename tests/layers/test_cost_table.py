"""The planner's per-device cost table: CPU plans unchanged, the table chosen by the layer's device, calibration.

``data/cpu_plans.json`` holds, per structure, size and route (cost-model or plain forms), the cost, the matmul
forms and a digest of the whole layout as the planner gave them before its costs became a table (commit
d79bde3, constants in einstruct/layers/layout.py): the built-in 'cpu' table must give the same plans.
Regenerate it only on purpose, for a planner change that is meant to change CPU plans:
``python -m tests.layers.test_cost_table --write``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

import einstruct as es
from einstruct.layers import costs, layerplan
from einstruct.layers.layout import plan_chain

from .test_linear import check_against_dense

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
P = es.presets
# A table on which every form but the plain one costs far more than any copy.
HIGH = dataclasses.replace(costs.CPU, form=1000, act_t=(1000, 1000), out_t=(1000, 1000), both_t=(1000, 1000))
PLANS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "cpu_plans.json")
STRUCTURES = {  # the layer tests' presets and the benchmark table's structures
    "dense": P.dense,
    "low_rank1": lambda: P.low_rank(rank=1),
    "low_rank3": lambda: P.low_rank(rank=3),
    "low_rank64": lambda: P.low_rank(rank=64),
    "kron": P.kron,
    "tt2": lambda: P.tt(rank=2),
    "tt4": lambda: P.tt(rank=4),
    "btt1": lambda: P.btt(rank=1),
    "btt2": lambda: P.btt(rank=2),
    "btt3": lambda: P.btt(rank=3),
    "btt4": lambda: P.btt(rank=4),
    "monarch2": lambda: P.monarch(blocks=2),
    "monarch4": lambda: P.monarch(blocks=4),
    "monarch16": lambda: P.monarch(blocks=16),
    "block_diag4": lambda: P.block_diag(blocks=4),
    "theta_A": lambda: es.theta(0.5, 0.25, 0.25, 0.25, 0.5, 0.25, 0.25),
    "theta_B": lambda: es.theta(0.75, 0, 0.25, 0, 0.75, 0.25, 0.25),
}
SIZES = [(64, 64), (144, 36), (256, 256), (1000, 500), (1024, 512), (1024, 1024), (4096, 4096), (8192, 8192)]


def _form(s) -> str:
    return ("t" if s.act_kr else "p") + ("t" if s.core_left else "p")


def describe(chain) -> dict:
    """What the planner chose: its cost, the forms, and a digest of every field of the layout."""
    whole = repr((chain.steps, chain.in_shape, chain.final_perm, chain.fuse_bias, chain.cost))
    return {
        "cost": chain.cost,
        "forms": ",".join(_form(s) for s in chain.steps),
        "digest": hashlib.sha256(whole.encode()).hexdigest()[:16],
    }


def structures():
    """(label, compiled structure) for every structure at every size it splits into."""
    for name, make in STRUCTURES.items():
        for d_in, d_out in SIZES:
            try:
                yield f"{name} {d_in}x{d_out}", es.compile(make(), d_in, d_out)
            except es.SpecError:  # a size this structure cannot split into (e.g. theta at 144 x 36)
                continue


def current_plans() -> dict:
    out = {}
    for label, st in structures():
        for plain in (False, True):
            out[f"{label}{' plain' if plain else ''}"] = describe(plan_chain(st, plain=plain))
    return out


def plain_forms(chain) -> bool:
    return all(not s.act_kr and not s.core_left for s in chain.steps)


@pytest.fixture(autouse=True)
def _no_user_tables(monkeypatch):
    monkeypatch.delenv(costs.ENV, raising=False)
    costs.use_cost_table(None)
    yield
    costs.use_cost_table(None)


def test_builtin_cpu_table_gives_the_plans_of_before():
    with open(PLANS) as f:
        before = json.load(f)
    now = current_plans()
    assert len(now) > 200 and any(v["forms"] != "pp" and "plain" not in k for k, v in now.items())
    assert now == before
    assert costs.cost_table("cpu") is costs.CPU and es.StructuredLinear(64, 64, P.btt(rank=2))._plan.costs is costs.CPU


def test_cuda_table_prices_forms_alike_so_its_plans_cost_no_more():
    # With every form free and copies priced as on CPU, any CPU layout costs no more on the CUDA table, and
    # strictly less where the CPU plan pays for a transposed form: the CUDA optimum is below the CPU one.
    changed = 0
    for label, st in structures():
        cpu, cuda = plan_chain(st), plan_chain(st, costs=costs.CUDA)
        assert cuda.cost <= cpu.cost, label
        if not plain_forms(cpu):
            assert cuda.cost < cpu.cost, label
        changed += cuda != cpu
    assert changed >= 10
    # BTT r=4 at d=1024 (test_linear's formula): the same copies (x, the g f r intermediate, y), no form price.
    st = es.compile(P.btt(rank=4), 1024, 1024)
    cpu, cuda = plan_chain(st), plan_chain(st, costs=costs.CUDA)
    assert cpu.cost == 2 * 1024 + 1 * 1024 + 2 * (32 * 32 * 4) + 1 * (32 * 32 * 4) + 2 * 1024
    assert cuda.cost == 2 * 1024 + 2 * (32 * 32 * 4) + 2 * 1024
    assert [s.act_perm for s in cuda.steps] == [s.act_perm for s in cpu.steps]
    # Theta B at 1024: on CPU the second step copies its activation in runs too short to be fast (5 per
    # element) and multiplies in the plain form; on CUDA a transposed form avoids that scattering copy.
    st = es.compile(STRUCTURES["theta_B"](), 1024, 1024)
    cpu, cuda = plan_chain(st), plan_chain(st, costs=costs.CUDA)
    assert plain_forms(cpu) and not plain_forms(cuda) and cuda.cost < cpu.cost


@pytest.mark.parametrize(
    "name, d_in, d_out", [("btt4", 64, 64), ("theta_A", 64, 64), ("kron", 144, 36), ("monarch16", 256, 256)]
)
def test_a_layer_planned_on_the_cuda_table_equals_its_dense_matrix(name, d_in, d_out):
    # CUDA's prices, simulated on CPU: the layer's plan is the one the table gives (not the CPU one), and
    # every path (small-batch plain route, cost-model route, both training paths) stays exact.
    costs.use_cost_table(dataclasses.replace(costs.CUDA, device="cpu"))
    layer = es.StructuredLinear(d_in, d_out, STRUCTURES[name](), dtype=torch.float64)
    st = layer.structure
    assert layer._chain == plan_chain(st, costs=costs.CUDA) != plan_chain(st)
    check_against_dense(layer)


def test_a_layer_is_replanned_for_the_device_it_moves_to():
    costs.use_cost_table(dataclasses.replace(HIGH, device="meta"))  # a device type with a table of its own
    layer = es.StructuredLinear(256, 256, P.btt(rank=2))
    st, cpu_plan = layer.structure, layer._plan
    assert cpu_plan == layerplan.build(st) and not plain_forms(cpu_plan.chain.layout)
    layer.to("meta")
    assert layer._plan.costs.device == "meta" and plain_forms(layer._chain)
    assert layer._plan == layerplan.build(st, costs.cost_table("meta")) and layer._row_elems == layer._plan.row_elems
    assert layer.builtin_rows == layer._plan.builtin_rows  # the default threshold follows the plan
    layer.builtin_rows = 7  # one the user set is kept
    layer.to_empty(device="cpu")
    assert layer._plan == cpu_plan and layer.builtin_rows == 7
    layer.double()  # same device type: the plan stays
    assert layer._plan is not None and layer._plan == cpu_plan
    assert es.StructuredLinear(256, 256, P.btt(rank=2), device="meta")._plan.costs.device == "meta"
    assert es.StructuredLinear(256, 256, P.btt(rank=2), device="meta").to_empty(device="cpu")._plan == cpu_plan
    on_meta = es.StructuredLinear(256, 256, P.btt(rank=2), device="meta")
    layer.reset_parameters()  # to_empty left its memory uninitialised
    on_meta.load_state_dict(layer.state_dict(), assign=True)  # the parameters are swapped for cpu tensors
    assert on_meta._plan == cpu_plan
    x = torch.randn(5, 256, dtype=torch.float64)  # layer.double() above
    torch.testing.assert_close(on_meta(x), layer(x), atol=0, rtol=0)


def test_a_table_that_prices_transposed_forms_high_plans_plain_forms_and_stays_exact(tmp_path, monkeypatch):
    for label, st in structures():  # the planner then finds the plain-form optimum: what plain=True plans
        high = plan_chain(st, costs=HIGH)
        assert plain_forms(high) and high.cost == plan_chain(st, plain=True).cost, label
    path = tmp_path / "costs.json"
    costs.save(HIGH, path)
    monkeypatch.setenv(costs.ENV, str(path))
    for name in ("btt2", "monarch16", "theta_A"):
        layer = es.StructuredLinear(64, 64, STRUCTURES[name](), dtype=torch.float64)
        assert layer._plan.costs == HIGH and plain_forms(layer._chain)
        assert not plain_forms(plan_chain(layer.structure))
        check_against_dense(layer)


def test_tables_round_trip_through_json(tmp_path):
    measured = dataclasses.replace(costs.CPU, scattered=7.25, form=0.125, act_t=(0.5, 0.0), source="a test")
    for table in (costs.CPU, costs.CUDA, measured):
        path = tmp_path / f"{table.device}.json"
        costs.save(table, path)
        assert costs.load(path) == table
        assert json.loads(path.read_text())["format"] == costs.FORMAT
    assert es.use_cost_table(str(path)) == measured and es.cost_table("cpu") == measured
    assert es.cost_table("cuda") is costs.CUDA and es.cost_table("meta") == measured  # no table: cpu's


def test_bad_tables_raise_one_line_errors_naming_the_file_and_the_key(tmp_path, monkeypatch):
    good = costs.CPU.as_json()
    cases = {
        "missing.json": (None, "cannot be read"),
        "text.json": ("not json", "is not JSON"),
        "list.json": ([1, 2], "expected a JSON object"),
        "no_copy.json": ({k: v for k, v in good.items() if k != "copy"}, "missing key 'copy'"),
        "negative.json": ({**good, "form": -1}, "key 'form' must be a finite number >= 0, got -1"),
        "string.json": ({**good, "mac": "0.1"}, "key 'mac' must be a finite number"),
        "typo.json": ({**good, "copyy": 2}, "unknown key 'copyy'"),
        "pair.json": ({**good, "act_t": [0.1]}, "key 'act_t' must be a pair"),
        "device.json": ({**good, "device": 3}, "key 'device' must be a torch device type"),
        "format.json": ({**good, "format": "other 2"}, "key 'format' must be"),
    }
    for name, (content, match) in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(es.CostTableError, match=match) as info:
            costs.load(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
        assert isinstance(info.value, ValueError) and isinstance(info.value, es.EinstructError)
    monkeypatch.setenv(costs.ENV, str(tmp_path / "typo.json"))  # pointed at by the environment: at construction
    with pytest.raises(es.CostTableError, match=r"typo\.json: unknown key 'copyy'"):
        es.StructuredLinear(64, 64, P.btt(rank=2))
    monkeypatch.setenv(costs.ENV, str(tmp_path / "missing.json"))
    with pytest.raises(es.CostTableError, match=f"{costs.ENV} names .*missing.json, which cannot be read"):
        es.StructuredLinear(64, 64, P.btt(rank=2))


def test_costs_import_without_torch():
    code = (
        "import sys, einstruct as es; from einstruct.layers import costs; es.use_cost_table(costs.CUDA); "
        "assert es.cost_table('cuda') is costs.CUDA; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_calibrate_writes_a_table_the_planner_uses(tmp_path):
    path = tmp_path / "costs.json"
    cmd = [sys.executable, "-m", "benchmarks.layers", "--calibrate", "--quick", "--threads", "1", "--out", str(path)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    table = costs.load(path)
    assert table.device == "cpu" and table.copy == 2 and "--calibrate" in table.source
    assert table.scattered > 0 and table.mac > 0  # measured: a copy and a matmul take time
    assert f"wrote {path}" in out.stdout and "scattered" in out.stdout
    es.use_cost_table(path)
    layer = es.StructuredLinear(64, 64, P.btt(rank=2), dtype=torch.float64)
    assert layer._plan.costs == table and layer._chain == plan_chain(layer.structure, costs=table)
    check_against_dense(layer)


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    with open(PLANS, "w") as f:
        json.dump(current_plans(), f, indent=0, sort_keys=True)
        f.write("\n")
