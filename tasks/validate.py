"""Stage 2: the Great Expectations suite over forget and retain; a failure stops the flow before any model work."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from codeunlearn.data.records import read_jsonl_records
from tasks.common import check_forget_retain
from tasks.context import RunContext
from tasks.resume import resumable


@task(name="validate_forget_set", cache_policy=NONE)
@resumable("validate_forget_set")
def validate_forget_set(ctx: RunContext) -> dict:
    splits = ctx.stage_dir("splits")
    forget = read_jsonl_records(splits / "forget.jsonl")
    retain = read_jsonl_records(splits / "retain.jsonl")
    return check_forget_retain(ctx, forget, retain, str(splits / "forget.jsonl"), ctx.stage_dir("validation"))
