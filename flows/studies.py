"""The studies as one Prefect flow: ``python -m flows.studies --profile smoke``.

They vary the main job's request on its codebook and splits: the S' frontier (sweep), sequential
requests (sustainability) and growing forget sets (scalability), and write ``studies/report.md``. The
main-job stages they read are resumed, so after ``flows.pipeline`` nothing is trained again; on a
fresh output directory those stages run first.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow

from flows.registry import TASKS
from tasks import tracking
from tasks.context import make_context
from tasks.stages import STUDIES, STUDY_INPUTS


@flow(name="codeunlearn-studies")
def studies(profile: str | None = None, params_file: str | None = None, resume: bool = True) -> dict:
    """(main-job inputs, resumed) -> sweep -> sequential -> studies report."""
    ctx = make_context(profile, Path(params_file) if params_file else None, overrides={"resume": resume})
    results: dict = {}
    with tracking.flow_run(ctx, f"studies-{ctx.profile}") as run_ctx:
        for name in STUDY_INPUTS:
            TASKS[name](run_ctx.resuming())
        for name in STUDIES:
            results[name] = TASKS[name](run_ctx)
        results["mlflow_run_id"] = run_ctx.parent_run_id
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.studies", description=__doc__)
    parser.add_argument("--profile", default=None, help="profile in params.yaml (default: its `profile` field)")
    parser.add_argument("--no-resume", action="store_true", help="redo the studies (never the main job's stages)")
    args = parser.parse_args(argv)
    results = studies(profile=args.profile, resume=not args.no_resume)
    print(f"studies report: {results['studies_report']}")


if __name__ == "__main__":
    main()
