"""The rules of einstruct.rules are the only definition: numbers = sympy formulas = FlopCounterMode = THEORY.

For each structure, the compiled numbers (init std, kappa, per-core MACs, flops, train_flops), the sympy
formulas of ``st.symbolic()`` evaluated at the same sizes and torch's own FLOP count of the layer agree
exactly; param_groups and mup_init give what the rules say; and no module outside einstruct/rules re-types
one of the rules' formulas.
"""

import ast
import math
import pathlib
import re

import pytest
import sympy
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import einstruct as es
from einstruct import rules
from einstruct.mup import assign
from einstruct.symbolic import symbols
from search.flops import linear_train_flops

ROOT = pathlib.Path(__file__).resolve().parents[2]

# (spec, d_in, d_out) where every size is its monomial exactly (no rounding), so the formulas must agree exactly
CASES = [
    (es.presets.dense(), 64, 64),
    (es.presets.low_rank(rank=4), 64, 256),
    (es.presets.kron(), 256, 256),
    (es.presets.tt(rank=2), 256, 64),
    (es.presets.btt(rank=1), 256, 256),
    (es.presets.btt(rank=4), 64, 256),
    (es.presets.monarch(blocks=4), 256, 256),
    (es.presets.block_diag(blocks=4), 64, 64),
    (es.theta(0.5, 0.25, 0.25, 0.25, 0.5, 0.25, 0.25), 256, 256),
]
IDS = [f"{s.label or 'theta'}-{i}x{o}" for s, i, o in CASES]


def _at(expr, d_in, d_out):
    a, b, d = symbols()
    return expr.subs({a: d_in, b: d_out, d: d_in}) if d_in == d_out else expr.subs({a: d_in, b: d_out})


@pytest.mark.parametrize(("spec", "d_in", "d_out"), CASES, ids=IDS)
def test_compiled_numbers_equal_the_sympy_formulas_and_theory(spec, d_in, d_out):
    st = es.compile(spec, d_in, d_out)
    assert not st.padded
    sym = st.symbolic()
    k = len(st.cores)
    assert _at(sym["macs"], d_in, d_out) == st.macs == sum(c.macs for c in st.cores)
    assert _at(sym["flops"], d_in, d_out) == st.flops == 2 * st.macs
    assert _at(sym["train_flops"], d_in, d_out) == st.train_flops == 6 * st.macs
    for c in st.cores:
        f = sym["cores"][c.name]
        assert _at(f["d_in"], d_in, d_out) == c.d_in and _at(f["d_out"], d_in, d_out) == c.d_out
        # THEORY 4, written out here independently of the rules
        assert c.init_std == pytest.approx(math.sqrt(min(c.d_in, c.d_out)) / c.d_in, rel=1e-15)
        assert c.kappa == pytest.approx((d_in / c.d_in) / k, rel=1e-15)
        assert c.kappa_sgd == pytest.approx(((c.d_out / c.d_in) / (d_out / d_in)) / k, rel=1e-15)
        for key in ("init_std", "kappa", "kappa_sgd"):
            assert float(_at(f[key], d_in, d_out)) == pytest.approx(getattr(c, key), rel=1e-12), (c.name, key)


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


@pytest.mark.parametrize(("spec", "d_in", "d_out"), CASES[1:], ids=IDS[1:])
def test_layer_flops_from_the_rules_equal_flop_counter(spec, d_in, d_out):
    torch.manual_seed(0)
    layer = es.StructuredLinear(d_in, d_out, spec)
    rows = 6
    x = torch.randn(rows, d_in)
    assert layer.flops(rows, training=True) == _counted(lambda: layer(x)) == rows * layer.structure.flops
    xg = x.clone().requires_grad_()
    assert linear_train_flops(layer, rows) == _counted(lambda: layer(xg).sum().backward())
    assert linear_train_flops(layer, rows) == rows * layer.structure.train_flops
    # fed by data: the first step makes no input gradient (THEORY 8)
    data_fed = linear_train_flops(layer, rows, input_needs_grad=False)
    assert data_fed == _counted(lambda: layer(x).sum().backward())
    assert data_fed == rows * (6 * layer.structure.macs - 2 * layer.structure.cores[0].macs)


def test_dense_layer_training_flops_from_the_rules_equal_flop_counter():
    lin = nn.Linear(48, 80)
    x = torch.randn(5, 48)
    assert linear_train_flops(lin, 5) == _counted(lambda: lin(x.requires_grad_()).sum().backward()) == 6 * 5 * 48 * 80
    assert linear_train_flops(lin, 5, input_needs_grad=False) == _counted(lambda: lin(x.detach()).sum().backward())
    assert es.summary(nn.Sequential(lin)).flops == rules.dense_flops(1, 48, 80) == 2 * 48 * 80


@pytest.mark.parametrize("dispatch", ["dense", "sparse"])
def test_moe_flops_are_the_rules_moe_formula(dispatch):
    E, k, d = 4, 2, 64
    layer = es.BTTMoE(d, d, experts=E, active=k, dispatch=dispatch)
    one = es.compile(es.presets.btt(rank=1), d)
    rows = E if dispatch == "dense" else k
    router = 2 * 10 * d * E
    assert layer.flops(10) == router + 10 * rows * one.flops
    assert layer.train_flops(10) == 3 * layer.flops(10)
    first = 10 * rows * 2 * one.cores[0].macs  # the experts' first steps read the input, as the router does
    assert layer.train_flops(10, input_needs_grad=False) == 3 * layer.flops(10) - router - first


# ---- the rules on numbers and on symbols ---------------------------------------------------------------

