"""A larger structure search on the regression task (about 30 minutes on a 2-core CPU), and its report.

    python examples/regression_frontier.py                       # runs/regression-frontier -> docs/results/
    python examples/regression_frontier.py --budget 4e11 --levels 3 --results runs/quick-results   # a shorter try
    python examples/regression_frontier.py --dry-run             # the plan and the time estimate only

It runs the same search as ``python -m search.run`` (TPE over theta, dense, Monarch and BTT, references
first at every level) with a larger budget and four compute levels, so each family's frontier spans a
factor of 27 in compute; then it writes the report (frontiers, fitted laws, compute multipliers vs dense,
taxonomy, history) and copies report.md, the plots, trials.csv and study.json to ``--results``. The
command is resumable: run it again after an interruption and finished trials are kept.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from search import settings
from search.errors import SearchError
from search.loop import run_search
from search.report import PLOTS, write_report
from search.run import TqdmReporter


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default="regression-frontier")
    p.add_argument("--budget", type=float, default=2e12, help="total training FLOPs (default 2e12)")
    p.add_argument("--levels", type=int, default=4, help="compute levels (default 4)")
    ratio = settings.default("ratio")  # the search's own default, as python -m search.run has it
    p.add_argument("--ratio", type=float, default=ratio, help=f"compute factor between levels (default {ratio:g})")
    p.add_argument("--seed", type=int, default=settings.default("seed"))
    p.add_argument("--out", default=None, help="study folder (default runs/<study>)")
    p.add_argument(
        "--results",
        default="docs/results/regression-frontier",
        help="where the report, plots and trials.csv are copied (default docs/results/regression-frontier)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan and the estimate; train nothing")
    args = p.parse_args()
    rep = TqdmReporter(enabled=sys.stderr.isatty())
    try:
        study = run_search(
            args.study,
            out=args.out,
            reporter=rep,
            task="regression",
            budget=args.budget,
            levels=args.levels,
            ratio=args.ratio,
            seed=args.seed,
            dry_run=args.dry_run,
        )
    except SearchError as e:
        print(f"regression_frontier: error: {e}", file=sys.stderr)
        return 2
    finally:
        rep.close()
    if args.dry_run:
        return 0
    report = write_report(study.folder, study.name)
    os.makedirs(args.results, exist_ok=True)
    for name in ("report.md", "trials.csv", "study.json", *PLOTS.values()):
        src = os.path.join(study.folder, name)
        if os.path.exists(src):
            shutil.copy2(src, os.path.join(args.results, name))
    print(f"spent {study.spent:.4g} of {args.budget:.4g} training FLOPs; report {report}, copied to {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
