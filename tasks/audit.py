"""Audit of unlearning requests and re-verification of the deployed unlearned model.

* ``audit_request`` (the last task of the request flow): runs the attacks on the model as deployed
  (RTN re-quantization, the relearning attack), builds the request's audit record
  (``codeunlearn.audit``), writes it once to ``<outputs>/<profile>/requests/<id>/audit.json``
  (write-once: an existing record is never replaced), logs it to MLflow and tags the registered
  model version with its verdict and hash.
* ``latest_unlearned`` + ``reverify_model`` (the scheduled ``flows/reverify.py``): reload the latest
  registered unlearned model (the codebook model + the active mask), check it is the artifact that
  was registered, re-run the request-level evaluation and the attacks, and judge them against the
  same thresholds.
* ``find_record``: an audit record by request id or MLflow run id (``codeunlearn audit``).

Numbers and hashes only: neither the forget set's text nor the model's answers reach a record.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect import task
from prefect.cache_policies import NONE

from codeunlearn.attacks.quantize import QuantizationSpec, quantized_copy
from codeunlearn.attacks.relearn import relearn_attack
from codeunlearn.audit.judge import Thresholds, judge, judged_values
from codeunlearn.audit.record import (
    artifact_entry,
    build_record,
    directory_artifacts,
    dvc_lock_summary,
    json_safe,
    record_sha256,
)
from codeunlearn.audit.verify import verify_record
from codeunlearn.checkpoints import Checkpoint, load_checkpoint
from codeunlearn.data.records import records_sha256
from codeunlearn.data.tofu import load_qa_file
from codeunlearn.eval.scoring import forget_retain_rouge, request_scores
from codeunlearn.eval.sets import GenerationSpec, evenly_spaced
from codeunlearn.io import atomic_write_bytes, read_json, sha256_file
from codeunlearn.methods.codeunlearn.mask import MASK_META, MASK_TENSORS, apply_mask, load_mask
from codeunlearn.metrics.recovery import recovery
from codeunlearn.models.device import resolve_device
from tasks import tracking
from tasks.context import RunContext, torch_threads
from tasks.evaluate import relearn_spec
from tasks.models import load_role, model_dir
from tasks.request import ACTIVE_MASK, mask_sha256, requests_dir

AUDIT_FILE = "audit.json"
DEPLOYED_MASK = "deployed_mask"  # snapshot of the active mask as this request left it
REVERIFY_DIR = "reverify"
WEIGHT_PATTERNS = ("*.safetensors", "*.json")


class AuditRecordExistsError(FileExistsError):
    pass


class ReverificationError(RuntimeError):
    """The deployed unlearned model no longer meets the audit thresholds (or is not what was registered)."""


# --------------------------------------------------------------------------- files


def write_once(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as JSON at ``path`` unless something is there already (then raise).

    Atomic and exclusive: a temporary file is hard-linked into place, which fails if ``path`` exists,
    so neither a crash nor a race leaves a half-written or replaced record. The file is read-only.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        raise AuditRecordExistsError(f"{path}: audit records are write-once and this one exists; not overwritten")
    data = (json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()
    try:
        atomic_write_bytes(path, data, exclusive=True, read_only=True)
    except FileExistsError as err:
        raise AuditRecordExistsError(
            f"{path}: audit records are write-once and this one exists; not overwritten"
        ) from err


def snapshot_mask(active: Path, out: Path) -> None:
    """Copy the active mask's files to ``out`` once (the record needs a mask that later requests won't change)."""
    if out.exists():
        raise AuditRecordExistsError(f"{out}: a different mask snapshot exists; audit records are write-once")
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name in (MASK_TENSORS, MASK_META):
            shutil.copy2(active / name, staging / name)
            os.chmod(staging / name, 0o444)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


# --------------------------------------------------------------------------- settings


def audit_settings(ctx: RunContext) -> dict[str, Any]:
    block = ctx.settings.get("audit") or {}
    quant = block.get("quantization") or {}
    return {
        "thresholds": Thresholds.from_settings(block),
        "quant_bits": int(quant.get("bits", 4)),
        "quant_group_size": int(quant.get("group_size", 64)),
        "relearn": bool(block.get("relearn", True)),
    }


def generation_spec(ctx: RunContext) -> GenerationSpec:
    cfg = ctx.settings["evaluate"]
    return GenerationSpec(cfg["max_new_tokens"], cfg["batch_size"])


def retain_eval(ctx: RunContext) -> list:
    """The retain QAs the request evaluation scores (the same evenly spaced subset as evaluate_request)."""
    return evenly_spaced(ctx.retain_split()[1], ctx.settings["evaluate"]["retain_eval_size"])


# --------------------------------------------------------------------------- attacks


def attack_metrics(
    ctx: RunContext, checkpoint: Checkpoint, forget: Sequence[Any], retain: Sequence[Any], full: dict[str, float]
) -> tuple[dict[str, Any], dict[str, str]]:
    """RTN re-quantization (``audit.quantization``) and, if enabled, the relearning attack, on the model
    as deployed; ``full`` is its full-precision forget/retain ROUGE. Returns (metrics, skipped reasons)."""
    settings = audit_settings(ctx)
    spec = generation_spec(ctx)
    metrics: dict[str, Any] = {"quantization": {}}
    skipped: dict[str, str] = {}
    qspec = QuantizationSpec("rtn", settings["quant_bits"], settings["quant_group_size"])
    name = f"rtn_w{qspec.bits}_g{qspec.group_size}"
    clone, record = quantized_copy(checkpoint.model, qspec)
    try:
        quantized = forget_retain_rouge(clone, checkpoint.tokenizer, forget, retain, spec) if forget else None
    finally:
        del clone
    if quantized is None:
        skipped["quant_recovery"] = "no forget records to score"
    else:
        metrics["quantization"][name] = {
            **quantized,
            "recovery": recovery(quantized["forget_rouge"], full["forget_rouge"]),
            "retain_change": quantized["retain_rouge"] - full["retain_rouge"],
            "weight_error": record.mean_relative_error,
            "bits": qspec.bits,
            "group_size": qspec.group_size,
            "quantizer": "rtn",
        }
    if not settings["relearn"]:
        skipped["relearn_recovery"] = "audit.relearn is false"
    elif len(forget) < 2:
        skipped["relearn_recovery"] = f"the relearning attack needs at least 2 forget records, got {len(forget)}"
    else:
        metrics["relearn"] = relearn_attack(
            checkpoint.model, checkpoint.tokenizer, forget, relearn_spec(ctx), spec, ctx.progress
        )
    return metrics, skipped


# --------------------------------------------------------------------------- models and registry


def registered_name(ctx: RunContext, method: str) -> str:
    """The registry name ``register_request`` uses for a method's unlearned model."""
    return f"codeunlearn-{ctx.profile}-unlearned-{method}"


