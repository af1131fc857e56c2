"""Costs, plan order and per-core muP numbers of compiled presets against THEORY 1, 4 and 8."""

import math

import opt_einsum
import pytest
import sympy

import einstruct as es
from einstruct.symbolic import symbols

SQUARES = [64, 256, 768, 1024, 3072, 4096]
RECTS = [(1024, 4096), (4096, 1024), (768, 3072), (256, 64)]


def sz(st, axes):
    return [st.sizes[a] for a in axes]


@pytest.mark.parametrize("d_in, d_out", [(d, d) for d in SQUARES] + RECTS)
def test_preset_params_and_macs_match_theory_formulas(d_in, d_out):
    d = min(d_in, d_out)
    st = es.compile(es.presets.dense(), d_in, d_out)
    assert (st.params, st.macs) == (d_in * d_out, d_in * d_out)

    r = 5
    st = es.compile(es.presets.low_rank(rank=r), d_in, d_out)
    assert (st.params, st.macs) == (r * (d_in + d_out), r * (d_in + d_out))

    for r in (1, 3):
        st = es.compile(es.presets.btt(rank=r), d_in, d_out)
        g, a, f, e = sz(st, "gafe")
        assert g * a == d_in and f * e == d_out
        assert st.params == r * g * f * (a + e) and st.macs == r * g * f * (a + e)
        if d_in == d_out and math.isqrt(d) ** 2 == d:  # exact sqrt: THEORY 1's closed form 2 r d m
            assert st.params == st.macs == 2 * r * d * math.isqrt(d)

    st = es.compile(es.presets.kron(), d_in, d_out)
    a, b, c, dd = sz(st, "abcd")
    assert st.params == a * c + b * dd and st.macs == a * b * c + b * c * dd
    if d_in == d_out and math.isqrt(d) ** 2 == d:
        m = math.isqrt(d)
        assert (st.params, st.macs) == (2 * d, 2 * d * m)

    st = es.compile(es.presets.tt(rank=3), d_in, d_out)
    a, b, c, dd = sz(st, "abcd")
    assert st.params == 3 * (a * c + b * dd) and st.macs == 3 * (a * b * c + b * c * dd)
    if d_in == d_out and math.isqrt(d) ** 2 == d:
        assert (st.params, st.macs) == (2 * 3 * d, 2 * 3 * d * math.isqrt(d))

    st = es.compile(es.presets.block_diag(blocks=4), d_in, d_out)
    assert st.params == st.macs == d_in * d_out // 4

    st = es.compile(es.presets.monarch(blocks=4), d_in, d_out)
    assert st.sizes["r"] == d // 16 and st.sizes["a"] == d_in // 4 and st.sizes["e"] == d_out // 4
    if d_in == d_out:
        assert st.params == st.macs == 2 * d * d // 4


@pytest.mark.parametrize("d", [256, 1024, 4096])
def test_kappa_table_of_theory_4_comes_out_of_the_general_rule(d):
    m = math.isqrt(d)
    close = lambda st, *ks: [pytest.approx(k) for k in ks] == [c.kappa for c in st.cores]
    r = 8
    st = es.compile(es.presets.low_rank(rank=r), d)
    assert [c.name for c in st.cores] == ["V", "U"]
    assert close(st, 1 / 2, d / (2 * r))
    assert close(es.compile(es.presets.kron(), d), m / 2, m / 2)
    for b in (4, 16):
        assert close(es.compile(es.presets.monarch(blocks=b), d), b / 2, b / 2)
    for r in (1, 2, 4):
        assert close(es.compile(es.presets.btt(rank=r), d), m / 2, m / (2 * r))
        assert close(es.compile(es.presets.tt(rank=r), d), m / 2, m / (2 * r))
    assert close(es.compile(es.presets.dense(), d), 1.0)


def test_init_std_and_sgd_kappa_follow_the_dense_rule_per_core():
    st = es.compile(es.presets.btt(rank=4), 1024, 4096)
    for c in st.cores:
        assert c.init_std == pytest.approx(math.sqrt(min(c.d_in, c.d_out)) / c.d_in)
        assert c.kappa_sgd == pytest.approx((c.d_out / c.d_in) / (4096 / 1024) / 2)
    first, second = st.cores
    assert (first.d_in, first.d_out, first.batch) == (32, 64 * 4, 32)  # a in; f, r out; g batch
    assert (second.d_in, second.d_out, second.batch) == (32 * 4, 64, 64)  # g, r in; e out; f batch
    assert (first.step.contracted, first.step.produced, first.step.batch) == ("a", "fr", "g")


def test_cores_listed_out_of_order_run_in_the_cheapest_order():
    # BTT with its cores listed backwards: the core that reads x must still run first.
    spec = es.Spec("ga,L:fgre,R:gafr->fe", g="d_in^1/2", a="d_in^1/2", f="d_out^1/2", e="d_out^1/2", r=2)
    st = es.compile(spec, 1024)
    assert st.order == (1, 0)
    assert [c.name for c in st.cores] == ["R", "L"]
    assert st.macs == es.compile(es.presets.btt(rank=2), 1024).macs
    # the other order really is more expensive: L first makes an (g, a, f, r, e) intermediate
    g = a = f = e = 32
    assert st.macs < g * a * f * 2 * e


