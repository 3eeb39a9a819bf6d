"""The tuning grid as a benchmark: `python -m bench.tune --profile smoke` writes bench/results/<profile>/tune.json
and the frontier plot docs/img/tune_<profile>.png.

Runs ``flows.tune`` (points already run under the same settings, data and code are read back, not rerun)
and writes its summary whole: every point's params and scores, each method's selection under the rule,
the exact settings, stamped with commit, machine and load (``bench.run.stamp``).
Needs the profile's pipeline outputs (``python -m flows.pipeline --profile <profile>``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.run import RESULTS, stamp
from codeunlearn.eval.tune import selection_table
from codeunlearn.io import write_json
from codeunlearn.report.plots import tune_frontier_plot
from flows.tune import tune
from tasks.context import REPO_ROOT, make_context

PLOTS = REPO_ROOT / "docs" / "img"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tune", description=__doc__)
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--params", type=Path, default=None)
    parser.add_argument("--methods", nargs="*", default=None, help="methods to tune (default: compare.methods)")
    args = parser.parse_args(argv)
    ctx = make_context(args.profile, args.params)
    started = time.perf_counter()
    summary = tune(profile=args.profile, params_file=str(args.params) if args.params else None, methods=args.methods)
    # Points read back from an earlier sitting keep their own unlearning times (``stats``); this is the
    # whole command's wall time, resumed points included.
    summary["tune_wall_s"] = time.perf_counter() - started
    write_json(RESULTS / ctx.profile / "tune.json", stamp(ctx, summary))
    tune_frontier_plot(summary, PLOTS / f"tune_{ctx.profile}.png")
    print(selection_table(summary["leaderboard"]))
    print(RESULTS / ctx.profile / "tune.json")


if __name__ == "__main__":
    main()
