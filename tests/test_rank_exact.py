"""st.rank is the exact min-cut bound (issue 14, defect 3): equal to the numerical rank of the matrix.

The old cut came from float log capacities and was sometimes read off the wrong side of the residual
graph: rank 1 for full-rank layers in about 1% of theta x size cases, nearly all rectangular.
"""

import itertools
import math
import random
import string

import pytest

import einstruct as es
from einstruct import network


@pytest.mark.parametrize(
    "spec, d_in, d_out, want",
    [
        (es.theta(0.25, 0, 0.75, 0, 0.75, 0.25, 0), 64, 256, 64),
        (es.Spec("iqg,iqmegr->mre", i=2, q=5, e=4, g=4, m=3, r=5), 40, 60, 40),
        (es.Spec("vgz,yngz,v,vyz->yng", v=2, g=5, z=5, y=3, n=4), 50, 60, 50),
    ],
    ids=["theta", "two-core", "three-core"],
)
def test_issue_examples_are_full_rank(spec, d_in, d_out, want):
    st = es.compile(spec, d_in, d_out)
    assert st.rank == want
    assert es.check_rank(st) == (want, want)


def _theta_grid():
    grid = [0, 0.25, 0.5, 0.75, 1]
    for al, be in itertools.product(grid, grid):
        for de, ep in itertools.product(grid, grid):
            if al + be <= 1 and de + ep <= 1:
                for rh in (0, 0.25, 0.5):
                    yield (al, be, 1 - al - be, de, ep, 1 - de - ep, rh)


SIZES = [(64, 64), (48, 32), (24, 96), (32, 128), (128, 32), (64, 256)]  # the old code failed on all but 64x64


def test_theta_sweep_rank_equals_numerical_rank():
    """A seeded sample of the theta grid x square and rectangular sizes (the old code missed 23 of these)."""
    cases = [(t, d) for t in _theta_grid() for d in SIZES]
    rng = random.Random(14)
    cases = rng.sample(cases, 900)
    checked = 0
    for t, (d_in, d_out) in cases:
        st = es.compile(es.theta(*t), d_in, d_out)
        bound, numeric = es.check_rank(st)
        assert bound == numeric, (t, d_in, d_out)
        assert 1 <= st.rank <= min(d_in, d_out)
        checked += 1
    assert checked == 900


def _random_spec(rng):
    """A random valid einsum of 2-3 cores with integer sizes (None when the draw is not a valid spec)."""
    k = rng.randint(2, 3)
    letters = rng.sample(string.ascii_lowercase, rng.randint(3, 7))
    x, y, cores = [], [], [[] for _ in range(k)]
    for a in letters:
        role = rng.choice(["in", "out", "block", "bond"])
        if role in ("in", "block"):
            x.append(a)
        if role in ("out", "block"):
            y.append(a)
        for u in rng.sample(range(k), rng.randint(2 if role == "bond" else 1, k)):
            cores[u].append(a)
    if not x or not y or any(not c for c in cores):
        return None
    sizes = {a: rng.randint(2, 5) for a in letters}
    try:
        return es.Spec("".join(x) + "," + ",".join("".join(c) for c in cores) + "->" + "".join(y), **sizes)
    except es.SpecError:
        return None


def _brute_force_cut(spec, sizes) -> int:
    """Least product of sizes over every set of axes whose removal disconnects x from y."""
    operands = [spec.x, spec.y] + [c.axes for c in spec.cores]
    best = math.inf
    axes = spec.axes
    for r in range(len(axes) + 1):
        for removed in itertools.combinations(axes, r):
            p = math.prod(sizes[a] for a in removed)
            if p >= best:
                continue
            gone = set(removed)
            reached, todo = {0}, [0]  # operands joined through the remaining axes, from x
            while todo:
                u = todo.pop()
                for v, s in enumerate(operands):
                    if v not in reached and any(a in s and a not in gone for a in operands[u]):
                        reached.add(v)
                        todo.append(v)
            if 1 not in reached:
                best = p
    return best


def test_random_specs_rank_is_the_exact_min_cut_and_the_numerical_rank():
    rng = random.Random(7)
    checked = 0
    while checked < 300:
        spec = _random_spec(rng)
        if spec is None:
            continue
        sizes = {a: int(s.coef) for a, s in spec.sizes.items()}
        d_in, d_out = math.prod(sizes[a] for a in spec.x), math.prod(sizes[a] for a in spec.y)
        if d_in * d_out > 40_000:
            continue
        st = es.compile(spec, d_in, d_out)
        cut = _brute_force_cut(spec, sizes)
        assert st.rank == min(cut, d_in, d_out), spec.einsum
        assert network.min_cut(spec, sizes.__getitem__, product=True)[0] == cut
        assert es.check_rank(st) == (st.rank, st.rank), spec.einsum
        checked += 1


def test_exact_cut_needs_no_float_and_sums_exponents_exactly():
    spec = es.theta(0.25, 0, 0.75, 0, 0.75, 0.25, 0)
    value, cut = network.min_cut(spec, lambda a: spec.sizes[a].exponent())
    assert value == 1 and sum(spec.sizes[a].exponent() for a in cut) == 1
    big = 10**40 + 7  # a product far beyond float precision is still compared exactly
    spec = es.Spec("ab,ac,bc->c", a="d_in^1/2", b="d_in^1/2", c="d_out")
    value, cut = network.min_cut(spec, lambda a: {"a": big, "b": big + 2, "c": big * big}[a], product=True)
    assert (value, cut) == (big * big, frozenset("c"))
