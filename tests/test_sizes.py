"""Size monomials: parsing and the exact-factorisation rule of THEORY 2."""

import math
from fractions import Fraction

import pytest

import einstruct as es
from einstruct.resolve import best_split
from einstruct.sizes import parse_size


@pytest.mark.parametrize(
    "text, d_in, d_out, value",
    [
        ("32", 7, 9, 32),
        ("d_in^1/2", 1024, 4096, 32),
        ("d_out^1/2", 1024, 4096, 64),
        ("d_out/4", 1024, 4096, 1024),
        ("d/16", 1024, 4096, 64),
        ("d/16", 8192, 4096, 256),
        ("2*d^0.25", 256, 256, 8),
        ("d_in**(1/3)", 512, 1, 8),
        ("d^1/2/4", 4096, 4096, 16),
        (" ( d_out ) ", 3, 5, 5),
    ],
)
def test_parse_and_value(text, d_in, d_out, value):
    assert parse_size(text).value(d_in, d_out) == pytest.approx(value)


def test_exponent_and_str_round_trip():
    s = parse_size("d_in^1/2")
    assert s.exponent() == Fraction(1, 2)
    assert parse_size(str(s)) == s
    assert parse_size("d^0") == parse_size(1)  # exponent 0 is the constant 1


def test_best_split_minimises_squared_log_error_and_breaks_ties_to_earlier_axis():
    # 2048 = 2^11 has no integer square root: 64 x 32 and 32 x 64 tie; the earlier axis gets 64.
    t = math.log(2048) / 2
    assert best_split(2048, (t, t))[1] == (64, 32)
    # brute force over all ordered pairs agrees with the search on a composite number
    n, targets = 3072, (math.log(40.0), math.log(76.8))
    brute = min(
        ((math.log(f) - targets[0]) ** 2 + (math.log(n // f) - targets[1]) ** 2, -f, (f, n // f))
        for f in range(1, n + 1)
        if n % f == 0
    )
    assert best_split(n, targets)[1] == brute[2]


@pytest.mark.parametrize("d", [768, 1000, 1024, 3072, 4096, 6144])
def test_input_axes_multiply_to_d_in_exactly(d):
    for spec in (es.presets.btt(2), es.presets.kron(), es.theta(0.33, 0, 0.67, 0, 0.67, 0.33, 0)):
        st = es.compile(spec, d, 2 * d)
        sizes = st.sizes
        assert math.prod(sizes[a] for a in spec.x) == st.d_in_padded
        assert math.prod(sizes[a] for a in spec.y) == st.d_out_padded
        assert not st.padded  # every d here has an exact split within 2x of the targets


def test_reference_rounding_mistake_is_not_repeated():
    # THEORY 2: rounding .33/.67 sizes separately at d=256 gives 6*41 = 246; we split 256 exactly.
    st = es.compile(es.theta(0.33, 0, 0.67, 0, 0.67, 0.33, 0), 256)
    assert st.sizes["a"] * st.sizes["g"] == 256


def test_padding_is_reported_counted_and_bounded():
    st = es.compile(es.presets.monarch(blocks=3), 1000)  # 3 does not divide 1000
    assert (st.d_in_padded, st.d_out_padded) == (1002, 1002)
    assert any("padded 1000 -> 1002" in w for w in st.warnings)
    assert st.macs == 2 * 3 * 334 * 3 * st.sizes["r"]  # the padded sizes are what is counted
    with pytest.raises(es.SpecError, match="padding more than"):
        es.compile(es.presets.block_diag(blocks=64), 1000, pad_tolerance=0.01)


def test_integer_sizes_are_taken_as_given_not_fitted():
    with pytest.raises(es.SpecError, match="multiply to 512, not d_in=1024"):
        es.compile(es.Spec("ga,gae->ge", g=32, a=16, e="d_out/32"), 1024)


def test_bond_rounds_half_up():
    # r = d/b^2 with b = 2 at d = 2 * 3 = 6: 1.5 rounds up to 2 (Python's round would give 2; check 2.5 -> 3)
    st = es.compile(es.Spec("i,ir,ro->o", i="d_in", o="d_out", r="d/4"), 10)
    assert st.sizes["r"] == 3  # 2.5 -> 3, where round() would give 2
