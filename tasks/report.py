"""Stage 9: one human-readable report per run (markdown with the plots), logged to MLflow."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from codeunlearn.io import atomic_write_text, read_json
from codeunlearn.report import render_report
from tasks import tracking
from tasks.context import RunContext


@task(name="report", cache_policy=NONE)
def report(ctx: RunContext) -> str:
    inputs = {
        "profile": ctx.profile,
        "params_hash": ctx.params_hash,
        "splits": read_json(ctx.stage_dir("splits") / "summary.json"),
        "codebook": read_json(ctx.stage_dir("models") / "codebook" / "training.json"),
        "mask": read_json(ctx.stage_dir("mask") / "mask.json"),
        "select": read_json(ctx.stage_dir("mask") / "stats.json"),
        "metrics": read_json(ctx.stage_dir("eval") / "metrics.json"),
    }
    path = ctx.stage_dir("report") / "report.md"
    atomic_write_text(path, render_report(inputs, plots={"ROUGE-L, forget vs retain": "../eval/rouge.png"}))
    with tracking.stage_run(ctx, "report"):
        tracking.log_artifacts(path, "report")
        tracking.log_artifacts(ctx.stage_dir("eval") / "rouge.png", "report")
    return str(path)
