"""omega, psi, nu (THEORY 3), theta validity (THEORY 2) and the min-cut rank against numerical rank."""

import pytest

import einstruct as es

NAMED = {
    "low rank rho=.25": (1, 0, 0, 0, 1, 0, 0.25),
    "kronecker": (0.5, 0.5, 0, 0.5, 0.5, 0, 0),
    "tensor-train rho=.25": (0.5, 0.5, 0, 0.5, 0.5, 0, 0.25),
    "btt": (0.5, 0, 0.5, 0, 0.5, 0.5, 0),
    "btt rho=.25": (0.5, 0, 0.5, 0, 0.5, 0.5, 0.25),
    "dense A": (1, 0, 0, 1, 0, 0, 0),
    "dense B": (1, 0, 0, 0, 1, 0, 1),
    "exp1": (0.33, 0, 0.67, 0, 0.67, 0.33, 0),
    "exp2": (0.67, 0, 0.33, 0, 0.33, 0.67, 0),
    "low-rank btt": (0.67, 0, 0.33, 0, 0.67, 0.33, 0),
    "exp4": (0.33, 0.67, 0, 0.33, 0.67, 0, 0),
    "generic": (0.5, 0.25, 0.25, 0.25, 0.5, 0.25, 0),
    "generic rho": (0.5, 0.25, 0.25, 0.25, 0.5, 0.25, 0.25),
}


def paper_formulas(t):
    al, be, _, de, ep, _, rh = t
    nu = 1 + rh - min(al, ep)
    omega = min(al + de, be + ep) - min(al, ep)
    psi = min(1, 2 + rh - al - ep)
    return omega, psi, nu


@pytest.mark.parametrize("t", NAMED.values(), ids=NAMED.keys())
def test_named_theta_taxonomy_equals_paper_formulas(t):
    st = es.compile(es.theta(*t), 1024)
    assert not [w for w in st.warnings if w.startswith("theta is")]  # all named points are valid
    assert (st.omega, st.psi, st.nu) == pytest.approx(paper_formulas(t))
    # the alternative forms of THEORY 3 agree
    _, be, ga, de, _, ph, rh = t
    assert st.nu == pytest.approx(rh + max(be + ga, de + ph))
    assert st.psi == pytest.approx(min(1, be + ga + de + ph + rh))


def test_taxonomy_table_values_of_theory_3():
    expect = {  # (omega, psi, nu)
        "dense A": (0, 1, 1),
        "kronecker": (0.5, 1, 0.5),
        "btt": (0, 1, 0.5),
        "btt rho=.25": (0, 1, 0.75),
        "tensor-train rho=.25": (0.5, 1, 0.75),
        "low rank rho=.25": (0, 0.25, 0.25),
    }
    for name, want in expect.items():
        st = es.compile(es.theta(*NAMED[name]), 4096)
        assert (st.omega, st.psi, st.nu) == pytest.approx(want), name


def test_presets_taxonomy():
    assert (es.compile(es.presets.btt(rank=4), 1024).omega, es.compile(es.presets.btt(rank=4), 1024).psi) == (0, 1)
    st = es.compile(es.presets.kron(), 1024)
    assert (st.omega, st.psi, st.nu) == (0.5, 1, 0.5)
    st = es.compile(es.presets.low_rank(rank="d^1/4"), 1024)
    assert (st.omega, st.psi, st.nu) == (0, 0.25, 0.25)
    st = es.compile(es.presets.dense(), 1024)
    assert (st.omega, st.psi, st.nu) == (0, 1, 1)


def test_redundant_theta_warns_and_runs_its_cheaper_order():
    t = (0.2, 0.5, 0.3, 0.5, 0.2, 0.3, 0)  # min(alpha, eps) = .2 < min(beta, delta) = .5
    st = es.compile(es.theta(*t), 1024)
    assert any("redundant" in w for w in st.warnings)
    assert st.order == (1, 0) and st.cores[0].name == "B"
    # B first is really cheaper than the paper's A-first count b g dl f r (a + e)
    s = st.sizes
    a_first = s["b"] * s["g"] * s["d"] * s["f"] * (s["a"] + s["e"])
    assert st.macs < a_first