def split_version(version: str | None) -> tuple[str, str] | None:
    if not version or "/" not in version:
        return None
    name, number = version.rsplit("/", 1)
    return name, number


def base_version(ctx: RunContext, role: str) -> str | None:
    """The registered version of a pipeline model (written by the stage into ``training.json``)."""
    path = model_dir(ctx, role) / "training.json"
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


def load_deployed(ctx: RunContext, method: str, request_dir: Path, mask_dir: Path | None) -> Checkpoint:
    """The unlearned model as served: the codebook model with ``mask_dir`` applied, or the edited model."""
    if method == "codeunlearn":
        checkpoint = load_role(ctx, "codebook")
        apply_mask(checkpoint.bottleneck, load_mask(mask_dir), source=str(mask_dir))
        return checkpoint
    return load_checkpoint(request_dir / "model", resolve_device(ctx.settings["device"]))


def forget_summary(forget_file: str | Path, records: Sequence[Any]) -> dict[str, Any]:
    path = Path(forget_file).resolve()
    return {
        "file": str(path),
        "file_sha256": sha256_file(path),
        "records_sha256": records_sha256(records),
        "count": len(records),
        "subjects": len({r.subject for r in records if getattr(r, "subject", "")}),
    }


def request_artifacts(ctx: RunContext, method: str, request_dir: Path, forget_file: str | Path) -> list[dict]:
    """Every file the record relies on; the forget file is optional (it may be erased later)."""
    artifacts = [artifact_entry("forget_file", forget_file, required=False)]
    for name in ("unlearn.json", "metrics.json", "validation/report.json"):
        if (request_dir / name).exists():
            artifacts.append(artifact_entry(f"request/{name}", request_dir / name))
    if method == "codeunlearn":
        artifacts += directory_artifacts("request_mask", request_dir / "mask", (MASK_TENSORS, MASK_META))
        artifacts += directory_artifacts("deployed_mask", request_dir / DEPLOYED_MASK, (MASK_TENSORS, MASK_META))
        artifacts += directory_artifacts("codebook_model", model_dir(ctx, "codebook"), WEIGHT_PATTERNS)
    else:
        artifacts += directory_artifacts("unlearned_model", request_dir / "model", WEIGHT_PATTERNS)
    return artifacts


