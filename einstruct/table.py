"""Human-readable table of a compiled Structure (what `python -m einstruct show` prints)."""

from __future__ import annotations


def _num(n: float) -> str:
    if isinstance(n, int) or float(n).is_integer():
        n = int(n)
        return f"{n:,}" if abs(n) < 10**7 else f"{n:.3e}"
    return f"{n:.4g}"


def _rows(header, rows) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip()
    return [fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]


def format_table(st) -> str:
    spec = st.spec
    lines = [f"structure  {spec.label or spec.einsum}", f"einsum     {spec.einsum}"]
    dims = f"d_in={st.d_in}, d_out={st.d_out}"
    if st.padded:
        dims += f"  (padded to d_in={st.d_in_padded}, d_out={st.d_out_padded})"
    lines.append(f"layer      {dims}")
    lines.append("")
    sizes = spec.sizes
    lines += _rows(
        ["axis", "role", "size", "spec"],
        [[a, spec.role(a), st.sizes[a], str(sizes[a])] for a in spec.axes],
    )
    lines.append("")
    rows = []
    for step, c in enumerate(st.cores, 1):
        s = c.step
        rows.append(
            [
                step,
                f"{c.name}[{c.axes}]",
                "x".join(map(str, c.shape)),
                s.contracted or "-",
                s.produced or "-",
                s.batch or "-",
                c.d_in,
                c.d_out,
                c.batch,
                f"{c.init_std:.4g}",
                f"{c.kappa:.4g}",
                f"{c.kappa_sgd:.4g}",
                _num(c.macs),
            ]
        )
    lines += _rows(
        [
            "step",
            "core",
            "shape",
            "contracted",
            "produced",
            "batch",
            "d_in",
            "d_out",
            "nbatch",
            "init_std",
            "kappa",
            "kappa_sgd",
            "MACs",
        ],
        rows,
    )
    lines.append("")
    dense = st.d_in * st.d_out
    lines += [
        f"MACs       {_num(st.macs)} per example ({st.macs / dense:.4g}x dense)",
        f"FLOPs      {_num(st.flops)} forward, {_num(st.train_flops)} training (3x) per example",
        f"params     {_num(st.params)} ({st.params / dense:.4g}x dense)",
        f"rank       {st.rank} (min-cut bound; full rank is {min(st.d_in, st.d_out)})",
        f"taxonomy   omega={st.omega:.4g}  psi={st.psi:.4g}  nu={st.nu:.4g}",
        f"largest activation {_num(st.max_intermediate)} per example",
    ]
    for w in st.warnings:
        lines.append(f"warning    {w}")
    return "\n".join(lines)
