"""An on-demand unlearning request: validate a forget file, unlearn, evaluate, register the new version.

For CodeUnlearn the deployed model is the codebook model plus the *active* mask, the union of every
request so far: each request adds its codes, and ``unmask`` would restore the codebook model exactly.
"""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime
from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from codeunlearn.checkpoints import Checkpoint, load_checkpoint, save_checkpoint
from codeunlearn.data.records import read_jsonl_records, records_sha256
from codeunlearn.data.tofu import load_qa_file
from codeunlearn.eval.scoring import request_scores
from codeunlearn.io import read_json, write_json
from codeunlearn.methods import get_method
from codeunlearn.methods.codeunlearn.mask import CodeMask, apply_mask, load_mask, save_mask, unmask
from tasks import tracking
from tasks.context import RunContext
from tasks.models import load_role
from tasks.validate import check_forget_retain

ACTIVE_MASK = "active_mask"


def requests_dir(ctx: RunContext) -> Path:
    return ctx.stage_dir("requests")


def mask_sha256(directory: Path) -> str:
    digest = hashlib.sha256()
    for name in ("mask.safetensors", "mask.json"):
        digest.update((directory / name).read_bytes())
    return digest.hexdigest()


@task(name="load_request", cache_policy=NONE)
def load_request(ctx: RunContext, forget_file: str) -> dict:
    """Read and validate the forget file against the retain split; a bad file stops here, writing nothing."""
    forget = load_qa_file(forget_file)
    retain = read_jsonl_records(ctx.stage_dir("splits") / "retain.jsonl")
    sha = records_sha256(forget)
    request_id = f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{sha[:8]}"
    report = check_forget_retain(ctx, forget, retain, forget_file, requests_dir(ctx) / request_id / "validation")
    return {"request_id": request_id, "forget_sha256": sha, "forget_count": len(forget), "validation": report}


@task(name="unlearn_request", cache_policy=NONE)
def unlearn_request(ctx: RunContext, forget_file: str, method: str, request: dict) -> dict:
    """Run the method; CodeUnlearn adds its codes to the active mask, others write an edited model."""
    forget = load_qa_file(forget_file)
    retain, _ = ctx.retain_split()
    out = requests_dir(ctx) / request["request_id"]
    base_role = "codebook" if method == "codeunlearn" else "target"
    checkpoint = load_role(ctx, base_role)
    active_dir = requests_dir(ctx) / ACTIVE_MASK
    previous = load_mask(active_dir) if (active_dir / "mask.json").exists() else None
    if previous is not None and checkpoint.bottleneck is not None:
        apply_mask(checkpoint.bottleneck, previous, source=str(active_dir))
    params = ctx.method_params(method, {"request_id": request["request_id"], "params_hash": ctx.params_hash})
    started = time.perf_counter()
    with tracking.stage_run(ctx, "unlearn_request"):
        result = get_method(method).unlearn(checkpoint.model, checkpoint.tokenizer, forget, retain, params)
        latency = time.perf_counter() - started
        summary = {"method": method, "request_latency_s": latency, **result.stats}
        if ctx.settings["tracking"]["log_raw_text"]:
            # Opt-in only: the forget set is the very data being erased.
            tracking.log_artifacts(Path(forget_file), "forget_set")
        if "code_mask" in result.artifacts:
            new_mask: CodeMask = result.artifacts["code_mask"]
            merged = previous.merged_with(new_mask) if previous is not None else new_mask
            save_mask(new_mask, out / "mask")
            save_mask(merged, active_dir)
            summary["active_disabled_codes"] = len(merged.disabled_ids)
            summary["mask_sha256"] = mask_sha256(active_dir)
            tracking.log_artifacts(out / "mask", "mask")
        else:
            save_checkpoint(result.model, checkpoint.tokenizer, out / "model")
        tracking.log_metrics({k: v for k, v in summary.items() if isinstance(v, int | float)})
    write_json(out / "unlearn.json", summary)
    return summary


@task(name="evaluate_request", cache_policy=NONE)
def evaluate_request(ctx: RunContext, forget_file: str, method: str, request: dict) -> dict:
    """Forget ROUGE on the request's own forget set beside model utility (retain, real authors, world
    facts: ROUGE, Prob, truth ratio), before and after the request."""
    forget = load_qa_file(forget_file)
    utility = ctx.utility_sets()
    spec = ctx.eval_spec()
    out = requests_dir(ctx) / request["request_id"]

    def scores(checkpoint: Checkpoint) -> dict[str, float]:
        return request_scores(checkpoint.model, checkpoint.tokenizer, forget, utility, spec)

    if method == "codeunlearn":
        checkpoint = load_role(ctx, "codebook")
        active = load_mask(requests_dir(ctx) / ACTIVE_MASK)
        new_ids = set(load_mask(out / "mask").disabled_ids)
        kept = [i for i in active.disabled_ids if i not in new_ids]
        before = CodeMask(
            kept,
            [0.0] * len(kept),
            active.codebook_sha256,
            active.num_codes,
            gate=active.gate,
            strength=active.strength,
        )
        apply_mask(checkpoint.bottleneck, before)
        metrics = {"before": scores(checkpoint)}
        unmask(checkpoint.bottleneck)
        apply_mask(checkpoint.bottleneck, active)
        metrics["after"] = scores(checkpoint)
    else:
        metrics = {"before": scores(load_role(ctx, "target")), "after": scores(load_checkpoint(out / "model"))}
    write_json(out / "metrics.json", metrics)
    with tracking.stage_run(ctx, "evaluate_request"):
        tracking.log_metrics({f"{when}.{k}": v for when, values in metrics.items() for k, v in values.items()})
    return metrics


@task(name="register_request", cache_policy=NONE)
def register_request(ctx: RunContext, method: str, request: dict, unlearned: dict) -> str | None:
    """A new registered version of the unlearned model, tagged with what an auditor needs."""
    out = requests_dir(ctx) / request["request_id"]
    tags = {
        "codeunlearn.request_id": request["request_id"],
        "codeunlearn.method": method,
        "codeunlearn.forget_sha256": request["forget_sha256"],
        "codeunlearn.forget_count": str(request["forget_count"]),
    }
    if method == "codeunlearn":
        codebook = read_json(ctx.stage_dir("models") / "codebook" / "codebook.json")
        tags["codeunlearn.codebook_sha256"] = codebook["sha256"]
        tags["codeunlearn.mask_sha256"] = unlearned["mask_sha256"]
        artifact = requests_dir(ctx) / ACTIVE_MASK
    else:
        artifact = out / "model"
    with tracking.stage_run(ctx, "register_request"):
        version = tracking.register_model_dir(ctx, artifact, f"unlearned-{method}", tags)
    write_json(out / "registered.json", {"version": version, "tags": tags})
    return version
