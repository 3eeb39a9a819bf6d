"""Scheduled re-verification of the deployed unlearned model (``prefect.yaml``: cron deployment ``reverify``).

Reloads the latest registered unlearned model (for CodeUnlearn: the codebook model + the active mask),
checks that it is the artifact that was registered and audited, re-runs the request-level evaluation,
the RTN 4-bit re-quantization attack and the relearning attack, and judges them against ``audit:`` in
params.yaml. The result is written under ``requests/<id>/reverify/``, logged to MLflow and tagged on
the model version; a breach fails the flow run (so Prefect's notifications fire) after logging.

``python -m flows.reverify --profile smoke``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prefect import flow

from tasks import tracking
from tasks.context import make_context
from tasks.reverify import ReverificationError, latest_unlearned, reverify_model


@flow(name="codeunlearn-reverify")
def reverify(
    profile: str | None = None,
    params_file: str | None = None,
    method: str = "codeunlearn",
    forget_file: str | None = None,
    fail_on_breach: bool = True,
) -> dict:
    """Re-check the newest registered unlearned model of ``method`` against the audit thresholds.

    ``forget_file`` defaults to the file the request's audit record names.
    """
    ctx = make_context(profile, Path(params_file) if params_file else None)
    with tracking.flow_run(ctx, f"reverify-{method}") as run_ctx:
        latest = latest_unlearned(run_ctx, method)
        result = reverify_model(run_ctx, latest, forget_file)
        result["mlflow_parent_run_id"] = run_ctx.parent_run_id
    if fail_on_breach and not result["passed"]:
        raise ReverificationError(
            f"{result['model_version']} (request {result['request_id']}) failed re-verification: "
            f"{', '.join(result['failed'])}; details in {result['result']}"
        )
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.reverify", description=__doc__)
    parser.add_argument("--profile", default=None, help="profile in params.yaml (default: its `profile` field)")
    parser.add_argument("--params", default=None, help="params file (default: the repository's params.yaml)")
    parser.add_argument("--method", default="codeunlearn")
    parser.add_argument("--forget-file", default=None)
    args = parser.parse_args(argv)
    try:
        result = reverify(
            profile=args.profile, params_file=args.params, method=args.method, forget_file=args.forget_file
        )
    except ReverificationError as err:
        print(f"FAILED: {err}")
        raise SystemExit(1) from err
    print(json.dumps({k: result[k] for k in ("passed", "model_version", "request_id", "result")}, indent=2))


if __name__ == "__main__":
    main()