def tag_version(version: str | None, tags: dict[str, str]) -> None:
    parts = split_version(version)
    if parts is None:
        return
    name, number = parts
    client = MlflowClient()
    for key, value in tags.items():
        tracking.with_retries(
            lambda key=key, value=value: client.set_model_version_tag(name, number, key, value),
            "tag a model version",
        )


def flat_numbers(tree: Any, prefix: str) -> dict[str, float]:
    flat: dict[str, float] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            flat.update(flat_numbers(value, f"{prefix}.{key}"))
    elif isinstance(tree, int | float) and not isinstance(tree, bool):
        flat[prefix] = float(tree)
    return flat


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- the request's audit


@task(name="audit_request", cache_policy=NONE)
def audit_request(
    ctx: RunContext,
    forget_file: str,
    method: str,
    request: dict,
    unlearned: dict,
    metrics: dict,
    version: str | None,
) -> dict:
    """Attacks on the deployed model, the write-once audit record, MLflow, the model version's tags."""
    request_id = request["request_id"]
    out = requests_dir(ctx) / request_id
    record_path = out / AUDIT_FILE
    if record_path.exists():
        raise AuditRecordExistsError(f"{record_path}: audit records are write-once and this one exists")
    settings = audit_settings(ctx)
    mask_info = None
    mask_dir = None
    if method == "codeunlearn":
        mask_dir = out / DEPLOYED_MASK
        active = requests_dir(ctx) / ACTIVE_MASK
        # A snapshot left by an audit that failed before its record was written is reused if identical.
        if not (mask_dir.exists() and mask_sha256(mask_dir) == mask_sha256(active)):
            snapshot_mask(active, mask_dir)
        deployed_sha = mask_sha256(mask_dir)
        if unlearned.get("mask_sha256") and deployed_sha != unlearned["mask_sha256"]:
            raise RuntimeError(
                f"{requests_dir(ctx) / ACTIVE_MASK}: the active mask changed since request {request_id} wrote it "
                "(another request ran in between); its audit record would not describe the deployed model"
            )
        codebook = read_json(model_dir(ctx, "codebook") / "codebook.json")
        mask_info = {
            "request_sha256": mask_sha256(out / "mask"),
            "deployed_sha256": deployed_sha,
            "codebook_sha256": codebook["sha256"],
            "disabled_codes": len(load_mask(out / "mask").disabled_ids),
            "active_disabled_codes": len(load_mask(mask_dir).disabled_ids),
        }
    forget = load_qa_file(forget_file)
    retain = retain_eval(ctx)
    started = time.perf_counter()
    with torch_threads(ctx.settings["evaluate"].get("threads")):
        checkpoint = load_deployed(ctx, method, out, mask_dir)
        attacks, skipped = attack_metrics(ctx, checkpoint, forget, retain, metrics["after"])
    timing = {"attacks": time.perf_counter() - started}
    all_metrics = {"before": metrics["before"], "after": metrics["after"], **attacks, "timing_s": timing}
    base_role = "codebook" if method == "codeunlearn" else "target"
    name_and_number = split_version(version)
    models = {
        "before": {
            "base": base_version(ctx, base_role),
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
        forget=forget_summary(forget_file, forget),
        models=models,
        metrics=all_metrics,
        thresholds=settings["thresholds"],
        artifacts=request_artifacts(ctx, method, out, forget_file),
        mask=mask_info,
        dvc=dvc_lock_summary(ctx.root / "dvc.lock"),
        skipped=skipped,
        record_path=record_path,
    )
    write_once(record_path, record)
    verdict = record["verdict"]
    tags = {
        "codeunlearn.request_id": request_id,
        "codeunlearn.audit.passed": str(verdict["passed"]).lower(),
        "codeunlearn.audit.failed": ",".join(verdict["failed"]) or "none",
        "codeunlearn.audit.record_sha256": record["record_sha256"],
    }
    with tracking.stage_run(ctx, "audit") as run:
        tracking.log_json(record, f"audit/{AUDIT_FILE}")
        tracking.log_metrics(flat_numbers(all_metrics, "audit"))
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
        "record": str(record_path),
        "record_sha256": record["record_sha256"],
        "mlflow_run_id": audit_run_id,
    }


