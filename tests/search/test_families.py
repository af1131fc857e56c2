"""Families as plugins: brace expressions, space files and entry points, the three-core mpo3 family (docs/mpo3.md).

Sizes a space file substitutes are checked against the compiled structure, mpo3's parameter count against its
formula, its sampler against its validity conditions, and every bad space file against a one-line error that
names the family and the key.
"""

import json
import math
import random
import textwrap
from fractions import Fraction
from pathlib import Path

import optuna
import pytest

import einstruct as es
from search.errors import SearchError
from search.families import BUILTIN, Candidate, affine, mpo3
from search.space import make_space, references

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "spaces" / "my_space.toml"


class Fixed:  # replays params like an Optuna trial given enqueued params
    def __init__(self, p):
        self.p = p

    def suggest_categorical(self, k, choices):
        return self.p[k]

    suggest_float = suggest_int = lambda self, k, lo, hi: self.p[k]


# ---------------------------------------------------------------- brace expressions


@pytest.mark.parametrize(
    "text, values, want",
    [
        ("rank", {"rank": 4}, Fraction(4)),
        ("1-x", {"x": 0.37}, Fraction(63, 100)),
        ("2*x + 1/4", {"x": 0.5}, Fraction(5, 4)),
        ("(x + y)/2", {"x": 0.25, "y": 0.5}, Fraction(3, 8)),
        ("-x+1", {"x": 0.25}, Fraction(3, 4)),
        ("x*3 - (y - 1)/4", {"x": 1, "y": 5}, Fraction(2)),
    ],
)
def test_brace_expressions_are_exact_affine_values(text, values, want):
    assert affine.parse(text).value(values) == want


@pytest.mark.parametrize(
    "text, needle",
    [
        ("x*y", "multiplies two parameters"),
        ("x/y", "divides by a parameter"),
        ("1/0", "by zero"),
        ("(x", "unclosed parenthesis"),
        ("x 1", "should end"),
        ("__import__('os')", "not a number, a name"),
        ("", "empty brace"),
    ],
)
def test_brace_expressions_that_are_not_affine_are_refused(text, needle):
    with pytest.raises(affine.ExprError, match=needle):
        affine.parse(text)


def test_substituted_values_round_trip():
    x = 0.30102240537401403
    text = affine.substitute("d_in^{x}", {"x": x})
    assert float(text.split("^")[1]) == x and "e" not in text  # every digit, never exponent notation
    assert affine.substitute("d_in^{1-x}", {"x": 0.25}) == "d_in^0.75"
    assert affine.substitute("{2*rank}", {"rank": 2}) == "4"  # an integer stays one
    assert affine.substitute("d^{x}", {"x": 1e-7}) == "d^0.0000001"


# ---------------------------------------------------------------- space files


def test_example_space_file_builds_the_declared_structures():
    sp = make_space(str(EXAMPLE), (64, 256))
    assert sp.families == ("dense", "btt", "tt3", "skewed")
    assert [r.label for r in references(sp)] == ["dense", "btt(r=1)", "tt3(rank=2)"]
    tt3, skewed = sp.family("tt3"), sp.family("skewed")
    assert (tt3.label, tt3.group, skewed.group) == ("TT-3", "TT-3", "skewed")
    st = es.compile(Candidate.of(tt3, 64, {"rank": 4}).spec(), 64)
    assert [st.sizes[a] for a in "abcdef"] == [4] * 6 and st.sizes["r"] == st.sizes["s"] == 4
    assert st.params == 4 * 4 * 4 + 4 * 4 * 4 * 4 + 4 * 4 * 4  # G1 (a,d,r), G2 (b,e,s,r), G3 (c,f,s)
    spec = Candidate.of(skewed, 256, {"x": 0.25}).spec()
    assert {a: str(s) for a, s in spec.sizes.items()} == {
        "g": "d_in^1/4",
        "a": "d_in^3/4",
        "f": "d_out^3/4",
        "e": "d_out^1/4",
    }
    st = es.compile(spec, 256)
    assert (st.sizes["g"], st.sizes["a"]) == (4, 64)


def test_user_families_sample_round_trip_and_fill_the_csv_columns():
    sp = make_space(str(EXAMPLE), (64,))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        cand = sp.suggest(trial)
        study.tell(trial, 1.0)
        seen.add(cand.family)
        assert sp.suggest(Fixed(sp.params_for(cand))) == cand
        cols = cand.columns()
        assert cols["family"] == cand.family and json.loads(cols["family_params"]) == cand.arguments
        assert Candidate.from_row({**cols, "width": "64"}, sp.by_name()) == cand
        if cand.family == "skewed":
            assert 0.25 <= trial.params["skewed.x"] <= 0.75  # namespaced: families never share a parameter
        if cand.family == "tt3":
            assert trial.params["tt3.rank"] in (1, 2, 4) and cols["group"] == "TT-3"
    assert seen == {"dense", "btt", "tt3", "skewed"}


