"""The tuning grid (``compare.tune``): one task per point (unlearn with the point's params, evaluate), and
the summary that selects each method's point by the same rule and draws the frontier.

A point already run under the same settings, data and code is read back from its JSON file instead of
being rerun (``point_key``), so a long grid can be completed over several sittings.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from codeunlearn.codehash import files_hash, module_closure
from codeunlearn.config import settings_hash
from codeunlearn.data.records import read_jsonl_records
from codeunlearn.eval.suite import Suite
from codeunlearn.eval.tune import (
    SelectionRule,
    bracketing,
    grid_points,
    point_label,
    select_points,
    selected_rows,
    selection_table,
)
from codeunlearn.io import atomic_write_text, read_json, write_json
from codeunlearn.methods import get_method
from codeunlearn.metrics.scoring import flatten_metrics
from codeunlearn.report.leaderboard import leaderboard_rows
from codeunlearn.report.plots import tune_frontier_plot
from tasks import tracking
from tasks.common import deploy, run_method
from tasks.context import REPO_ROOT, TUNE_SUMMARY, RunContext, torch_threads
from tasks.resume import NOT_RESULTS, fingerprint

FRONTIER_FILE = "frontier.png"
RENDERING = REPO_ROOT / "codeunlearn" / "report"  # the library's folder that only renders results
# Importing the methods package registers every method; a point runs only its own (and what that imports).
METHOD_REGISTRY = "codeunlearn.methods"


def tune_settings(ctx: RunContext) -> dict[str, Any]:
    return ctx.settings["compare"]["tune"]


def tune_dir(ctx: RunContext) -> Path:
    return ctx.out_dir / TUNE_SUMMARY.parent


def method_grid(ctx: RunContext, method: str) -> list[dict[str, Any]]:
    """The points of ``compare.tune.grids.<method>``; a missing grid or an unknown knob is an error
    naming the field, raised before anything runs."""
    where = f"params.yaml: compare.tune.grids.{method}"
    grids = tune_settings(ctx)["grids"]
    if method not in grids:
        raise KeyError(f"{where}: no grid for method {method!r} (known: {', '.join(sorted(grids))})")
    return grid_points(grids[method], get_method(method).params(ctx.settings), where)


def point_context(ctx: RunContext, method: str, params: dict[str, Any]) -> RunContext:
    """The run's context with the point's params set in the method's params block."""
    return ctx.with_method_params(method, params)


def point_code_files(method: str) -> tuple[Path, ...]:
    """The code a point of ``method`` runs: this module and every project module it imports, and the
    method's own module with its imports (``codehash.module_closure``), but for the other methods, which
    the methods package imports only to register them, and ``report/`` (tables and plots drawn from the
    results). So a change to one method never reruns another method's points."""
    opaque = (METHOD_REGISTRY,)
    own = type(get_method(method)).__module__
    files = set(module_closure(__name__, opaque=opaque)) | set(module_closure(own, opaque=opaque))
    return tuple(sorted(path for path in files if not path.is_relative_to(RENDERING)))


@functools.cache
def code_fingerprint(method: str) -> str:
    return files_hash(point_code_files(method))


def point_key(ctx: RunContext, method: str, params: dict[str, Any]) -> str:
    """What a point's result depends on: the method's merged params, the identity of the model it starts
    from and of the oracle (forget quality is relative to it), the evaluation settings and the code."""
    point = point_context(ctx, method, params)
    block = {k: v for k, v in point.method_params(method, {}).items() if k not in NOT_RESULTS}
    return settings_hash(
        {
            "method": method,
            "params": block,
            "start": fingerprint(point, get_method(method).base_stage),
            "oracle": fingerprint(point, "finetune_oracle"),
            "evaluate": point.settings["evaluate"],
            "attacks": tune_settings(ctx)["attacks"],
            "code": code_fingerprint(method),
        }
    )


def point_file(ctx: RunContext, method: str, key: str) -> Path:
    return tune_dir(ctx) / "points" / method / f"{key[:16]}.json"


def completed_point(ctx: RunContext, method: str, key: str) -> dict[str, Any] | None:
    path = point_file(ctx, method, key)
    if not ctx.settings.get("resume", True) or not path.exists():
        return None
    record = read_json(path)
    return record if record.get("key") == key else None


