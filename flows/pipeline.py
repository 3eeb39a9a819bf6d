"""The whole pipeline as one Prefect flow: ``python -m flows.pipeline --profile smoke``."""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow
from prefect.task_runners import ProcessPoolTaskRunner

from flows.registry import TASKS
from tasks import tracking
from tasks.context import make_context
from tasks.stages import SIDE_BY_SIDE, stage_groups

HEADLINE = (
    "forget_rouge",
    "retain_rouge",
    "model_utility",
    "world_facts_rouge",
    "real_authors_rouge",
    "forget_quality",
    "privleak",
)


@flow(name="codeunlearn-pipeline", task_runner=ProcessPoolTaskRunner(max_workers=len(SIDE_BY_SIDE)))
def pipeline(profile: str | None = None, params_file: str | None = None, resume: bool = True) -> dict:
    """prepare -> validate -> base -> target + oracle -> codebook -> select -> evaluate -> report.

    Target and oracle train at once in two worker processes when ``side_by_side.enabled``; every other
    stage runs in the flow's process. A failed validation raises inside its task, so the flow stops
    before any model is touched. With ``resume`` (the default) stages completed under the same settings
    and data are not redone.
    """
    ctx = make_context(profile, Path(params_file) if params_file else None, overrides={"resume": resume})
    results: dict = {}
    with tracking.flow_run(ctx, f"pipeline-{ctx.profile}") as run_ctx:
        for group in stage_groups(ctx.settings):
            if len(group) == 1:
                results[group[0]] = TASKS[group[0]](run_ctx)
                continue
            futures = {name: TASKS[name].submit(run_ctx) for name in group}
            results.update({name: future.result() for name, future in futures.items()})
        results["mlflow_run_id"] = run_ctx.parent_run_id
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__)
    parser.add_argument("--profile", default=None, help="profile in params.yaml (default: its `profile` field)")
    parser.add_argument("--no-resume", action="store_true", help="redo every stage, even completed ones")
    args = parser.parse_args(argv)
    results = pipeline(profile=args.profile, resume=not args.no_resume)
    print(f"report: {results['report']}")
    for row, values in results["evaluate"].items():
        headline = {k: values[k] for k in HEADLINE if k in values}
        print(f"{row:>13}: " + "  ".join(f"{k}={v:.3f}" for k, v in headline.items()))


if __name__ == "__main__":
    main()
