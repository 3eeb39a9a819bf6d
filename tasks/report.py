"""Stage 9: one human-readable report per run (markdown with the plots), logged to MLflow."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from codeunlearn.io import atomic_write_text, read_json
from codeunlearn.report import render_report
from tasks import tracking
from tasks.context import RunContext
from tasks.evaluate import GENERAL_CHECK, PLOTS
from tasks.resume import resumable
from tasks.sequential import FILES as SEQUENTIAL_FILES
from tasks.sequential import PLOT as SEQUENTIAL_PLOT


@task(name="report", cache_policy=NONE)
@resumable("report")
def report(ctx: RunContext) -> str:
    eval_dir = ctx.stage_dir("eval")
    details = eval_dir / "details.json"
    frontier = ctx.stage_dir("sweep") / "frontier.json"
    inputs = {
        "profile": ctx.profile,
        "params_hash": ctx.params_hash,
        "splits": read_json(ctx.stage_dir("splits") / "summary.json"),
        "codebook": read_json(ctx.stage_dir("models") / "codebook" / "training.json"),
        "mask": read_json(ctx.stage_dir("mask") / "mask.json"),
        "select": read_json(ctx.stage_dir("mask") / "stats.json"),
        "metrics": read_json(eval_dir / "metrics.json"),
        "details": read_json(details) if details.exists() else {},
        "frontier": read_json(frontier) if frontier.exists() else [],
        "general_check": read_json(general) if (general := eval_dir / GENERAL_CHECK).exists() else {},
        "sequential": {
            name: read_json(path)
            for name, file in SEQUENTIAL_FILES.items()
            if (path := ctx.stage_dir("sequential") / file).exists()
        },
    }
    plots = {title: f"../eval/{name}" for name, title in PLOTS.items() if (eval_dir / name).exists()}
    if (frontier_plot := ctx.stage_dir("sweep") / "frontier.png").exists():
        plots["Forget/utility frontier over S'"] = "../sweep/frontier.png"
    if (sequential_plot := ctx.stage_dir("sequential") / SEQUENTIAL_PLOT).exists():
        plots["Sustainability and scalability"] = f"../sequential/{SEQUENTIAL_PLOT}"
    path = ctx.stage_dir("report") / "report.md"
    atomic_write_text(path, render_report(inputs, plots=plots))
    with tracking.stage_run(ctx, "report"):
        tracking.log_artifacts(path, "report")
        for name in PLOTS:
            if (eval_dir / name).exists():
                tracking.log_artifacts(eval_dir / name, "report")
        if frontier_plot.exists():
            tracking.log_artifacts(frontier_plot, "report")
        if sequential_plot.exists():
            tracking.log_artifacts(sequential_plot, "report")
    return str(path)