def _space(tmp_path, text: str) -> str:
    path = tmp_path / "s.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


GOOD = """
[families.f]
spec = "ga,gaf,fge->fe"
sizes = { g = "d_in^{x}", a = "d_in^{1-x}", f = "d_out^{1-x}", e = "d_out^{x}" }
params = { x = { low = 0.25, high = 0.75 } }
"""


@pytest.mark.parametrize(
    "old, new, needle",
    [
        ('e = "d_out^{x}"', 'e = "d_out^{y}"', "family f, key sizes.e: {y} names no parameter (declared: x)"),
        ('e = "d_out^{x}"', 'e = "d_out^{x*x}"', "family f, key sizes.e: 'x*x' multiplies two parameters"),
        ("high = 0.75", "high = 0.1", "family f, key params.x: low = 0.25 must be below high = 0.1"),
        ("{ low = 0.25, high = 0.75 }", '"a"', "family f, key params.x: give a list of choices"),
        ("{ low = 0.25, high = 0.75 }", "[]", "family f, key params.x: a list of choices must hold"),
        ('spec = "ga,gaf,fge->fe"', 'spec = "ga,gaf,fgq->fe"', "family f, key spec:"),
        ('spec = "ga,gaf,fge->fe"', "", "family f, key spec: missing or not a string"),
        ('spec = "ga,gaf,fge->fe"', 'spec = "ga,gaf,fge->fe"\ncolour = 1', "family f, key colour: unknown key"),
        ("[families.f]", "[families.btt]", "family btt is a built-in family; include it"),
        ("[families.f]", 'include = ["nope"]\n[families.f]', "key include: 'nope' is not a built-in family"),
        ("[families.f]", 'references = [{ family = "f", x = 2 }]\n[families.f]', "family f, key references.x:"),
        ("[families.f]", "[families.f\n", "is not valid TOML"),
    ],
)
def test_space_file_errors_are_one_line_naming_family_and_key(tmp_path, old, new, needle):
    assert old in GOOD
    path = _space(tmp_path, GOOD.replace(old, new))
    with pytest.raises(SearchError) as e:
        make_space(path, (64,))
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and msg.startswith(f"space file {path}")


