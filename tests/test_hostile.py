"""Hostile input, fuzzed: specs, sizes, theta and layer arguments either work or raise SpecError (or, for
tensors too large for the memory limit, MemoryLimitError), nothing else.

Property tests (hypothesis, derandomized so CI is deterministic) feed random and malformed input through
es.Spec, es.theta, es.compile and es.StructuredLinear. A failure that is not a SpecError with a one-line
message naming the problem is a bug. Valid random specs, built as einsums with sized axes, must compile
and run as the matrix they declare: the layer equals torch.einsum over its cores and x @ to_dense().T.
EINSTRUCT_FUZZ_SCALE=10 runs ten times as many examples.
"""

import contextlib
import math
import os
import time
from decimal import Decimal
from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import einstruct as es
from einstruct import limits
from einstruct.sizes import Size

SCALE = float(os.environ.get("EINSTRUCT_FUZZ_SCALE", "1"))
SMALL_MEMORY = 2**26  # 64 MiB: anything larger is refused quickly instead of allocated


def fuzz(n: int):
    return settings(
        max_examples=max(1, int(n * SCALE)),
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


@contextlib.contextmanager
def memory_limit(n_bytes):
    old = limits.MAX_BYTES
    limits.MAX_BYTES = n_bytes
    try:
        yield
    finally:
        limits.MAX_BYTES = old


def spec_error_or(fn):
    """fn() or None when it raised SpecError (or MemoryLimitError) with a useful one-line message; anything else
    fails the test."""
    try:
        return fn()
    except (es.SpecError, es.MemoryLimitError) as e:
        msg = str(e)
        assert isinstance(e, ValueError)
        assert len(msg) >= 20 and "\n" not in msg, f"unhelpful SpecError message: {msg!r}"
        return None


# ---- strategies --------------------------------------------------------------------------------------

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.binary(max_size=6),
    st.fractions(),
    st.decimals(allow_nan=True),
    st.complex_numbers(),
    st.lists(st.integers(0, 9), max_size=3),
    st.just(object()),
    st.just(Size(Fraction(0))),
    st.just(Size(Fraction(2), "d_zz", Fraction(1))),
    st.just(Size(Fraction(1, 3))),
)
SIZE_TEXT = st.one_of(
    st.text(alphabet="d_inout^/*()0123456789.-+ eE", max_size=18),
    st.builds(
        lambda coef, base, exp, div: f"{coef}{base}{exp}{div}",
        st.sampled_from(["", "2*", "0*", "0.5*", "1/3*", "1/0*", "99999999999999999999999*", "-1*", ".*", "1e5*"]),
        st.sampled_from(["d_in", "d_out", "d", "D", "d_", "x", "d_inn"]),
        st.sampled_from(
            [
                "",
                "^1/2",
                "^0.25",
                "**(1/3)",
                "^(1/2",
                "^-1",
                "^0",
                "^9",
                "^1/0",
                "^4",
                "^0.0000001",
                "^.5",
                "^1/2/3",
                "^^2",
                "**",
            ]
        ),
        st.sampled_from(["", "/4", "/0", "/16", "/", "/-2", "/99999999999999999999"]),
    ),
)
SIZES = st.one_of(JUNK, SIZE_TEXT, st.integers(-3, 70), st.sampled_from(["d_in", "d_out", "d", "d_in^1/2"]))
EINSUM_TEXT = st.text(alphabet="abcxyAB,->: ._1é\n", max_size=28)
DIMS = st.one_of(JUNK, st.integers(-3, 300), st.sampled_from([64, 96, 128, 2**24, 2**24 + 1, 10**7]))


# ---- valid random specs and near misses ---------------------------------------------------------------


