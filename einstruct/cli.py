"""Command line: `python -m einstruct show SPEC [...]` prints a structure's table (or JSON, or formulas)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import presets
from .compiler import compile
from .errors import EinstructError, SpecError
from .spec import Spec
from .theta import theta

EXAMPLES = """examples:
  python -m einstruct show btt --rank 4 --d-in 1024 --d-out 4096
  python -m einstruct show monarch --blocks 16 --d 4096
  python -m einstruct show "ga,gafr,fgre->fe" --size g=d_in^1/2 --size a=d_in^1/2 \\
      --size f=d_out^1/2 --size e=d_out^1/2 --size r=4 --symbolic
  python -m einstruct show theta --theta .5,0,.5,0,.5,.5,0 --d 1024 --json
  python -m einstruct list
"""


PIPE_CLOSED = 141  # 128 + SIGPIPE: the status a shell reports for `yes | head -1`


def closed_pipe() -> int:
    """The reader of stdout went away (`python -m einstruct list | head -1`): not an error, so no message.

    Points stdout at the null device, so that the flush at exit cannot fail a second time, and returns
    PIPE_CLOSED, the status of a process ended by SIGPIPE: a script under `set -o pipefail` sees what it
    sees for `cat` or `yes`, and a command whose output was cut short does not claim success. (SIGPIPE is
    not reset to its default instead: that would also kill a search writing to a closed database socket.)
    """
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError, AttributeError):
        pass
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(fd, sys.stdout.fileno())
        finally:
            os.close(fd)
    except (OSError, ValueError, AttributeError):  # no real stdout (captured, or None): nothing to redirect
        pass
    return PIPE_CLOSED


def run_command(main) -> None:
    """``sys.exit(main())`` for a command line's ``__main__``, with a closed stdout ending it quietly: the output
    is flushed here, where a BrokenPipeError can be caught, rather than at interpreter exit."""
    try:
        code = main()
        if sys.stdout is not None:
            sys.stdout.flush()
    except BrokenPipeError:
        code = closed_pipe()
    sys.exit(code)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, as for every bad input
        self.exit(2, f"einstruct: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m einstruct",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    s = sub.add_parser(
        "show",
        help="compile a structure and print its table",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("spec", help="a preset name (" + ", ".join(presets.PRESETS) + "), 'theta', or an einsum")
    s.add_argument(
        "--size",
        action="append",
        default=[],
        metavar="AXIS=SIZE",
        help="size of an einsum axis, e.g. g=d_in^1/2 (repeat per axis)",
    )
    s.add_argument("--name", action="append", default=None, metavar="NAME", help="core names, in spec order")
    s.add_argument("--rank", help="rank (bond size) for low_rank, tt, btt: an integer or e.g. d^1/4")
    s.add_argument("--blocks", type=int, help="blocks for monarch, block_diag")
    s.add_argument("--theta", help="seven comma-separated exponents alpha,beta,gamma,delta,epsilon,phi,rho")
    s.add_argument("--d", type=int, help="square layer: d_in = d_out = D")
    s.add_argument("--d-in", type=int, help="input dimension (default 1024)")
    s.add_argument("--d-out", type=int, help="output dimension (default: d_in)")
    s.add_argument("--pad-tolerance", type=float, default=0.15, help="largest padding accepted (default 0.15)")
    s.add_argument("--symbolic", action="store_true", help="also print the sympy formulas")
    s.add_argument("--json", action="store_true", help="print machine-readable JSON instead of the table")
    s.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    sub.add_parser("list", help="list the presets")
    return p


def _spec(args) -> Spec:
    name = args.spec.strip()
    if "->" in name or "," in name:
        if args.rank is not None or args.blocks is not None or args.theta:
            raise SpecError(
                "--rank, --blocks and --theta apply to presets and theta, not to an einsum; give the "
                "einsum's sizes with --size AXIS=SIZE"
            )
        sizes = {}
        for item in args.size:
            if "=" not in item:
                raise SpecError(f"--size {item!r} is not AXIS=SIZE; write e.g. --size g=d_in^1/2")
            k, v = item.split("=", 1)
            sizes[k.strip()] = v.strip()
        return Spec(name, names=args.name, sizes=sizes)
    if args.size:
        raise SpecError("--size applies to an einsum spec, not to a preset; use --rank or --blocks")
    if args.name:
        raise SpecError("--name applies to an einsum spec, not to a preset or theta; core names of presets are fixed")
    if args.theta and name != "theta":
        raise SpecError(f"--theta applies to the spec 'theta', not to {name!r}; write: show theta --theta ...")
    if name == "theta" and (args.rank is not None or args.blocks is not None):
        raise SpecError(
            "--rank and --blocks apply to presets, not to theta; rho (the 7th --theta value) sets the bond size"
        )
    if name == "theta":
        if not args.theta:
            raise SpecError("'theta' needs --theta alpha,beta,gamma,delta,epsilon,phi,rho, e.g. .5,0,.5,0,.5,.5,0")
        parts = [v.strip() for v in args.theta.split(",")]
        if len(parts) != 7:
            raise SpecError(f"--theta needs 7 comma-separated values, got {len(parts)}: {args.theta!r}")
        return theta(*parts)
    kwargs = {}
    if args.rank is not None:
        r = args.rank.strip()
        kwargs["rank"] = int(r) if r.isascii() and r.isdigit() else args.rank  # not int('²'): that is a ValueError
    if args.blocks is not None:
        kwargs["blocks"] = args.blocks
    return presets.get(name, **kwargs)


def _json(st) -> dict:
    return {
        "spec": st.spec.einsum,
        "label": st.spec.label,
        "d_in": st.d_in,
        "d_out": st.d_out,
        "d_in_padded": st.d_in_padded,
        "d_out_padded": st.d_out_padded,
        "sizes": st.sizes,
        "macs": st.macs,
        "flops": st.flops,
        "train_flops": st.train_flops,
        "params": st.params,
        "rank": st.rank,
        "omega": st.omega,
        "psi": st.psi,
        "nu": st.nu,
        "max_intermediate": st.max_intermediate,
        "warnings": list(st.warnings),
        "cores": [
            {
                "name": c.name,
                "index": c.index,
                "axes": c.axes,
                "shape": list(c.shape),
                "d_in": c.d_in,
                "d_out": c.d_out,
                "batch": c.batch,
                "contracted": c.step.contracted,
                "produced": c.step.produced,
                "batch_axes": c.step.batch,
                "macs": c.macs,
                "init_std": c.init_std,
                "kappa": c.kappa,
                "kappa_sgd": c.kappa_sgd,
            }
            for c in st.cores
        ],
    }


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "list":  # each preset's einsum with its bond axes (a bond of size 1 is dropped)
            for name, einsum, sizes in presets.listing():
                print(f"{name:12s} {einsum:18s} {sizes}")
            return 0
        pick = lambda *vals: next(v for v in vals if v is not None)
        d_in = pick(args.d_in, args.d, 1024)
        d_out = pick(args.d_out, args.d, d_in)
        st = compile(_spec(args), d_in, d_out, pad_tolerance=args.pad_tolerance)
        sym = st.symbolic() if args.symbolic else None
        if args.json:
            out = _json(st)
            if sym is not None:
                out["symbolic"] = {
                    k: (str(v) if k != "cores" else {n: {q: str(e) for q, e in c.items()} for n, c in v.items()})
                    for k, v in sym.items()
                }
            print(json.dumps(out, indent=2))
            return 0
        print(st.table())
        if sym is not None:
            print("\nformulas" + (" (d = d_in = d_out)" if st.d_in == st.d_out else ""))
            for key in ("macs", "flops", "train_flops", "params"):
                print(f"  {key:11s} = {sym[key]}")
            for name, c in sym["cores"].items():
                print(f"  core {name}: " + ", ".join(f"{k} = {v}" for k, v in c.items()))
        return 0
    except EinstructError as e:
        if args.debug:
            raise
        print(f"einstruct: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader closed the pipe (`... | head -1`): not a bug
        return closed_pipe()
    except Exception as e:  # a bug, not bad input: still one line, unless --debug
        if args.debug:
            raise
        why = (str(e).strip().splitlines() or [""])[0]
        print(
            f"einstruct: internal error: {type(e).__name__}: {why} (rerun with --debug for the traceback, and "
            "please report it)",
            file=sys.stderr,
        )
        return 1
