"""The audit of an unlearning request, and finding a record again.

* ``audit_request`` (the last task of the request flow): runs the attacks on the model as deployed
  (RTN re-quantization, the relearning attack; ``codeunlearn.audit.attacks``), builds the request's
  audit record (``codeunlearn.audit.record``), writes it once to
  ``<outputs>/<profile>/requests/<id>/audit.json`` (write-once: an existing record is never replaced),
  logs it to MLflow and tags the registered model version with its verdict and hash.
* ``find_record``: an audit record by request id or MLflow run id (``codeunlearn audit``).

Re-verification of the deployed model is ``tasks.reverify``. Numbers and hashes only: neither the
forget set's text nor the model's answers reach a record.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect import task
from prefect.cache_policies import NONE

from codeunlearn.audit.attacks import AuditSettings
from codeunlearn.audit.record import (
    AUDIT_FILE,
    AuditRecordExistsError,
    artifact_entry,
    build_record,
    directory_artifacts,
    dvc_lock_summary,
    forget_summary,
    neighbour_summary,
    split_version,
    write_once,
)
from codeunlearn.io import read_json
from codeunlearn.methods import get_method
from codeunlearn.metrics.scoring import flatten_metrics
from tasks import tracking
from tasks.common import (
    TIMING_FILE,
    audit_attacks,
    deploy,
    forget_records,
    model_dir,
    neighbour_sets,
    request_timing,
    requests_dir,
    retain_eval,
    tag_version,
)
from tasks.context import RunContext, torch_threads

# A request's own files a record hashes.
REQUEST_FILES = ("unlearn.json", "metrics.json", TIMING_FILE, "validation/report.json")


def snapshot_files(state: Path, out: Path) -> None:
    """Copy the deployed state's files to ``out`` once (the record needs a state later requests won't change)."""
    if out.exists():
        raise AuditRecordExistsError(f"{out}: a different snapshot exists; audit records are write-once")
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for path in sorted(p for p in state.iterdir() if p.is_file() and not p.name.startswith(".")):
            shutil.copy2(path, staging / path.name)
            os.chmod(staging / path.name, 0o444)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def base_version(base_dir: Path) -> str | None:
    """The registered version of a pipeline model (written by its stage into ``training.json``)."""
    path = base_dir / "training.json"
    return read_json(path).get("registered") if path.exists() else None


def previous_version(name: str, before: str | None) -> str | None:
    """The newest version of ``name`` older than ``before`` (the model this request replaced)."""
    versions = tracking.with_retries(
        lambda: MlflowClient().search_model_versions(f"name = '{name}'"), "search model versions"
    )
    numbers = sorted(int(v.version) for v in versions)
    if before is not None:
        numbers = [n for n in numbers if n < int(before)]
    return f"{name}/{numbers[-1]}" if numbers else None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@task(name="audit_request", cache_policy=NONE)
def audit_request(
    ctx: RunContext,
    forget_file: str,
    method: str,
    request: dict,
    unlearned: dict,
    metrics: dict,
    version: str | None,
    retain_file: str | None = None,
) -> dict:
    """Attacks on the deployed model, the write-once audit record, MLflow, the model version's tags."""
    request_id = request["request_id"]
    out = requests_dir(ctx) / request_id
    record_path = out / AUDIT_FILE
    if record_path.exists():
        raise AuditRecordExistsError(f"{record_path}: audit records are write-once and this one exists")
    unlearning = get_method(method)
    base_dir = model_dir(ctx, unlearning.base_role)
    state = unlearning.deployed_state(requests_dir(ctx), out)
    snapshot = state
    if unlearning.cumulative:
        # Later requests change the shared deployed state: the record describes a snapshot of it.
        snapshot = out / f"deployed_{unlearning.saved_as}"
        expected = unlearning.state_sha256(state)
        # A snapshot left by an audit that failed before its record was written is reused if identical.
        if not (snapshot.exists() and unlearning.state_sha256(snapshot) == expected):
            snapshot_files(state, snapshot)
        if unlearning.state_changed(snapshot, unlearned):
            raise RuntimeError(
                f"{state}: the deployed state changed since request {request_id} wrote it "
                "(another request ran in between); its audit record would not describe the deployed model"
            )
    forget = forget_records(ctx, forget_file, request.get("forget_kind"))
    retain = retain_eval(ctx)
    started = time.perf_counter()
    with torch_threads(ctx.settings["evaluate"].get("threads")):
        checkpoint = deploy(ctx, method, snapshot)
        attacks, skipped = audit_attacks(ctx, checkpoint, forget, retain, metrics["after"])
    if retain_file is None:
        skipped["neighbour_ratio"] = "no neighbour set (--retain-file) in this request"
    # request_s: the request up to its version registered; evaluate_s: its before/after scores.
    timing = {**request_timing(ctx, request_id), "attacks": time.perf_counter() - started}
    all_metrics = {"before": metrics["before"], "after": metrics["after"], **attacks, "timing_s": timing}
    neighbours = neighbour_sets(ctx, retain_file)
    neighbour = neighbour_summary(retain_file, *neighbours, metrics) if neighbours is not None else None
    base_role = unlearning.base_role
    name_and_number = split_version(version)
    models = {
        "before": {
            "base": base_version(base_dir),
            "base_role": base_role,
            "previous_unlearned": previous_version(*name_and_number) if name_and_number else None,
        },
        "after": version,
    }
    record = build_record(
        request_id=request_id,
        created_at=_now(),
        method=method,
        profile=ctx.profile,
        params_hash=ctx.params_hash,
        git_commit=ctx.git_commit,
        forget={**forget_summary(forget_file, forget), "kind": request.get("forget_kind", "qa")},
        models=models,
        metrics=all_metrics,
        thresholds=AuditSettings.from_settings(ctx.settings.get("audit")).thresholds,
        artifacts=[
            artifact_entry("forget_file", forget_file, required=False),
            *[artifact_entry(f"request/{name}", out / name) for name in REQUEST_FILES if (out / name).exists()],
            *[
                entry
                for name, folder, files in unlearning.audit_files(base_dir, out, snapshot)
                for entry in directory_artifacts(name, folder, files)
            ],
        ],
        mask=unlearning.audit_facts(base_dir, out, snapshot),
        dvc=dvc_lock_summary(ctx.root / "dvc.lock"),
        skipped=skipped,
        record_path=record_path,
        neighbour=neighbour,
    )
    write_once(record_path, record)
    verdict = record["verdict"]
    tags = {
        "codeunlearn.request_id": request_id,
        "codeunlearn.audit.passed": str(verdict["passed"]).lower(),
        "codeunlearn.audit.failed": ",".join(verdict["failed"]) or "none",
        "codeunlearn.audit.outcome": verdict["outcome"],
        "codeunlearn.audit.record_sha256": record["record_sha256"],
    }
    with tracking.stage_run(ctx, "audit") as run:
        tracking.log_json(record, f"audit/{AUDIT_FILE}")
        tracking.log_metrics(flatten_metrics(all_metrics, "audit."))
        tracking.log_metrics({"audit.passed": float(verdict["passed"])})
        tracking.with_retries(lambda: mlflow.set_tags(tags), "tag the audit run")
        audit_run_id = run.info.run_id
    if ctx.parent_run_id:
        client = MlflowClient()
        for key, value in {"codeunlearn.audit_run_id": audit_run_id, **tags}.items():
            tracking.with_retries(
                lambda key=key, value=value: client.set_tag(ctx.parent_run_id, key, value), "tag the flow run"
            )
    tag_version(version, {**tags, "codeunlearn.audit.run_id": audit_run_id})
    return {
        "passed": verdict["passed"],
        "failed": verdict["failed"],
        "outcome": verdict["outcome"],
        "record": str(record_path),
        "record_sha256": record["record_sha256"],
        "mlflow_run_id": audit_run_id,
    }