@st.composite
def valid_parts(draw):
    """(einsum, sizes, d_in, d_out): a random valid einsum of 1-3 cores over input, output, block, bond axes."""
    letters = draw(st.permutations("abcdefghijkmnpqrstuvw"))
    n_in, n_out, n_blk = draw(st.integers(0, 2)), draw(st.integers(0, 2)), draw(st.integers(0, 1))
    if n_in + n_blk == 0:
        n_in = 1
    if n_out + n_blk == 0:
        n_out = 1
    k = draw(st.integers(1, 3))
    n_bond = draw(st.integers(0, 2)) if k > 1 else 0
    it = iter(letters)
    ins, outs, blks, bonds = ([next(it) for _ in range(n)] for n in (n_in, n_out, n_blk, n_bond))
    cores = [set() for _ in range(k)]
    for a in ins + outs:
        cores[draw(st.integers(0, k - 1))].add(a)
    for a in bonds:
        i, j = draw(st.lists(st.integers(0, k - 1), min_size=2, max_size=2, unique=True))
        cores[i].add(a)
        cores[j].add(a)
    for c in cores:
        c.update(draw(st.lists(st.sampled_from(ins + outs + blks), max_size=2)))
        if not c & set(ins + outs + blks):  # anchored to x or y, so no core floats
            c.add(draw(st.sampled_from(ins + outs + blks)))
    sizes = {a: draw(st.integers(2, 3)) for a in ins + outs + blks + bonds}
    x = "".join(draw(st.permutations(ins + blks)))
    y = "".join(draw(st.permutations(outs + blks)))
    d_in, d_out = math.prod(sizes[a] for a in x), math.prod(sizes[a] for a in y)
    given_sizes = dict(sizes)
    if ins and draw(st.booleans()):  # one input axis as a monomial in d_in that resolves exactly
        a = ins[0]
        given_sizes[a] = f"d_in/{d_in // sizes[a]}"
    for b in bonds:
        if draw(st.booleans()):
            given_sizes[b] = draw(st.sampled_from(["d^1/2", "d/4", "d_in^1/3", "2*d_out^1/4"]))
    axes = [("".join(draw(st.permutations(sorted(c))))) for c in cores]
    return x + "," + ",".join(axes) + "->" + y, given_sizes, d_in, d_out


valid_specs = valid_parts().map(lambda p: (es.Spec(p[0], sizes=p[1]), p[2], p[3]))


@st.composite
def mutated_parts(draw):
    """A valid (einsum, sizes) with a few random edits: near-misses reach deeper checks than random text."""
    einsum, sizes, d_in, d_out = draw(valid_parts())
    sizes = dict(sizes)
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(["delete", "insert", "swap", "resize", "unsize", "extra"]))
        if kind == "delete" and einsum:
            i = draw(st.integers(0, len(einsum) - 1))
            einsum = einsum[:i] + einsum[i + 1 :]
        elif kind == "insert":
            i = draw(st.integers(0, len(einsum)))
            einsum = einsum[:i] + draw(st.sampled_from(list("abcxyz,->:.1 ") + ["->", "R:"])) + einsum[i:]
        elif kind == "swap" and len(einsum) > 1:
            i = draw(st.integers(0, len(einsum) - 2))
            einsum = einsum[:i] + einsum[i + 1] + einsum[i] + einsum[i + 2 :]
        elif kind == "resize" and sizes:
            sizes[draw(st.sampled_from(sorted(sizes)))] = draw(SIZES)
        elif kind == "unsize" and sizes:
            del sizes[draw(st.sampled_from(sorted(sizes)))]
        elif kind == "extra":
            sizes[draw(st.sampled_from("abcxyz"))] = draw(SIZES)
    return einsum, sizes, d_in, d_out


# ---- malformed and random input: SpecError only -------------------------------------------------------

RANDOM_PARTS = st.tuples(
    st.one_of(EINSUM_TEXT, JUNK),
    st.dictionaries(st.sampled_from("abcxyABz"), SIZES, max_size=6),
    st.sampled_from([8, 16, 36, 64, 18]),
    st.sampled_from([8, 16, 48, 64, 27]),
)