# --------------------------------------------------------------------------- re-verification


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
    if latest["method"] == "codeunlearn":
        active = requests_dir(ctx) / ACTIVE_MASK
        actual = mask_sha256(active) if (active / MASK_META).exists() else None
        expected = tags.get("codeunlearn.mask_sha256")
        checks.append(
            {
                "check": "active_mask_is_registered",
                "passed": actual is not None and actual == expected,
                "reason": f"{active}: sha256 {str(actual)[:12]}..., registered {str(expected)[:12]}...",
            }
        )
        codebook = read_json(model_dir(ctx, "codebook") / "codebook.json")["sha256"]
        expected = tags.get("codeunlearn.codebook_sha256")
        checks.append(
            {
                "check": "codebook_is_registered",
                "passed": codebook == expected,
                "reason": f"codebook.json sha256 {codebook[:12]}..., registered {str(expected)[:12]}...",
            }
        )
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
    settings = audit_settings(ctx)
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
        forget = load_qa_file(path)
        expected = latest["tags"].get("codeunlearn.forget_sha256")
        checks.append(
            {
                "check": "forget_set_matches_request",
                "passed": records_sha256(forget) == expected,
                "reason": f"{path}: records sha256 {records_sha256(forget)[:12]}..., request {str(expected)[:12]}...",
            }
        )
    retain = retain_eval(ctx)
    mask_dir = requests_dir(ctx) / ACTIVE_MASK if latest["method"] == "codeunlearn" else None
    with torch_threads(ctx.settings["evaluate"].get("threads")):
        checkpoint = load_deployed(ctx, latest["method"], request_dir, mask_dir)
        after = request_scores(checkpoint.model, checkpoint.tokenizer, forget, ctx.utility_sets(), ctx.eval_spec())
        if forget:
            attacks, skipped = attack_metrics(ctx, checkpoint, forget, retain, after)
        else:  # nothing to attack without the forget set: those checks fail as "not measured"
            after["forget_rouge"] = None
            attacks, skipped = {}, {}
    metrics = json_safe({"before": before, "after": after, **attacks})
    verdict = judge(judged_values(metrics), settings["thresholds"], skipped, checks)
    result = {
        "schema": "codeunlearn.reverify/1",
        "checked_at": started.isoformat(timespec="seconds"),
        "model_version": latest["version"],
        "request_id": latest["request_id"],
        "params_hash": ctx.params_hash,
        "git_commit": ctx.git_commit,
        "audit_record_sha256": (record or {}).get("record_sha256"),
        "metrics": metrics,
        "thresholds": json_safe(settings["thresholds"].__dict__),
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
        tracking.log_metrics(flat_numbers(metrics, "reverify"))
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


# --------------------------------------------------------------------------- finding a record


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
