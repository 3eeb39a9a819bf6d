"""Scheduled re-verification of the deployed unlearned model (``flows/reverify.py``).

``latest_unlearned`` finds the newest registered version of a method's unlearned model; ``reverify_model``
checks that the deployed model is the artifact that was registered and audited (the audit record's
hashes and the method's own ``integrity_checks``), re-runs the request-level evaluation and the attacks,
and judges them against the same thresholds as the audit.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from prefect import task
from prefect.cache_policies import NONE

from codeunlearn.audit.attacks import AuditSettings
from codeunlearn.audit.judge import judge, judged_values
from codeunlearn.audit.record import AUDIT_FILE, json_safe, record_sha256, write_once
from codeunlearn.audit.verify import verify_record
from codeunlearn.data.records import records_sha256
from codeunlearn.io import read_json
from codeunlearn.methods import get_method
from codeunlearn.metrics.scoring import flatten_metrics, request_scores
from tasks import tracking
from tasks.common import (
    audit_attacks,
    deploy,
    forget_records,
    model_dir,
    registered_name,
    requests_dir,
    retain_eval,
    tag_version,
)
from tasks.context import RunContext, torch_threads

REVERIFY_DIR = "reverify"


class ReverificationError(RuntimeError):
    """The deployed unlearned model no longer meets the audit thresholds (or is not what was registered)."""


@task(name="latest_unlearned", cache_policy=NONE)
def latest_unlearned(ctx: RunContext, method: str = "codeunlearn") -> dict:
    """The newest registered version of the method's unlearned model, with its tags."""
    tracking.configure(ctx)
    name = registered_name(ctx, method)
    versions = tracking.with_retries(
        lambda: MlflowClient().search_model_versions(f"name = '{name}'"), "search model versions"
    )
    if not versions:
        raise LookupError(
            f"no registered version of {name!r} in MLflow at {mlflow.get_tracking_uri()}: "
            "run an unlearning request (codeunlearn forget) first"
        )
    latest = max(versions, key=lambda v: int(v.version))
    tags = dict(latest.tags)
    if "codeunlearn.request_id" not in tags:
        raise LookupError(f"{name}/{latest.version}: no tag 'codeunlearn.request_id'; not a request's model")
    return {
        "name": name,
        "version": f"{name}/{latest.version}",
        "method": method,
        "request_id": tags["codeunlearn.request_id"],
        "tags": tags,
    }


def _integrity_checks(ctx: RunContext, latest: dict, record: dict | None) -> list[dict[str, Any]]:
    """Is the model we are about to evaluate the one that was registered and audited?"""
    checks: list[dict[str, Any]] = []
    tags = latest["tags"]
    unlearning = get_method(latest["method"])
    state = unlearning.deployed_state(requests_dir(ctx), requests_dir(ctx) / latest["request_id"])
    checks.extend(unlearning.integrity_checks(model_dir(ctx, unlearning.base_role), state, tags))
    if record is None:
        checks.append({"check": "audit_record_holds", "passed": False, "reason": "no audit record for the request"})
    else:
        verification = verify_record(record)
        checks.append(
            {
                "check": "audit_record_holds",
                "passed": verification.holds,
                "reason": "; ".join(verification.problems) or "every artifact unchanged",
            }
        )
    return checks


@task(name="reverify_model", cache_policy=NONE)
def reverify_model(ctx: RunContext, latest: dict, forget_file: str | None = None) -> dict:
    """Re-run the request-level evaluation and the attacks on the deployed model; judge; log; tag."""
    started = datetime.now(UTC)
    settings = AuditSettings.from_settings(ctx.settings.get("audit"))
    request_dir = requests_dir(ctx) / latest["request_id"]
    record_path = request_dir / AUDIT_FILE
    record = json.loads(record_path.read_text()) if record_path.exists() else None
    checks = _integrity_checks(ctx, latest, record)
    before = read_json(request_dir / "metrics.json")["before"]

    path = forget_file or (record or {}).get("forget", {}).get("file")
    forget: list = []
    if not path or not Path(path).is_file():
        checks.append({"check": "forget_set_available", "passed": False, "reason": f"forget file {path} not found"})
    else:
        forget = forget_records(ctx, path, (record or {}).get("forget", {}).get("kind"))
        expected = latest["tags"].get("codeunlearn.forget_sha256")
        checks.append(
            {
                "check": "forget_set_matches_request",
                "passed": records_sha256(forget) == expected,
                "reason": f"{path}: records sha256 {records_sha256(forget)[:12]}..., request {str(expected)[:12]}...",
            }
        )
    retain = retain_eval(ctx)
    state = get_method(latest["method"]).deployed_state(requests_dir(ctx), request_dir)
    with torch_threads(ctx.settings["evaluate"].get("threads")):
        checkpoint = deploy(ctx, latest["method"], state)
        after = request_scores(checkpoint.model, checkpoint.tokenizer, forget, ctx.utility_sets(), ctx.eval_spec())
        if forget:
            attacks, skipped = audit_attacks(ctx, checkpoint, forget, retain, after)
        else:  # nothing to attack without the forget set: those checks fail as "not measured"
            after["forget_rouge"] = None
            attacks, skipped = {}, {}
    metrics = json_safe({"before": before, "after": after, **attacks})
    # Re-verification re-scores the forget set and model utility; the request's neighbours stay judged in its record.
    skipped["neighbour_ratio"] = "re-verification does not re-score a request's neighbour set"
    verdict = judge(judged_values(metrics), settings.thresholds, skipped, checks)
    result = {
        "schema": "codeunlearn.reverify/1",
        "checked_at": started.isoformat(timespec="seconds"),
        "model_version": latest["version"],
        "request_id": latest["request_id"],
        "params_hash": ctx.params_hash,
        "git_commit": ctx.git_commit,
        "audit_record_sha256": (record or {}).get("record_sha256"),
        "metrics": metrics,
        "thresholds": json_safe(settings.thresholds.__dict__),
        "verdict": verdict,
    }
    result["record_sha256"] = record_sha256(result)
    out = request_dir / REVERIFY_DIR / f"{started.strftime('%Y%m%dT%H%M%S%fZ')}.json"
    write_once(out, result)
    tags = {
        "codeunlearn.request_id": latest["request_id"],
        "codeunlearn.reverify.passed": str(verdict["passed"]).lower(),
        "codeunlearn.reverify.failed": ",".join(verdict["failed"]) or "none",
    }
    with tracking.stage_run(ctx, "reverify") as run:
        tracking.log_json(result, "reverify/result.json")
        tracking.log_metrics(flatten_metrics(metrics, "reverify."))
        tracking.log_metrics({"reverify.passed": float(verdict["passed"])})
        tracking.with_retries(lambda: mlflow.set_tags(tags), "tag the reverify run")
        run_id = run.info.run_id
    tag_version(
        latest["version"],
        {
            "codeunlearn.reverify.passed": tags["codeunlearn.reverify.passed"],
            "codeunlearn.reverify.failed": tags["codeunlearn.reverify.failed"],
            "codeunlearn.reverify.checked_at": result["checked_at"],
            "codeunlearn.reverify.run_id": run_id,
        },
    )
    return {
        "passed": verdict["passed"],
        "failed": verdict["failed"],
        "model_version": latest["version"],
        "request_id": latest["request_id"],
        "result": str(out),
        "metrics": metrics,
        "mlflow_run_id": run_id,
    }
