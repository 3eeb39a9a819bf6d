"""Stage 2: the Great Expectations suite over forget and retain; a failure stops the flow before any model work."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from codeunlearn.data.records import QARecord, read_jsonl_records
from codeunlearn.data.validation import ValidationBounds, validate_forget_retain
from codeunlearn.data.validation_report import require_valid
from codeunlearn.io import atomic_write_text, write_json
from tasks import tracking
from tasks.context import RunContext
from tasks.resume import resumable


def bounds_from(ctx: RunContext) -> ValidationBounds:
    return ValidationBounds(**ctx.settings["validation"])


def check_forget_retain(
    ctx: RunContext, forget: list[QARecord], retain: list[QARecord], source: str, out_dir: Path
) -> dict:
    """Validate, log the outcome (ids and expectation names only), write the report only when it passes."""
    report = validate_forget_retain(forget, retain, bounds_from(ctx), source=source)
    with tracking.stage_run(ctx, "validate_forget_set"):
        tracking.log_metrics({f"validation.{k}": v for k, v in report.statistics.items()})
        tracking.log_metrics({"validation.success": float(report.success)})
        tracking.log_json(report.to_dict(), "validation/report.json")
        tracking.log_text(report.to_html(), "validation/report.html")
        require_valid(report, source)
    write_json(out_dir / "report.json", report.to_dict())
    atomic_write_text(out_dir / "report.html", report.to_html())
    return report.to_dict()


@task(name="validate_forget_set", cache_policy=NONE)
@resumable("validate_forget_set")
def validate_forget_set(ctx: RunContext) -> dict:
    splits = ctx.stage_dir("splits")
    forget = read_jsonl_records(splits / "forget.jsonl")
    retain = read_jsonl_records(splits / "retain.jsonl")
    return check_forget_retain(ctx, forget, retain, str(splits / "forget.jsonl"), ctx.stage_dir("validation"))
