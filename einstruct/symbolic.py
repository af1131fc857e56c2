"""sympy formulas of a compiled structure's plan: costs and per-core numbers in d_in, d_out (or d)."""

from __future__ import annotations

import sympy

from . import plan, rules


def symbols():
    d_in, d_out, d = sympy.symbols("d_in d_out d", positive=True, integer=True)
    return d_in, d_out, d


def symbolic(st, square: bool | None = None) -> dict:
    """Expressions for the chain that ``st`` runs, sizes unrounded (bond sizes as monomials).

    Keys: macs, flops, train_flops, params, and ``cores``: {name: {d_in, d_out, batch, params, init_std,
    kappa, kappa_sgd}}. ``square=True`` writes everything in d (d_in = d_out = d); the default is square
    when st.d_in == st.d_out.
    """
    if square is None:
        square = st.d_in == st.d_out
    d_in, d_out, d = symbols()
    syms = {"d_in": d, "d_out": d, "d": d} if square else {"d_in": d_in, "d_out": d_out, "d": sympy.Min(d_in, d_out)}
    size = {a: s.sympy(syms) for a, s in st.spec.sizes.items()}
    prod = lambda axes: sympy.Mul(*(size[a] for a in axes))
    spec_axes = [c.axes for c in st.spec.cores]  # a step's core is its index in the spec
    k = len(st.cores)
    lin, lout = syms["d_in"], syms["d_out"]
    macs = sympy.Integer(0)
    cores = {}
    for c in st.cores:
        s = c.step
        macs += rules.step_macs(size[a] for a in plan.step_axes(s, spec_axes))
        fi, fo = prod(s.contracted), prod(s.produced)
        cores[c.name] = {
            "d_in": fi,
            "d_out": fo,
            "batch": prod(s.batch),
            "params": prod(c.axes),
            "init_std": rules.init_std(fi, fo),
            "kappa": sympy.simplify(rules.kappa(fi, fo, lin, lout, k, "adam")),
            "kappa_sgd": sympy.simplify(rules.kappa(fi, fo, lin, lout, k, "sgd")),
        }
    macs = sympy.simplify(macs)
    flops = rules.forward_flops(macs)
    return {
        "macs": macs,
        "flops": sympy.expand(flops),
        "train_flops": sympy.expand(rules.train_flops(flops)),
        "params": sympy.simplify(sum((v["params"] for v in cores.values()), sympy.Integer(0))),
        "cores": cores,
    }