@fuzz(1200)
@given(parts=st.one_of(RANDOM_PARTS, mutated_parts(), mutated_parts()))
@example(parts=("i,io->o", {"i": "d_in", "o": Size(Fraction(0), "d_out", Fraction(1))}, 64, 64))
@example(parts=("ab,abc->c", {"a": "d_in^1/2", "b": "d_in^1/2", "c": "d_out\n"}, 64, 64))
@example(parts=("a,ab,a->b", {"a": 2, "b": 2}, 2, 2))  # last step (K, M)-transposed with the bias fused
def test_random_specs_compile_or_raise_spec_error(parts):
    einsum, sizes, d_in, d_out = parts
    spec = spec_error_or(lambda: es.Spec(einsum, sizes=sizes))
    if spec is None:
        return
    assert isinstance(str(spec), str)
    structure = spec_error_or(lambda: es.compile(spec, d_in, d_out))
    if structure is None:
        return
    event("compiled")
    assert structure.params > 0 and structure.macs > 0 and structure.rank >= 1
    assert isinstance(structure.table(), str)
    with memory_limit(SMALL_MEMORY):
        layer = spec_error_or(lambda: es.StructuredLinear(d_in, d_out, spec, dtype=torch.float64))
        if layer is None:
            return
        event("ran")
        x = torch.randn(2, d_in, dtype=torch.float64)
        y = layer(x)
        torch.testing.assert_close(y, x @ layer.to_dense().T + layer.bias, rtol=1e-9, atol=1e-9)
        if not structure.padded:
            torch.testing.assert_close(y, reference(layer, x) + layer.bias, rtol=1e-9, atol=1e-9)


@fuzz(300)
@given(
    sizes=st.one_of(JUNK, st.integers(), st.text(max_size=5), st.lists(st.tuples(st.text(max_size=2), SIZES))),
    names=st.one_of(JUNK, st.lists(st.one_of(st.text(max_size=4), JUNK), max_size=3)),
    label=JUNK,
)
@example(sizes=5, names=None, label="")  # was a TypeError from dict(5)
@example(sizes="ab", names=None, label="")  # was a ValueError from dict("ab")
@example(sizes={"i": "d_in", "o": "d_out"}, names=None, label=7)  # was a TypeError in str(spec)
def test_spec_arguments_of_the_wrong_type(sizes, names, label):
    spec = spec_error_or(lambda: es.Spec("i,io->o", names=names, sizes=sizes, label=label))
    if spec is not None:
        assert str(spec) and spec.einsum == "i,io->o"


@fuzz(700)
@given(size=SIZES, d=st.sampled_from([16, 60, 64, 1000]))
@example(size=Size(Fraction(0), "d_out", Fraction(1)), d=64)  # was math domain error in resolve
@example(size=Size(Fraction(-3)), d=64)  # a negative constant Size was accepted
@example(size="\u0661\u0662", d=64)  # Arabic-Indic digits were read as 12
@example(size="99999999999999999999999*d^4", d=1000)  # 1e35-element core: refused, not overflowed
def test_any_size_value_gives_a_spec_or_a_spec_error(size, d):
    for make in (
        lambda: es.Spec("i,ir,ro->o", i="d_in", o="d_out", r=size),
        lambda: es.Spec("ab,abo->o", a=size, b="d_in^1/2", o="d_out"),
        lambda: es.Spec("ga,gae->ge", g=size, a="d_in/4", e="d_out/4"),
    ):
        spec = spec_error_or(make)
        if spec is not None:
            st_ = spec_error_or(lambda: es.compile(spec, d))  # noqa: B023 (called at once)
            if st_ is not None:
                event("compiled")
                assert all(isinstance(v, int) and v >= 1 for v in st_.sizes.values())
                assert st_.params <= limits.MAX_ELEMENTS * len(st_.cores)


THETA_ENTRY = st.one_of(
    st.floats(0, 1),
    st.fractions(0, 1, max_denominator=10**30),
    st.sampled_from([0, 1, 0.5, "0.5", "1/3", " 1 "]),
    JUNK,
    st.text(alphabet="0123456789./eE+-", max_size=12),
    st.sampled_from(["1e-1000000000", "1e400", "nan", "inf", "1/0", "0x1", "1_0", "½", "0.5" * 20]),
    st.sampled_from([5e-324, 1e-300, float("nan"), float("-inf"), Decimal("0.5"), Decimal("1e-999999")]),
)


@st.composite
def theta_points(draw):
    """Valid theta: two 3-simplices (on a grid of 1/12, or any float) and rho in [0, 1]."""

    def simplex():
        if draw(st.booleans()):
            a = draw(st.integers(0, 12))
            b = draw(st.integers(0, 12 - a))
            return [Fraction(a, 12), Fraction(b, 12), Fraction(12 - a - b, 12)]
        u, v = sorted(draw(st.lists(st.floats(0, 1), min_size=2, max_size=2)))
        return [u, v - u, 1 - v]

    al, be, ga = simplex()
    de, ep, ph = simplex()
    return [al, be, ga, de, ep, ph, draw(st.sampled_from([0, Fraction(1, 4), Fraction(1, 2), 1]))]


