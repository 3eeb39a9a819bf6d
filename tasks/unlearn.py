"""Stages 6-7: select the codes to disable for the forget set and save the mask (CodeUnlearn's request)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from codeunlearn.data.records import read_jsonl_records
from codeunlearn.io import write_json
from tasks import tracking
from tasks.common import run_method
from tasks.context import RunContext
from tasks.resume import resumable

METHOD = "codeunlearn"  # the main job's method; flows.compare runs the others beside it


@task(name="select_codes", cache_policy=NONE)
@resumable("select_codes")
def select_codes(ctx: RunContext) -> dict:
    forget = read_jsonl_records(ctx.stage_dir("splits") / "forget.jsonl")
    control, _ = ctx.retain_split()
    provenance = {"params_hash": ctx.params_hash, "request": "pipeline"}
    with tracking.stage_run(ctx, "select_codes"):
        run = run_method(ctx, METHOD, forget, control, ctx.out_dir, provenance)
        out = ctx.stage_dir("mask")
        stats = {**run.result.stats, "request_latency_s": run.wall_s}
        tracking.log_metrics(stats)
        tracking.log_artifacts(out, "mask")
    write_json(out / "stats.json", stats)
    return stats