def _audit_run_of_request(ctx: RunContext, request_id: str) -> str | None:
    """The MLflow audit run of a request, found by its tags; ``None`` if there is none."""
    experiment_id = tracking.configure(ctx)
    runs = tracking.with_retries(
        lambda: MlflowClient().search_runs(
            [experiment_id],
            f"tags.`codeunlearn.request_id` = '{request_id}' and tags.`codeunlearn.stage` = 'audit'",
            max_results=2,
        ),
        "search runs",
    )
    return runs[0].info.run_id if runs else None


def find_record(ctx: RunContext, ident: str) -> tuple[dict, dict | None, str]:
    """The audit record named by a request id or an MLflow run id (the request's flow run or audit run).

    Returns ``(record, local_copy, source)``: the tracked (MLflow) copy when there is one, with the
    on-disk copy beside it for comparison; else the on-disk record alone (MLflow unreachable, or the
    record was never logged).
    """
    local_path = requests_dir(ctx) / ident / AUDIT_FILE
    notes: list[str] = []
    if local_path.is_file():
        try:
            audit_run_id = _audit_run_of_request(ctx, ident)
        except tracking.TrackingUnavailableError as err:
            audit_run_id = None
            notes.append(f"tracked copy not compared: {err}")
    else:
        tracking.configure(ctx)
        try:
            run = MlflowClient().get_run(ident)
        except MlflowException as err:
            raise LookupError(
                f"{ident!r}: neither a request id with {local_path} nor a run in MLflow at "
                f"{mlflow.get_tracking_uri()} ({err.message if hasattr(err, 'message') else err})"
            ) from err
        audit_run_id = run.data.tags.get("codeunlearn.audit_run_id", ident)
    tracked = None
    if audit_run_id is not None:
        try:
            tracked = mlflow.artifacts.load_dict(f"runs:/{audit_run_id}/audit/{AUDIT_FILE}")
        except (MlflowException, OSError) as err:
            if not local_path.is_file():
                raise LookupError(f"run {ident}: no audit record (audit/{AUDIT_FILE}) in run {audit_run_id}") from err
            notes.append(f"run {audit_run_id} holds no audit/{AUDIT_FILE}")
    if tracked is not None and tracked.get("record_path"):
        local_path = Path(tracked["record_path"])
    local = json.loads(local_path.read_text()) if local_path.is_file() else None
    if tracked is None:
        source = f"{local_path} (local only{': ' + '; '.join(notes) if notes else ''})"
        return local, None, source
    source = f"MLflow run {audit_run_id}" + (
        f", compared with {local_path}" if local is not None else ", no local copy"
    )
    return tracked, local, source