@st.composite
def theta_near_misses(draw):
    t = draw(theta_points())
    for i in draw(st.lists(st.integers(0, 6), max_size=2)):
        t[i] = draw(THETA_ENTRY)
    return t


@fuzz(600)
@given(
    t=st.one_of(st.lists(THETA_ENTRY, min_size=7, max_size=7), theta_near_misses()),
    d=st.sampled_from([16, 36, 64, 100]),
)
@example(t=["1e-1000000000", 0, 1, 0, 1, 0, 0], d=64)  # hung: Fraction computed 10**1000000000
@example(t=[5e-324, 0, 1, 0, 1, 0, 0], d=64)  # OverflowError in the min-cut (huge exponent denominators)
@example(t=[Fraction(1, 10**50), 0, 1 - Fraction(1, 10**50), 0, 1, 0, 0], d=64)  # was "107 characters long"
def test_any_theta_gives_a_structure_or_a_spec_error(t, d):
    t0 = time.perf_counter()
    spec = spec_error_or(lambda: es.theta(*t))
    if spec is not None:
        st_ = spec_error_or(lambda: es.compile(spec, d))
        if st_ is not None:
            event("compiled")
            # theta sums may be off by 0.01, so psi (the min cut) may be 1.01
            assert 0 <= st_.psi <= 1.01 + 1e-9 and math.isfinite(st_.omega) and math.isfinite(st_.nu)
    assert time.perf_counter() - t0 < 10


@fuzz(250)
@given(t=theta_points(), d=st.sampled_from([16, 64, 144, 256]))
def test_valid_theta_compiles_or_explains(t, d):
    """A valid theta is a valid einsum: it compiles unless d cannot be split near its axis sizes."""
    spec = es.theta(*t)
    st_ = spec_error_or(lambda: es.compile(spec, d))
    if st_ is not None:
        assert st_.d_in_padded >= d and st_.params > 0


@fuzz(500)
@given(
    d_in=DIMS,
    d_out=st.one_of(st.none(), DIMS),
    pad=st.one_of(st.floats(allow_nan=True), JUNK),
    preset=st.sampled_from(["dense", "btt", "monarch", "kron", "low_rank", "block_diag", "tt", "nope", 3]),
)
@example(d_in=10**7, d_out=None, pad=0.15, preset="dense")
def test_any_layer_dimensions_compile_or_raise_spec_error(d_in, d_out, pad, preset):
    t0 = time.perf_counter()
    spec_error_or(lambda: es.compile(preset, d_in, d_out, pad_tolerance=pad))
    assert time.perf_counter() - t0 < 10


LAYER_DIMS = st.one_of(st.sampled_from([8, 16, 18, 32, 36, 64, 100, 128, 4096]), st.integers(1, 200), DIMS)


@fuzz(300)
@given(
    d_in=LAYER_DIMS,
    d_out=LAYER_DIMS,
    preset=st.sampled_from(["dense", "btt", "monarch", "low_rank", "block_diag"]),
    kwargs=st.fixed_dictionaries(
        {},
        optional={
            "bias": st.booleans(),
            "zero_init": st.booleans(),
            "normalize": st.booleans(),
            "init_scale": st.one_of(
                st.none(), st.floats(0.001, 2), st.floats(allow_nan=True, allow_infinity=True), JUNK
            ),
            "low_rank_init": st.booleans(),
            "dtype": st.sampled_from([None, None, torch.float64, torch.bfloat16, torch.int64, "float"]),
            "pad_tolerance": st.one_of(st.floats(0, 1), JUNK),
        },
    ),
)
def test_any_structured_linear_arguments(d_in, d_out, preset, kwargs):
    with memory_limit(SMALL_MEMORY):
        layer = spec_error_or(lambda: es.StructuredLinear(d_in, d_out, preset, **kwargs))
        if layer is None:
            return
        x = torch.randn(3, d_in, dtype=getattr(layer, layer.core_names[0]).dtype)
        y = spec_error_or(lambda: layer(x))
        if y is not None:
            event("ran")
            assert y.shape == (3, d_out) and torch.isfinite(y).all()


