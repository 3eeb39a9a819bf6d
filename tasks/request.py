"""An on-demand unlearning request: validate a forget file, unlearn, evaluate, register the new version.

Every method alike (``UnlearningMethod``'s deployment): it starts from its base model, and a cumulative
method (CodeUnlearn) from the state every earlier request left deployed, its *active* mask: each request
adds its codes, and ``unmask`` would restore the codebook model exactly.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from codeunlearn.config import RETAIN_SPLIT
from codeunlearn.data.forget_files import unlearning_records
from codeunlearn.data.records import read_jsonl_records, records_sha256
from codeunlearn.data.validation import check_request
from codeunlearn.data.validation_report import ValidationReport
from codeunlearn.io import write_json
from codeunlearn.methods import get_method
from codeunlearn.metrics.scoring import request_scores
from codeunlearn.models.load import Checkpoint
from tasks import tracking
from tasks.common import (
    check_forget_retain,
    deploy,
    forget_records,
    load_role,
    model_dir,
    neighbour_sets,
    read_forget_file,
    record_timing,
    request_control,
    request_extra_scores,
    requests_dir,
    run_method,
)
from tasks.context import RunContext


def deployed_state(ctx: RunContext, method: str, request_id: str) -> Path:
    return get_method(method).deployed_state(requests_dir(ctx), requests_dir(ctx) / request_id)


def check_request_file(ctx: RunContext, forget_file: str, method: str, kind: str | None = None) -> ValidationReport:
    """The forget file against the profile's retain split, and its record kind against what the method
    unlearns, before any run is opened or folder made: a rejected request raises here and writes nothing
    (the flow's first step, before tracking starts)."""
    records = read_forget_file(ctx, forget_file, kind)
    get_method(method).check_record_kind(records.kind, forget_file)
    retain = read_jsonl_records(ctx.out_dir / RETAIN_SPLIT)
    return check_request(unlearning_records(records), retain, ctx.settings["validation"], forget_file)


@task(name="load_request", cache_policy=NONE)
def load_request(
    ctx: RunContext, forget_file: str, checked: ValidationReport | None = None, kind: str | None = None
) -> dict:
    """Read the forget file and record its validation against the retain split (``checked``, the report of
    ``check_request_file``, or validated here); a bad file stops here."""
    records = read_forget_file(ctx, forget_file, kind)
    forget = unlearning_records(records)
    retain = read_jsonl_records(ctx.out_dir / RETAIN_SPLIT)
    sha = records_sha256(forget)
    request_id = f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{sha[:8]}"
    out = requests_dir(ctx) / request_id / "validation"
    report = check_forget_retain(ctx, forget, retain, forget_file, out, checked)
    return {
        "request_id": request_id,
        "forget_sha256": sha,
        "forget_count": len(forget),
        "forget_kind": str(records.kind),
        "validation": report,
    }


@task(name="unlearn_request", cache_policy=NONE)
def unlearn_request(
    ctx: RunContext, forget_file: str, method: str, request: dict, retain_file: str | None = None
) -> dict:
    """Run the method from the deployed model and save its result (a cumulative one adds to the deployed
    state). Its control and calibration: the neighbour file's control part, else the profile's."""
    forget = forget_records(ctx, forget_file, request["forget_kind"])
    retain = request_control(ctx, retain_file)
    out = requests_dir(ctx) / request["request_id"]
    provenance = {"request_id": request["request_id"], "params_hash": ctx.params_hash}
    state = deployed_state(ctx, method, out.name)
    with tracking.stage_run(ctx, "unlearn_request"):
        run = run_method(ctx, method, forget, retain, out, provenance, state)
        summary = {"method": method, "request_latency_s": run.wall_s, **run.result.stats, **run.deployed}
        if ctx.settings["tracking"]["log_raw_text"]:
            # Opt-in only: the forget set is the very data being erased.
            tracking.log_artifacts(Path(forget_file), "forget_set")
        saved = out / get_method(method).saved_as
        if saved != state:  # the request's own result; the deployed state is logged when it is registered
            tracking.log_artifacts(saved, saved.name)
        tracking.log_metrics({k: v for k, v in summary.items() if isinstance(v, int | float)})
    write_json(out / "unlearn.json", summary)
    return summary


@task(name="evaluate_request", cache_policy=NONE)
def evaluate_request(
    ctx: RunContext, forget_file: str, method: str, request: dict, retain_file: str | None = None
) -> dict:
    """Forget ROUGE on the request's own forget set beside model utility (retain, real authors, world
    facts: ROUGE, Prob, truth ratio) and the neighbour file's held-out part (ROUGE and Prob of QAs, VerbMem
    of passages), before and after; a passage request also scores MUSE's KnowMem on other news
    (``request_extra_scores``). What the forget records' scores are depends on their kind
    (``metrics.scoring.request_scores``)."""
    forget = read_forget_file(ctx, forget_file, request["forget_kind"]).records
    neighbours = neighbour_sets(ctx, retain_file)
    held_out = neighbours[1] if neighbours is not None else ()
    extra = request_extra_scores(ctx, request["forget_kind"])
    utility = ctx.utility_sets()
    spec = ctx.eval_spec()
    out = requests_dir(ctx) / request["request_id"]
    unlearning = get_method(method)
    state = deployed_state(ctx, method, out.name)

    def scores(checkpoint: Checkpoint) -> dict[str, float]:
        return request_scores(
            checkpoint.model, checkpoint.tokenizer, forget, utility, spec, neighbour=held_out, extra=extra
        )

    started = time.perf_counter()
    before = unlearning.before(lambda: load_role(ctx, unlearning.base_role), state, out)
    metrics = {"before": scores(before)}
    del before
    metrics["after"] = scores(deploy(ctx, method, state))
    evaluate_s = time.perf_counter() - started
    write_json(out / "metrics.json", metrics)
    record_timing(out, evaluate_s=evaluate_s)
    with tracking.stage_run(ctx, "evaluate_request"):
        tracking.log_metrics({f"{when}.{k}": v for when, values in metrics.items() for k, v in values.items()})
        tracking.log_metrics({"evaluate_s": evaluate_s})
    return metrics


@task(name="register_request", cache_policy=NONE)
def register_request(
    ctx: RunContext, method: str, request: dict, unlearned: dict, started: float | None = None
) -> str | None:
    """A new registered version of the unlearned model, tagged with what an auditor needs. ``started``
    (``time.perf_counter()`` when the request flow's first task began) gives the request's latency,
    ``request_s``: everything up to this version registered, evaluation excluded."""
    out = requests_dir(ctx) / request["request_id"]
    unlearning = get_method(method)
    state = deployed_state(ctx, method, out.name)
    tags = {
        "codeunlearn.request_id": request["request_id"],
        "codeunlearn.method": method,
        "codeunlearn.forget_sha256": request["forget_sha256"],
        "codeunlearn.forget_count": str(request["forget_count"]),
        **unlearning.version_tags(model_dir(ctx, unlearning.base_role), state, unlearned),
    }
    with tracking.stage_run(ctx, "register_request"):
        version = tracking.register_model_dir(ctx, state, f"unlearned-{method}", tags)
        if started is not None:
            request_s = time.perf_counter() - started
            record_timing(out, request_s=request_s)
            tracking.log_metrics({"request_s": request_s})
    write_json(out / "registered.json", {"version": version, "tags": tags})
    return version