def test_degenerate_theta_warns():
    st = es.compile(es.theta(0.25, 0.25, 0.5, 0.25, 0.25, 0.5, 0.5), 256)
    assert any("degenerate" in w for w in st.warnings)


def test_theta_sums_within_tolerance_are_accepted():
    st = es.compile(es.theta(0.33, 0.33, 0.33, 0, 0.5, 0.5, 0), 1024)  # alpha+beta+gamma = 0.99
    assert st.macs > 0


@pytest.mark.parametrize(
    "spec, d_in, d_out",
    [
        (es.theta(0.67, 0, 0.33, 0, 0.67, 0.33, 0), 256, 256),  # low-rank BTT: rank below full
        (es.theta(0.67, 0, 0.33, 0, 0.67, 0.33, 0), 1024, 1024),
        (es.theta(0.33, 0, 0.67, 0, 0.67, 0.33, 0), 256, 256),
        (es.theta(0.5, 0.25, 0.25, 0.25, 0.5, 0.25, 0), 256, 256),
        (es.theta(0.5, 0.25, 0.25, 0.25, 0.5, 0.25, 0.25), 256, 256),
        (es.theta(1, 0, 0, 0, 1, 0, 0.25), 256, 256),
        (es.presets.low_rank(rank=7), 64, 96),
        (es.presets.btt(rank=1), 256, 256),
        (es.presets.btt(rank=2), 64, 256),
        (es.presets.kron(), 256, 256),
        (es.presets.tt(rank=2), 256, 256),
        (es.presets.monarch(blocks=4), 256, 256),
        (es.presets.block_diag(blocks=8), 128, 64),
        (es.Spec("ab,A:ac,B:bd->cd", a=4, b=16, c=4, d=4), 64, 16),  # a Kronecker product with a thin factor
    ],
    ids=lambda v: getattr(v, "label", "") or str(v),
)
def test_min_cut_rank_equals_numerical_rank(spec, d_in, d_out):
    st = es.compile(spec, d_in, d_out)
    bound, numeric = es.check_rank(st)
    assert bound == numeric


def test_low_rank_btt_rank_is_below_full():
    st = es.compile(es.theta(0.67, 0, 0.33, 0, 0.67, 0.33, 0), 1024)
    assert (st.sizes["a"], st.sizes["g"]) == (128, 8)
    assert st.rank == 64  # THEORY 3: d^0.6 at d = 1024, though psi = 0.66 symbolically
    assert st.psi == pytest.approx(0.66)


@pytest.mark.parametrize("t", NAMED.values(), ids=NAMED.keys())
@pytest.mark.parametrize("d_in, d_out", [(768, 768), (3072, 3072), (1024, 4096), (4096, 1024)])
def test_named_theta_params_and_macs_match_theory_2(t, d_in, d_out):
    st = es.compile(es.theta(*t), d_in, d_out)
    s = {a: 1 for a in "abgdefr"} | st.sizes  # size-1 axes are dropped from the spec
    a, b, g, dl, e, f, r = (s[k] for k in "abgdefr")
    assert a * b * g == d_in and dl * e * f == d_out
    names = {c.name for c in st.cores}
    params_a, params_b = a * g * dl * f * r, b * g * e * f * r
    if names == {"A", "B"}:
        assert st.params == params_a + params_b
        a_first = b * g * dl * f * r * (a + e)  # THEORY 2's count, A then B
        b_first = g * f * e * r * a * (b + dl)
        assert st.macs == min(a_first, b_first)
        if d_in == d_out:  # valid theta: A first is the cheaper chain
            assert st.macs == a_first and st.order == (0, 1)
    else:  # one core is a scalar (all its axes size 1) and is dropped: a single dense core is left
        assert names == {"A"} and st.params == st.macs == params_a == d_in * d_out