GRID = [(1, 1), (16, 256), (256, 16), (64, 64), (1024, 4096), (7, 3)]


@pytest.mark.parametrize(("fan_in", "fan_out"), GRID)
def test_each_rule_gives_the_same_value_on_numbers_and_on_sympy(fan_in, fan_out):
    fi, fo, bi, bo = sympy.symbols("fi fo bi bo", positive=True)
    at = {fi: fan_in, fo: fan_out, bi: 64, bo: 32}
    pairs = [
        (rules.init_std(fan_in, fan_out), rules.init_std(fi, fo)),
        (rules.low_rank_std(fan_in), rules.low_rank_std(fi)),
        (rules.lr_mult(fan_in, fan_out, 64, 32, "adam"), rules.lr_mult(fi, fo, bi, bo, "adam")),
        (rules.lr_mult(fan_in, fan_out, 64, 32, "sgd"), rules.lr_mult(fi, fo, bi, bo, "sgd")),
        (rules.kappa(fan_in, fan_out, 64, 32, 3, "adam"), rules.kappa(fi, fo, bi, bo, 3, "adam")),
        (rules.kappa(fan_in, fan_out, 64, 32, 3, "sgd"), rules.kappa(fi, fo, bi, bo, 3, "sgd")),
        (rules.fixed_fan_in_mult(fan_out, 32, "sgd"), rules.fixed_fan_in_mult(fo, bo, "sgd")),
        (rules.train_flops(rules.dense_flops(5, fan_in, fan_out)), rules.train_flops(rules.dense_flops(5, fi, fo))),
    ]
    for number, formula in pairs:
        assert isinstance(formula, sympy.Basic)
        assert float(formula.subs(at)) == pytest.approx(number, rel=1e-14)
    assert rules.init_std(fan_in, fan_out) == math.sqrt(min(fan_in, fan_out)) / fan_in
    assert rules.fixed_fan_in_mult(fan_out, 32, "adam") == 1.0


def test_param_groups_and_mup_init_apply_the_rules():
    width, base = 256, 64
    mk = lambda w: nn.Sequential(nn.Embedding(100, w), nn.Linear(w, 2 * w), nn.Linear(2 * w, w))
    model, ref = mk(width), mk(base)
    adam = {r.name: r.multiplier for r in assign(model, ref, optimizer="adam")}
    sgd = {r.name: r.multiplier for r in assign(model, ref, optimizer="sgd")}
    assert adam["1.weight"] == rules.lr_mult(width, 2 * width, base, 2 * base) == base / width
    assert sgd["1.weight"] == rules.lr_mult(width, 2 * width, base, 2 * base, "sgd") == 1.0
    assert adam["0.weight"] == 1.0 and sgd["0.weight"] == width / base  # the embedding: a fixed fan-in
    assert sgd["1.bias"] == 2 * width / (2 * base)  # one grown dim, fixed fan-in 1
    es.mup_init(model, zero_head=False, generator=torch.Generator().manual_seed(0))
    w = model[1].weight
    assert w.std().item() == pytest.approx(rules.init_std(width, 2 * width), rel=0.02)


def test_fan_in_grows_decides_the_input_layer():
    assert rules.fan_in_grows(256, 64)
    assert not rules.fan_in_grows(16, 16)  # the data's size: an input layer
    assert rules.fan_in_grows(16, 16, 32) and not rules.fan_in_grows(16, 16, 16)
    assert rules.fan_in_grows(64, 64, at_base=True, output_sizes={64}) and not rules.fan_in_grows(16, 16, at_base=True)


# ---- one definition ------------------------------------------------------------------------------------

# formulas that belong to einstruct/rules only (matched in code, docstrings and comments left out)
COPIES = {
    "init std sqrt(min(fan_in, fan_out))": r"sqrt\((sympy\.)?[Mm]in\(",
    "low-rank std 1/sqrt(d_in)": r"\b1(\.0)? / (math\.)?sqrt\(",
    "Adam rule base_fan_in / fan_in": r"/ (fan_in|fi)\b",
    "2 x MACs or 3 x forward": (
        r"\b[236] \* (self\.)?(macs|fwd|flops|forward|per_token_fwd)\b|\.macs \* 2\b|\* 2 \* [\w.()\[\]]*macs\b"
    ),
    "dense FLOPs 2 x rows x d_in x d_out": r"\b2 \* (rows|batch|d_in|weight|self\.in_features)\b",
    "6 training FLOPs per MAC": r"\b6 \* |\bMACS = 6\b",
}


def _code(path: pathlib.Path) -> str:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            body[0] = ast.Pass()
    return ast.unparse(tree)


def test_no_module_outside_rules_retypes_a_rule():
    pkgs = ("einstruct", "search", "benchmarks", "examples")
    files = [p for pkg in pkgs for p in (ROOT / pkg).rglob("*.py") if "rules" not in p.parts]
    assert len(files) > 50
    found = []
    for p in files:
        code = _code(p)
        for what, pattern in COPIES.items():
            for m in re.finditer(pattern, code):
                line = code[code.rfind("\n", 0, m.start()) + 1 : code.find("\n", m.end())]
                found.append(f"{p.relative_to(ROOT)}: {what}: {line.strip()}")
    assert not found, "\n".join(found)


def test_the_pattern_check_sees_a_copy():
    code = "def f(fan_in, fan_out):\n    return math.sqrt(min(fan_in, fan_out)) / fan_in, 3 * fwd, 2 * rows * d\n"
    hits = [what for what, pattern in COPIES.items() if re.search(pattern, code)]
    assert len(hits) == 4, hits
