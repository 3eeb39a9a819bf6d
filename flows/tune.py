"""Every method tuned on the same budget: ``python -m flows.tune --profile smoke [--methods ga npo]``.

Each method runs every point of its grid (``compare.tune.grids``), each point a Prefect task on the
comparison's task runner (a Dask local cluster, or the cluster at ``compare.address``) and an MLflow
child run; then one rule (``compare.tune.select``) picks each method's point. Points already run under
the same settings, data and code are read back, so a long grid completes over several sittings.
Needs the pipeline's target, oracle and codebook (``python -m flows.pipeline --profile <profile>``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prefect import flow

from flows.compare import comparison_overrides, task_runner
from tasks import tracking
from tasks.compare import evaluate_model, evaluate_reference
from tasks.context import make_context
from tasks.tune import method_grid, tune_point, tune_summary


@flow(name="codeunlearn-tune-methods")
def tune_methods(
    profile: str | None, params_file: str | None, methods: list[str], overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    ctx = make_context(profile, Path(params_file) if params_file else None, overrides)
    grids = {method: method_grid(ctx, method) for method in methods}  # a bad grid fails before any run starts
    with tracking.flow_run(ctx, "tune") as run_ctx:
        # The oracle and target rows are the comparison's (reused when it already scored them): every
        # point's forget quality is relative to the oracle, the utility floor to the target.
        suite, oracle = evaluate_reference.submit(run_ctx).result()
        target = evaluate_model.submit(run_ctx, suite, "target", {})
        futures = [
            tune_point.submit(run_ctx, suite, method, index, params)
            for method in methods
            for index, params in enumerate(grids[method])
        ]
        points = [future.result() for future in futures]
        return tune_summary(run_ctx, points, target.result(), oracle, methods)


def tune(profile: str | None = None, params_file: str | None = None, methods: list[str] | None = None) -> dict:
    """Run the grid (after the pipeline has trained target, oracle and codebook); returns ``tune.json``."""
    overrides = comparison_overrides(profile, params_file)
    ctx = make_context(profile, Path(params_file) if params_file else None, overrides)
    chosen = methods or ctx.settings["compare"]["methods"]
    return tune_methods.with_options(task_runner=task_runner(ctx))(profile, params_file, chosen, overrides)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.tune", description=__doc__)
    parser.add_argument("--profile", default=None)
    parser.add_argument("--methods", nargs="*", default=None)
    args = parser.parse_args(argv)
    summary = tune(profile=args.profile, methods=args.methods)
    from codeunlearn.eval.tune import selection_table

    print(selection_table(summary["leaderboard"]))


if __name__ == "__main__":
    main()
