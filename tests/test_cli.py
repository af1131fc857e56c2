"""`python -m einstruct`: tables, JSON, formulas, and one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest

import einstruct as es
from einstruct.cli import main


def test_show_preset_prints_the_table(capsys):
    assert main(["show", "btt", "--rank", "4", "--d-in", "1024", "--d-out", "4096"]) == 0
    out = capsys.readouterr().out
    st = es.compile(es.presets.btt(rank=4), 1024, 4096)
    assert f"{st.flops:,} forward" in out and "kappa" in out


def test_show_einsum_with_sizes_and_symbolic(capsys):
    argv = [
        "show",
        "ga,gafr,fgre->fe",
        "--size",
        "g=d_in^1/2",
        "--size",
        "a=d_in^1/2",
        "--size",
        "f=d_out^1/2",
        "--size",
        "e=d_out^1/2",
        "--size",
        "r=4",
        "--d",
        "1024",
        "--symbolic",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "macs        = 8*d**(3/2)" in out


def test_json_output_matches_the_structure(capsys):
    assert main(["show", "theta", "--theta", ".5,0,.5,0,.5,.5,0", "--d", "1024", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    st = es.compile(es.theta(0.5, 0, 0.5, 0, 0.5, 0.5, 0), 1024)
    assert data["flops"] == st.flops and data["cores"][1]["kappa"] == st.cores[1].kappa


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["show", "butterfly"], "unknown preset"),
        (["show", "theta", "--theta", "1,2,3"], "7 comma-separated"),
        (["show", "i,io->o", "--size", "i=d_in"], "axis 'o'"),
        (["show", "i,io->o", "--size", "i"], "AXIS=SIZE"),
        (["show", "btt", "--d", "0"], "out of range"),
        (["show", "btt", "--d-in", "abc"], "invalid int"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(argv, needle):
    proc = subprocess.run([sys.executable, "-m", "einstruct", *argv], capture_output=True, text=True)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert needle in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_list_shows_each_presets_einsum_with_its_bond_axes(capsys):
    """`einstruct list` once showed low rank as i,i,o->o and TT as Kronecker: the default rank 1 is a bond of
    size 1, which a Spec drops. Each line now shows the einsum the preset declares, bond axes included."""
    import inspect

    assert main(["list"]) == 0
    listed = dict(line.split()[:2] for line in capsys.readouterr().out.splitlines())
    assert list(listed) == list(es.presets.PRESETS)
    for name, fn in es.presets.PRESETS.items():
        with_bond = {"rank": 4} if "rank" in inspect.signature(fn).parameters else {}
        assert listed[name] == fn(**with_bond).einsum, name
        assert listed[name] == fn(**({"rank": "d^1/4"} if with_bond else {})).einsum, name  # a symbolic bond too
    assert len(set(listed.values())) == len(listed), listed  # no two presets print the same einsum
    assert listed["low_rank"] == "i,ir,ro->o" and listed["tt"] == "ab,acr,bdr->cd" != listed["kron"]
    assert es.presets.low_rank().einsum == "i,i,o->o"  # what they compile to is unchanged: rank 1 drops r