@fuzz(100)
@given(shape=st.lists(st.integers(0, 5), max_size=3), last=st.integers(0, 40))
def test_forward_with_the_wrong_input_shape(shape, last):
    layer = es.StructuredLinear(16, 8, "btt")
    x = torch.randn(*shape, last)
    y = spec_error_or(lambda: layer(x))
    if y is not None:
        assert last == 16 and y.shape == (*shape, 8)


# ---- valid random specs run as the matrix they declare ---------------------------------------------


def reference(layer, x):
    """y by one torch.einsum over the layer's (effective) cores: independent of the planned chain."""
    st_ = layer.structure
    spec, sizes = st_.spec, st_.sizes
    rows = next(c for c in "ZYXWV" if c not in spec.einsum)
    cores = layer.effective_cores()
    names = [c.name for c in st_.cores]
    by_name = {c.name: c.axes for c in spec.cores}
    expr = rows + spec.x + "," + ",".join(by_name[n] for n in names) + "->" + rows + spec.y
    xs = x.reshape(x.shape[0], *[sizes[a] for a in spec.x])
    y = torch.einsum(expr, xs, *[cores[n] for n in names])
    return y.reshape(x.shape[0], -1)


@fuzz(350)
@given(case=valid_specs, normalize=st.booleans(), n=st.integers(1, 4))
def test_valid_random_specs_compile_and_match_their_matrix(case, normalize, n):
    spec, d_in, d_out = case
    st_ = es.compile(spec, d_in, d_out)
    assert (st_.d_in_padded, st_.d_out_padded) == (d_in, d_out)
    assert st_.flops == 2 * st_.macs and st_.params == sum(math.prod(c.shape) for c in st_.cores)
    layer = es.StructuredLinear(d_in, d_out, spec, bias=False, normalize=normalize, dtype=torch.float64)
    x = torch.randn(n, d_in, dtype=torch.float64)
    y = layer(x)
    torch.testing.assert_close(y, reference(layer, x), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(y, x @ layer.to_dense().T, rtol=1e-9, atol=1e-9)
    assert st_.rank <= min(d_in, d_out)


# ---- resource limits ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec", ["dense", es.presets.btt(rank=4), es.presets.low_rank(rank="d^1/2")], ids=["dense", "btt4", "low_rank_sqrt"]
)
def test_huge_layer_is_refused_with_its_size_before_allocating(spec):
    t0 = time.perf_counter()
    with pytest.raises(
        es.MemoryLimitError,
        match=r"parameters of StructuredLinear\(10000000 -> 10000000.*need [0-9.]+ "
        r"[TGP]iB \([0-9.e+]+ bytes\), more than the",
    ):
        es.StructuredLinear(10**7, 10**7, spec)
    assert time.perf_counter() - t0 < 5


def test_the_limit_counts_dtype_and_device():
    with memory_limit(10**6):  # 1 MB: a 256x256 dense layer is 256 KiB in float32, 512 KiB in float64
        es.StructuredLinear(256, 256, "dense", dtype=torch.float64)
        with pytest.raises(es.MemoryLimitError, match="more than the 977 KiB"):
            es.StructuredLinear(512, 512, "dense")
        es.StructuredLinear(10**4, 10**4, "dense", device="meta")  # nothing is allocated on meta


def test_forward_whose_intermediates_cannot_fit_is_refused_before_running():
    layer = es.StructuredLinear(64, 64, es.presets.btt(rank=4))
    x = torch.zeros(1, 64).expand(10**12, 64)  # a stride-0 view: no memory until the forward copies it
    t0 = time.perf_counter()
    with pytest.raises(es.MemoryLimitError, match=r"intermediates of the forward .* for 1000000000000 rows need .*iB"):
        layer(x)
    assert time.perf_counter() - t0 < 5
    with memory_limit(10**4):
        with pytest.raises(es.MemoryLimitError, match="dense matrix"):
            layer.to_dense()
        with pytest.raises(es.MemoryLimitError, match="for 64 rows"):
            layer(torch.randn(64, 64))
        layer(torch.randn(2, 64))  # small batches still run


def test_compile_refuses_cores_no_tensor_can_hold():
    spec = es.Spec("i,ir,ro->o", i="d_in", o="d_out", r="99999999999999999999999999999999*d^4")
    with pytest.raises(es.SpecError, match=r"core G1 \('ir'\) .* has [0-9.]+e\+\d+ elements .*EiB"):
        es.compile(spec, 2**24)
