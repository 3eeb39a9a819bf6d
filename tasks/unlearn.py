"""Stages 6-7: select the codes to disable for the forget set and save the mask (CodeUnlearn's request)."""

from __future__ import annotations

import time

from prefect import task
from prefect.cache_policies import NONE

from codeunlearn.data.records import read_jsonl_records
from codeunlearn.io import write_json
from codeunlearn.methods import get_method
from codeunlearn.methods.codeunlearn.mask import save_mask
from tasks import tracking
from tasks.context import RunContext
from tasks.models import load_role
from tasks.resume import resumable


@task(name="select_codes", cache_policy=NONE)
@resumable("select_codes")
def select_codes(ctx: RunContext) -> dict:
    splits = ctx.stage_dir("splits")
    forget = read_jsonl_records(splits / "forget.jsonl")
    control, _ = ctx.retain_split()
    codebook_model = load_role(ctx, "codebook")
    params = ctx.method_params("codeunlearn", {"params_hash": ctx.params_hash, "request": "pipeline"})
    started = time.perf_counter()
    with tracking.stage_run(ctx, "select_codes"):
        result = get_method("codeunlearn").unlearn(
            codebook_model.model, codebook_model.tokenizer, forget, control, params
        )
        latency = time.perf_counter() - started
        mask = result.artifacts["code_mask"]
        out = ctx.stage_dir("mask")
        save_mask(mask, out)
        stats = {**result.stats, "request_latency_s": latency}
        tracking.log_metrics(stats)
        tracking.log_artifacts(out, "mask")
    write_json(out / "stats.json", stats)
    return stats