def test_ties_are_broken_by_spec_order():
    spec = es.Spec("ab,A:ac,B:bd->cd", a=8, b=8, c=8, d=8)  # both orders cost the same
    assert es.compile(spec, 64).order == (0, 1)
    spec = es.Spec("ab,B:bd,A:ac->cd", a=8, b=8, c=8, d=8)
    assert es.compile(spec, 64).order == (0, 1)


def _opt_cost(st):
    ops = [st.spec.x] + [c.axes for c in st.cores]
    path = [(0, 1)] + [(0, len(ops) - 1 - i) for i in range(1, len(ops) - 1)]
    shapes = [tuple(st.sizes[a] for a in s) for s in ops]
    expr = ",".join(ops) + "->" + st.spec.y
    _, info = opt_einsum.contract_path(expr, *shapes, shapes=True, optimize=path)
    return int(info.opt_cost)


@pytest.mark.parametrize(
    "spec",
    [
        es.presets.dense(),
        es.presets.low_rank(rank=4),
        es.presets.kron(),
        es.presets.tt(rank=2),
        es.presets.btt(rank=1),
        es.presets.btt(rank=3),
        es.presets.monarch(blocks=4),
        es.theta(0.5, 0.25, 0.25, 0.25, 0.5, 0.25, 0.25),
        es.theta(0.33, 0.67, 0, 0.33, 0.67, 0, 0),
    ],
    ids=lambda s: s.label,
)
@pytest.mark.parametrize("d_in, d_out", [(256, 256), (1024, 4096)])
def test_flops_equal_opt_einsum_cost_of_the_chosen_chain(spec, d_in, d_out):
    st = es.compile(spec, d_in, d_out)
    assert all(c.step.contracted for c in st.cores)  # every step sums: opt_einsum counts 2 per MAC
    assert st.flops == _opt_cost(st) == 2 * st.macs
    assert st.train_flops == 3 * st.flops


def test_symbolic_costs():
    d_in, d_out, d = symbols()
    s = es.compile(es.presets.btt(rank=1), 1024).symbolic()
    assert sympy.simplify(s["macs"] - 2 * d ** sympy.Rational(3, 2)) == 0
    assert sympy.simplify(s["cores"]["R"]["kappa"] - sympy.sqrt(d) / 2) == 0
    s = es.compile(es.presets.btt(rank=4), 1024, 4096).symbolic()
    expected = 4 * (sympy.sqrt(d_in) * sympy.sqrt(d_out) * (sympy.sqrt(d_in) + sympy.sqrt(d_out)))
    assert sympy.simplify(s["macs"] - expected) == 0
    assert s["flops"].subs({d_in: 1024, d_out: 4096}) == es.compile(es.presets.btt(rank=4), 1024, 4096).flops
    s = es.compile(es.presets.monarch(blocks=4), 1024).symbolic()
    assert sympy.simplify(s["params"] - 2 * d**2 / 4) == 0
    s = es.compile(es.presets.low_rank(rank=16), 1024).symbolic()
    assert sympy.simplify(s["macs"] - 32 * d) == 0
    assert sympy.simplify(s["cores"]["U"]["kappa"] - d / 32) == 0


def test_symbolic_square_flag_and_min():
    d_in, d_out, d = symbols()
    s = es.compile(es.presets.monarch(blocks=4), 256, 1024).symbolic()
    assert s["macs"].subs({d_in: 256, d_out: 1024}) == es.compile(es.presets.monarch(blocks=4), 256, 1024).macs
    sq = es.compile(es.presets.monarch(blocks=4), 256, 1024).symbolic(square=True)
    assert sq["macs"].free_symbols == {d}


def test_table_shows_sizes_roles_and_costs():
    st = es.compile(es.presets.btt(rank=4), 1024, 4096)
    text = st.table()
    for needle in (
        "bond",
        "input",
        "output",
        "contracted",
        "kappa",
        "init_std",
        f"{st.macs:,}",
        f"{st.params:,}",
        "omega=0",
        "psi=1",
        "nu=0.5",
        "rank       1024",
    ):
        assert needle in text


@pytest.mark.parametrize(
    "spec",
    [
        es.presets.low_rank(rank=4),
        es.presets.kron(),
        es.presets.tt(rank=2),
        es.presets.btt(rank=3),
        es.presets.monarch(blocks=4),
        es.theta(0.2, 0.5, 0.3, 0.5, 0.2, 0.3, 0),
        es.Spec("ga,L:fgre,R:gafr->fe", g="d_in^1/2", a="d_in^1/2", f="d_out^1/2", e="d_out^1/2", r=2),
    ],
    ids=lambda s: s.label or s.einsum,
)
@pytest.mark.parametrize("d_in, d_out", [(256, 256), (1024, 4096), (4096, 1024)])
def test_plan_is_the_cheapest_of_all_orders_ties_to_spec_order(spec, d_in, d_out):
    import itertools

    from einstruct import plan

    st = es.compile(spec, d_in, d_out)
    axes = [c.axes for c in spec.cores]
    best = None
    for order in itertools.permutations(range(len(axes))):
        applied, macs = frozenset(), 0
        for i in order:
            step = plan.make_step(spec.x, spec.y, axes, applied, i)
            macs += math.prod(st.sizes[a] for a in plan.step_axes(step, axes))
            applied |= {i}
        best = min(best or (macs, order), (macs, order))
    assert (st.macs, st.order) == best