@task(name="tune_point", cache_policy=NONE)
def tune_point(ctx: RunContext, suite: Suite, method: str, index: int, params: dict[str, Any]) -> dict[str, Any]:
    """One grid point: unlearn the forget split with the point's params, evaluate the deployed model
    (attacks only if ``compare.tune.attacks``), log an MLflow child run, write the point's JSON."""
    ctx.apply_threads()
    key = point_key(ctx, method, params)
    if (previous := completed_point(ctx, method, key)) is not None:
        return {**previous, "index": index}
    point = point_context(ctx, method, params)
    cfg = tune_settings(ctx)
    forget = read_jsonl_records(ctx.stage_dir("splits") / "forget.jsonl")
    retain, _ = ctx.retain_split()
    out = tune_dir(ctx) / "runs" / method / key[:16]
    provenance = {"params_hash": point.params_hash, "request": "tune"}
    with tracking.stage_run(point, f"tune_{method}_{index}"):
        tracking.log_flat_params({"tune.method": method, "tune.index": index, "tune.key": key})
        tracking.log_flat_params(tracking.flatten(params, "tune.params."))
        run = run_method(point, method, forget, retain, out, provenance)
        checkpoint = deploy(point, method, out / get_method(method).saved_as)
        with torch_threads(ctx.settings["evaluate"].get("threads")):
            row = suite.run(f"{method}[{index}]", checkpoint, quantize=cfg["attacks"], relearn=cfg["attacks"])["row"]
        stats = {"wall_s": run.wall_s, "peak_mem_mb": run.peak_mem_mb}
        tracking.log_metrics({**flatten_metrics(row), **stats})
    record = {"method": method, "index": index, "params": params, "key": key, "row": row, "stats": stats}
    write_json(point_file(ctx, method, key), record)
    if not cfg["keep_models"]:
        shutil.rmtree(out, ignore_errors=True)
    return record


def exact_settings(ctx: RunContext, methods: list[str]) -> dict[str, Any]:
    """The settings a tune's numbers depend on, as run: the grids and rule, each method's params block
    before the grid's overrides, the evaluation, the data and threads."""
    return {
        "tune": tune_settings(ctx),
        "methods": {m: get_method(m).params(ctx.settings) for m in methods},
        "evaluate": ctx.settings["evaluate"],
        "data": ctx.settings["data"],
        "model": ctx.settings["model"],
        "seed": ctx.settings["seed"],
        "threads": ctx.settings["threads"],
        "compare": {k: v for k, v in ctx.settings["compare"].items() if k != "tune"},
    }


def summarize_tune(
    ctx: RunContext, points: list[dict[str, Any]], target: dict[str, Any], oracle: dict[str, Any], methods: list[str]
) -> dict[str, Any]:
    """Each method's selected point by the one rule, whether its grid brackets the trade-off, the
    leaderboard of the selected points with their params."""
    cfg = tune_settings(ctx)
    rule = SelectionRule.from_settings(cfg["select"])
    selection = select_points(points, methods, target, rule)
    for method in methods:
        own = [p for p in points if p["method"] == method]
        selection[method]["bracketing"] = bracketing(own, target, oracle, rule, cfg["oracle_margin"])
    rows = leaderboard_rows(selected_rows(points, selection))
    for row in rows:
        chosen = selection[row["method"]]
        row.update(status=chosen["status"], point=chosen.get("index"), params=chosen.get("params"))
    return {
        "rule": cfg["select"],
        "floors": rule.floors(target),
        "target": target,
        "oracle": oracle,
        "points": [{**p, "label": point_label(p["params"])} for p in points],
        "selection": selection,
        "leaderboard": rows,
        "settings": exact_settings(ctx, methods),
        "git_commit": ctx.git_commit,
        "params_hash": ctx.params_hash,
        "code_fingerprints": {method: code_fingerprint(method) for method in methods},
    }


@task(name="tune_summary", cache_policy=NONE)
def tune_summary(
    ctx: RunContext, points: list[dict[str, Any]], target: dict[str, Any], oracle: dict[str, Any], methods: list[str]
) -> dict[str, Any]:
    """Write ``tune/tune.json``, ``tune/leaderboard.md`` and the frontier plot; log them to MLflow."""
    summary = summarize_tune(ctx, points, target, oracle, methods)
    out = tune_dir(ctx)
    write_json(out / TUNE_SUMMARY.name, summary)
    atomic_write_text(out / "leaderboard.md", selection_table(summary["leaderboard"]))
    tune_frontier_plot(summary, out / FRONTIER_FILE)
    with tracking.stage_run(ctx, "tune_summary"):
        for row in summary["leaderboard"]:
            tracking.log_metrics({f"{row['method']}.{k}": v for k, v in row.items() if k != "point"})
        for name in (TUNE_SUMMARY.name, "leaderboard.md", FRONTIER_FILE):
            tracking.log_artifacts(out / name, "tune")
    return summary
