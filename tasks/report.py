"""The run's reports: the main job's (what the request did, measured) and the studies' (how it varies),
each markdown with its plots, logged to MLflow."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from codeunlearn.eval.sequential import FILES as SEQUENTIAL_FILES
from codeunlearn.eval.suite import GENERAL_CHECK
from codeunlearn.io import atomic_write_text, read_json
from codeunlearn.report.plots import FRONTIER_PLOT, PLOTS, SEQUENTIAL_PLOT
from codeunlearn.report.run import render_report
from codeunlearn.report.studies import render_studies_report
from tasks import tracking
from tasks.context import RunContext
from tasks.resume import resumable

STUDIES_REPORT = Path("studies") / "report.md"


@task(name="report", cache_policy=NONE)
@resumable("report")
def report(ctx: RunContext) -> str:
    eval_dir = ctx.stage_dir("eval")
    details = eval_dir / "details.json"
    inputs = {
        "profile": ctx.profile,
        "params_hash": ctx.params_hash,
        "splits": read_json(ctx.stage_dir("splits") / "summary.json"),
        "codebook": read_json(ctx.stage_dir("models") / "codebook" / "training.json"),
        "mask": read_json(ctx.stage_dir("mask") / "mask.json"),
        "select": read_json(ctx.stage_dir("mask") / "stats.json"),
        "metrics": read_json(eval_dir / "metrics.json"),
        "details": read_json(details) if details.exists() else {},
        "general_check": read_json(general) if (general := eval_dir / GENERAL_CHECK).exists() else {},
    }
    plots = {title: f"../eval/{name}" for name, title in PLOTS.items() if (eval_dir / name).exists()}
    path = ctx.stage_dir("report") / "report.md"
    atomic_write_text(path, render_report(inputs, plots=plots))
    _log_report(ctx, "report", path, [eval_dir / name for name in PLOTS])
    return str(path)


@task(name="studies_report", cache_policy=NONE)
@resumable("studies_report")
def studies_report(ctx: RunContext) -> str:
    frontier = ctx.stage_dir("sweep") / "frontier.json"
    sequential_dir = ctx.stage_dir("sequential")
    inputs = {
        "profile": ctx.profile,
        "params_hash": ctx.params_hash,
        "codebook_sha256": read_json(ctx.stage_dir("models") / "codebook" / "codebook.json")["sha256"],
        "frontier": read_json(frontier) if frontier.exists() else [],
        "sequential": {
            name: read_json(path) for name, file in SEQUENTIAL_FILES.items() if (path := sequential_dir / file).exists()
        },
    }
    plot_files = {
        "Forget/utility frontier over S'": ctx.stage_dir("sweep") / FRONTIER_PLOT,
        "Sustainability and scalability": sequential_dir / SEQUENTIAL_PLOT,
    }
    plots = {title: f"../{file.parent.name}/{file.name}" for title, file in plot_files.items() if file.exists()}
    path = ctx.out_dir / STUDIES_REPORT
    atomic_write_text(path, render_studies_report(inputs, plots=plots))
    _log_report(ctx, "studies_report", path, list(plot_files.values()))
    return str(path)


def _log_report(ctx: RunContext, stage: str, path: Path, plots: list[Path]) -> None:
    with tracking.stage_run(ctx, stage):
        tracking.log_artifacts(path, "report")
        for plot in plots:
            if plot.exists():
                tracking.log_artifacts(plot, "report")
