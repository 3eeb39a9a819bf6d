"""Every method on the same forget set, evaluated the same way: ``python -m flows.compare --profile smoke``.

The methods run as parallel Prefect tasks on a Dask local cluster (``compare.task_runner: dask``);
``compare.task_runner: thread`` keeps everything in one process. ``--tuned``: each method at the point
``python -m flows.tune`` selected for it, attacks included (``data/outputs/<profile>/compare/tuned/``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from tasks import tracking
from tasks.compare import evaluate_model, evaluate_reference, leaderboard, tuned_contexts, unlearn_method
from tasks.context import RunContext, make_context


def task_runner(ctx: RunContext):
    """``compare.task_runner``: Dask (a local cluster of ``workers`` processes, or the running cluster at
    ``compare.address``, so more machines widen a grid without code changes) or threads in this process."""
    cfg = ctx.settings["compare"]
    if cfg["task_runner"] == "dask":
        from prefect_dask import DaskTaskRunner

        if cfg.get("address"):
            return DaskTaskRunner(address=cfg["address"])
        return DaskTaskRunner(
            cluster_kwargs={
                "n_workers": cfg["workers"],
                "threads_per_worker": 1,
                "processes": True,
                "dashboard_address": None,
            }
        )
    return ThreadPoolTaskRunner(max_workers=cfg["workers"])


def comparison_overrides(profile: str | None, params_file: str | None) -> dict[str, Any]:
    """``compare.evaluate`` deep-merged over ``evaluate``, and ``compare.threads`` over ``threads``: the
    comparison evaluates many models, so a profile may give it a smaller budget than the pipeline's."""
    cfg = make_context(profile, Path(params_file) if params_file else None).settings["compare"]
    overrides: dict[str, Any] = {"evaluate": cfg.get("evaluate") or {}}
    if cfg.get("threads"):
        overrides["threads"] = cfg["threads"]
    return overrides


@flow(name="codeunlearn-compare-methods")
def compare_methods(
    profile: str | None, params_file: str | None, methods: list[str], overrides: dict[str, Any] | None = None
) -> list[dict]:
    ctx = make_context(profile, Path(params_file) if params_file else None, overrides)
    with tracking.flow_run(ctx, "compare") as run_ctx:
        tuned = run_ctx.settings["compare"]["tuned"]
        contexts = tuned_contexts(run_ctx, methods) if tuned else dict.fromkeys(methods, run_ctx)
        unlearned = {method: unlearn_method.submit(contexts[method], method) for method in contexts}
        # The oracle is the reference of every other row, so it is scored first (beside the training);
        # then each model is evaluated as soon as its method has finished, in parallel on the workers.
        suite, oracle_row = evaluate_reference.submit(run_ctx).result()
        rows = {"target": evaluate_model.submit(run_ctx, suite, "target", {})}
        rows.update(
            {method: evaluate_model.submit(contexts[method], suite, method, unlearned[method]) for method in contexts}
        )
        results = {"oracle": oracle_row, **{name: future.result() for name, future in rows.items()}}
        return leaderboard(run_ctx, results)


def compare(
    profile: str | None = None, params_file: str | None = None, methods: list[str] | None = None, tuned: bool = False
) -> list:
    """Run the comparison (after the pipeline has trained target, oracle and codebook); ``tuned``: each
    method at its point selected by ``flows.tune`` (which must have run)."""
    overrides = comparison_overrides(profile, params_file)
    if tuned:
        overrides["compare"] = {"tuned": True}
    ctx = make_context(profile, Path(params_file) if params_file else None, overrides)
    chosen = methods or ctx.settings["compare"]["methods"]
    return compare_methods.with_options(task_runner=task_runner(ctx))(profile, params_file, chosen, overrides)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.compare", description=__doc__)
    parser.add_argument("--profile", default=None)
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--tuned", action="store_true", help="each method at its point selected by flows.tune")
    args = parser.parse_args(argv)
    rows = compare(profile=args.profile, methods=args.methods, tuned=args.tuned)
    from codeunlearn.report.leaderboard import to_markdown

    print(to_markdown(rows))


if __name__ == "__main__":
    main()
