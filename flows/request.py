"""An unlearning request as a Prefect flow: validate -> unlearn -> register, then evaluate -> audit.

The new version is registered before it is evaluated: ``request_s``, from the first task to the version
registered, is the request's latency; evaluation is timed apart (``evaluate_s``), and optional.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow

from tasks import tracking
from tasks.audit import audit_request
from tasks.common import request_timing
from tasks.context import make_context
from tasks.request import check_request_file, evaluate_request, load_request, register_request, unlearn_request


@flow(name="codeunlearn-request")
def unlearn(
    forget_file: str,
    method: str = "codeunlearn",
    profile: str | None = None,
    params_file: str | None = None,
    retain_file: str | None = None,
    kind: str | None = None,
    evaluate: bool = True,
) -> dict:
    """Forget the records in ``forget_file`` on the profile's trained models (run the pipeline once first):
    QAs, passages or multiple-choice questions (``kind``, or detected from the file's first row).

    ``retain_file``, the user's neighbour set, was checked by the CLI (alone and against the forget
    file); split as ``request.neighbour_split`` says, one part is the method's control and calibration,
    the other is scored before and after. Without it, the control is the profile's retain split's
    (``select.control_authors``).

    ``evaluate=False`` stops once the new version is registered: no before/after scores, no audit record.
    """
    ctx = make_context(profile, Path(params_file) if params_file else None)
    checked = check_request_file(ctx, forget_file, method, kind)  # a rejected request stops before MLflow or any folder
    with tracking.flow_run(ctx, f"request-{method}") as run_ctx:
        started = time.perf_counter()
        request = load_request(run_ctx, forget_file, checked, kind)
        unlearned = unlearn_request(run_ctx, forget_file, method, request, retain_file)
        version = register_request(run_ctx, method, request, unlearned, started)
        metrics, audit = None, None
        if evaluate:
            metrics = evaluate_request(run_ctx, forget_file, method, request, retain_file)
            audit = audit_request(run_ctx, forget_file, method, request, unlearned, metrics, version, retain_file)
    return {
        **request,
        "unlearn": unlearned,
        "metrics": metrics,
        "registered": version,
        "audit": audit,
        "mlflow_run_id": run_ctx.parent_run_id,
        "retain_file": retain_file,
        "timing_s": request_timing(run_ctx, request["request_id"]),
    }