def test_missing_space_file_and_bad_entry_points_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(SearchError, match="no space file"):
        make_space(str(tmp_path / "none.toml"), (64,))
    with pytest.raises(SearchError, match="cannot import no_such_module_x"):
        make_space("no_such_module_x:SPACE", (64,))
    (tmp_path / "spacemod_err.py").write_text("SPACE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SearchError, match="has no OTHER"):
        make_space("spacemod_err:OTHER", (64,))
    with pytest.raises(SearchError, match="give a dict"):
        make_space("spacemod_err:SPACE", (64,))


def test_entry_point_takes_a_dict_or_families(tmp_path, monkeypatch):
    (tmp_path / "spacemod_ok.py").write_text(
        textwrap.dedent(
            """
            import einstruct as es
            from search.families import Family

            class LowRank(Family):
                name, label, keys = "lr", "LR", ("rank",)
                def suggest(self, trial):
                    return {"rank": trial.suggest_categorical("lr.rank", [1, 2])}
                def params_for(self, args):
                    return {"lr.rank": args["rank"]}
                def build(self, args):
                    return es.presets.low_rank(rank=args["rank"])

            SPACE = ["dense", LowRank()]
            TABLE = {"families": {"kr": {"spec": "ab,ac,bd->cd",
                     "sizes": {"a": "d_in^1/2", "b": "d_in^1/2", "c": "d_out^1/2", "d": "d_out^1/2"}}}}
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sp = make_space("spacemod_ok:SPACE", (64,))
    assert sp.families == ("dense", "lr")
    cand = sp.suggest(Fixed({"family": "lr", "width": 64, "lr.rank": 2}))
    assert es.compile(cand.spec(), 64).params == 2 * 2 * 64 and cand.group == "LR"
    kr = make_space("spacemod_ok:TABLE", (64,))
    assert es.compile(kr.suggest(Fixed({"width": 64})).spec(), 64).params == 2 * 8 * 8


# ---------------------------------------------------------------- mpo3, the three-core family


def test_mpo3_samples_are_all_valid_and_round_trip():
    fam, rng = BUILTIN["mpo3"], random.Random(0)
    names = [f"mpo3.{u}" for u in mpo3.UNITS]
    for _ in range(3000):
        units = [rng.random() for _ in range(6)]
        t = fam.suggest(Fixed(dict(zip(names, units))))
        assert mpo3.why_invalid(t) == "", t
        again = fam.suggest(Fixed(fam.params_for(t)))
        assert all(abs(again[k] - t[k]) <= 0.0015 for k in mpo3.KEYS), (t, again)
    for edge in ([0.5, 0.5, 0.3, 0.3, 1, 1], [1, 1, 0, 0, 1, 0], [0, 1, 0, 1, 1, 1]):  # rounding's corners
        assert mpo3.why_invalid(fam.suggest(Fixed(dict(zip(names, edge))))) == ""


def _mpo3(*v):
    return dict(zip(mpo3.KEYS, v))


def test_mpo3_parameter_count_and_cost_follow_docs_formulas():
    fam = BUILTIN["mpo3"]
    for t in (
        _mpo3(0.333, 0.333, 0.334, 0.333, 0.333, 0.334, 0.25, 0.25),
        _mpo3(0.5, 0.25, 0.25, 0.25, 0.25, 0.5, 0.5, 0.25),
        _mpo3(0.25, 0.5, 0.25, 0.5, 0.25, 0.25, 0.0, 0.5),
    ):
        assert mpo3.why_invalid(t) == ""
        st = es.compile(fam.build(t), 256)
        a, b, c, d, e, f = (st.sizes.get(k, 1) for k in "abcdef")
        r, s = st.sizes.get("r", 1), st.sizes.get("s", 1)
        assert st.params == a * d * r + b * e * r * s + c * f * s  # docs/mpo3.md section 1
        left = a * b * c * d * r + b * c * d * r * e * s + c * d * e * s * f  # G1, G2, G3
        right = a * b * c * f * s + a * b * f * s * e * r + a * f * e * r * d  # G3, G2, G1
        assert st.macs <= min(left, right)  # the plan takes the cheapest chain order


def test_mpo3_invalid_points_are_rejected_before_training():
    fam = BUILTIN["mpo3"]
    for t, why in (
        (_mpo3(0.25, 0.5, 0.25, 0.25, 0.5, 0.25, 0.6, 0.3), "bond r"),  # rho1 > alpha1 + eps1
        (_mpo3(0.5, 0.0, 0.5, 0.5, 0.0, 0.5, 0.2, 0.2), "middle core"),  # alpha2 + eps2 = 0
        (_mpo3(0.25, 0.1, 0.65, 0.25, 0.1, 0.65, 0.5, 0.0), "bond s"),  # |rho1 - rho2| > alpha2 + eps2
    ):
        with pytest.raises(es.SpecError, match=why):
            fam.build(t)


def test_a_degenerate_bond_buys_no_rank():
    """docs/mpo3.md section 2: past rho1 = alpha1 + eps1 the bond r adds parameters and cost but no rank."""
    at = _mpo3(0.25, 0.5, 0.25, 0.25, 0.5, 0.25, 0.5, 0.5)  # rho1 = alpha1 + eps1: the bound
    spec_over = es.Spec(
        mpo3.EINSUM,
        a="d_in^1/4",
        b="d_in^1/2",
        c="d_in^1/4",
        d="d_out^1/4",
        e="d_out^1/2",
        f="d_out^1/4",
        r="d^3/4",  # rho1 = 0.75 > 0.5
        s="d^1/2",
    )
    st_at, st_over = es.compile(BUILTIN["mpo3"].build(at), 256), es.compile(spec_over, 256)
    assert st_over.rank == st_at.rank and math.isclose(st_over.psi, st_at.psi)
    assert st_over.params > st_at.params and st_over.macs > st_at.macs


def test_mpo3_is_opt_in():
    assert "mpo3" not in make_space("full", (64,)).families
    sp = make_space("mpo3", (64,))
    assert sp.families == ("mpo3", "dense")
    labels = [r.label for r in references(sp)]
    assert labels[0] == "dense" and len(labels) == 3
    for ref in references(sp):
        es.compile(ref.at(64).structure_spec(), 64)  # every reference builds


def test_mpo3_named_point_kronecker3_matches_docs():
    """docs/mpo3.md section 1: Kronecker with three factors has params 3 d^(2/3), MACs 3 d^(4/3), (2/3, 1, 1/3)."""
    st = es.compile(BUILTIN["mpo3"].build(_mpo3(*(1 / 3,) * 6, 0.0, 0.0)), 4096)
    assert (st.params, st.macs) == (3 * 16**2, 3 * 4096 * 16)
    assert (st.omega, st.psi, st.nu) == pytest.approx((2 / 3, 1.0, 1 / 3))


def test_readme_space_file_is_the_example_file():
    import re
    import sys

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    block = re.findall(r"```toml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(block) == 1
    assert tomllib.loads(block[0]) == tomllib.loads(EXAMPLE.read_text())
