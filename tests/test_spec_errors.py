"""Every malformed input raises SpecError (a ValueError) whose message names the problem."""

import pytest

import einstruct as es

BTT = dict(g="d_in^1/2", a="d_in^1/2", f="d_out^1/2", e="d_out^1/2", r=4)
S = es.Spec

CASES = [
    ("not a string", lambda: S(42), "must be a string"),
    ("no arrow", lambda: S("ga,gafr,fgre", **BTT), "exactly one '->'"),
    ("two arrows", lambda: S("ga,gafr->fgre->fe", **BTT), "exactly one '->'"),
    ("no core", lambda: S("i->i", i="d_in"), "no core"),
    ("digit axis", lambda: S("g1,g1f->f", g=2), "single letters"),
    ("ellipsis", lambda: S("...a,ab->b", a="d_in", b="d_out"), "single letters"),
    ("repeated axis", lambda: S("aa,ab->b", a="d_in", b="d_out"), "repeats axis 'a'"),
    ("repeated output", lambda: S("a,ab->bb", a="d_in", b="d_out"), "repeats axis 'b'"),
    ("empty core", lambda: S("a,,ab->b", a="d_in", b="d_out"), "has no axes"),
    ("empty output", lambda: S("a,a->", a="d_in"), "has no axes"),
    ("missing size", lambda: S("ga,gafr,fgre->fe", g=2, a=2, f=2, e=2), "axis 'r'.*has no size"),
    ("unknown axis size", lambda: S("i,io->o", i="d_in", o="d_out", z=3), "axis 'z', which is not in"),
    ("output made by nobody", lambda: S("i,io->oz", i="d_in", o="d_out", z=2), "output axis 'z'"),
    ("input used by nobody", lambda: S("iz,io->o", i="d_in", o="d_out", z=2), "input axis 'z'"),
    ("dangling axis", lambda: S("i,iok->o", i="d_in", o="d_out", k=3), "appears only in core"),
    ("floating cores", lambda: S("i,io,kl,kl->o", i="d_in", o="d_out", k=2, l=2), "joined to neither"),
    ("zero size", lambda: S("i,io->o", i="d_in", o=0), "positive"),
    ("negative size", lambda: S("i,io->o", i="d_in", o=-4), "positive"),
    ("float size", lambda: S("i,io->o", i="d_in", o=2.5), "float"),
    ("None size", lambda: S("i,io->o", i="d_in", o=None), "None"),
    ("garbage size", lambda: S("i,io->o", i="d_in", o="__import__('os')"), "not a size"),
    ("bad base", lambda: S("i,io->o", i="d_in", o="n^2"), "not a size"),
    ("huge exponent", lambda: S("i,io->o", i="d_in", o="d_out^9"), "exponent"),
    ("huge int", lambda: S("i,io->o", i="d_in", o=2**60), "larger than"),
    ("exponents off", lambda: S("ab,abo->o", a="d_in^1/2", b="d_in^1/4", o="d_out"), "must add up to 1"),
    ("duplicate names", lambda: S("ga,R:gafr,R:fgre->fe", **BTT), "used twice"),
    ("reserved name", lambda: S("i,bias:io->o", i="d_in", o="d_out"), "not allowed"),
    ("bad name", lambda: S("i,io->o", names=["9x"], i="d_in", o="d_out"), "not allowed"),
    ("names count", lambda: S("i,io->o", names=["A", "B"], i="d_in", o="d_out"), "one per core"),
    ("named input", lambda: S("X:i,io->o", i="d_in", o="d_out"), "cannot be named"),
    ("theta out of range", lambda: es.theta(1.2, 0, -0.2, 0.5, 0.5, 0, 0), "outside \\[0, 1\\]"),
    ("theta sum", lambda: es.theta(0.5, 0.3, 0.3, 0, 0.5, 0.5, 0), "alpha\\+beta\\+gamma"),
    ("theta nan", lambda: es.theta(float("nan"), 0, 1, 0, 1, 0, 0), "finite"),
    ("theta string", lambda: es.theta("half", 0, 0.5, 0, 0.5, 0.5, 0), "not a number"),
    ("theta None", lambda: es.theta(None, 0, 1, 0, 1, 0, 0), "None"),
    ("unknown preset", lambda: es.compile("butterfly", 64), "unknown preset 'butterfly'"),
    ("einsum as preset", lambda: es.compile("i,io->o", 64), "needs sizes"),
    ("bad preset arg", lambda: es.presets.monarch(blocks=0), "positive integer"),
    ("bad preset rank", lambda: es.presets.btt(rank=-1), "positive"),
    ("d_in zero", lambda: es.compile(es.presets.dense(), 0), "d_in = 0"),
    ("d_out float", lambda: es.compile(es.presets.dense(), 64, 64.5), "d_out must be a positive integer"),
    ("d_in bool", lambda: es.compile(es.presets.dense(), True), "positive integer"),
    ("d_in huge", lambda: es.compile(es.presets.dense(), 2**40), "out of range"),
    ("not a spec", lambda: es.compile(3.14, 64), "needs an es.Spec"),
    ("fixed sizes mismatch", lambda: es.compile(S("ga,gae->ge", g=32, a=16, e="d_out/32"), 1024), "multiply to 512"),
    ("bad pad tolerance", lambda: es.compile(es.presets.dense(), 64, pad_tolerance=-1), "pad_tolerance"),
]


@pytest.mark.parametrize("make, match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_input_raises_spec_error(make, match):
    with pytest.raises(es.SpecError, match=match) as info:
        make()
    assert isinstance(info.value, ValueError)
    assert len(str(info.value)) > 30  # says what is wrong and how to fix it, not just a word


def test_error_quotes_the_users_einsum():
    with pytest.raises(es.SpecError) as info:
        S("ga,gafr,fgrq->fe", **BTT, q=2)
    assert "'ga,gafr,fgrq->fe'" in str(info.value)
