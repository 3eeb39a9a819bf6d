"""The comparison: every method on the same model, forget set and evaluation, then a leaderboard.

``compare.tuned``: each method at the point ``flows.tune`` selected for it (``tune/tune.json``) instead of
its params block, under the same attacks; those runs and their leaderboard live in ``compare/tuned/``,
beside the literature settings', and share the oracle's and target's evaluations.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from codeunlearn.config import settings_hash
from codeunlearn.data.records import read_jsonl_records
from codeunlearn.eval.suite import Suite
from codeunlearn.eval.tune import SELECTED
from codeunlearn.io import atomic_write_text, read_json, write_json
from codeunlearn.methods import get_method
from codeunlearn.metrics.scoring import ModelScores, flatten_metrics
from codeunlearn.report.leaderboard import leaderboard_rows, to_csv, to_markdown
from codeunlearn.report.plots import leaderboard_plot
from tasks import tracking
from tasks.common import build_suite, deploy, load_role, run_method
from tasks.context import TUNE_SUMMARY, RunContext, torch_threads
from tasks.resume import fingerprint

REFERENCES = ("target", "oracle")  # scored once, whatever params the methods run with
TUNED_DIR = "tuned"
SELECTION_FILE = "selection.json"


def is_tuned(ctx: RunContext) -> bool:
    return bool(ctx.settings["compare"].get("tuned"))


def leaderboard_dir(ctx: RunContext) -> Path:
    root = ctx.stage_dir("compare")
    return root / TUNED_DIR if is_tuned(ctx) else root


def method_dir(ctx: RunContext, method: str) -> Path:
    return (ctx.stage_dir("compare") if method in REFERENCES else leaderboard_dir(ctx)) / method


@task(name="tuned_contexts", cache_policy=NONE)
def tuned_contexts(ctx: RunContext, methods: list[str]) -> dict[str, RunContext]:
    """Each method's context with its tuned point's params set in its params block. A method whose grid
    has no point at the utility floor is left out and says so; one the summary never tuned is an error.
    Writes ``compare/tuned/selection.json``: which point each method runs, and from which tuning."""
    path = ctx.out_dir / TUNE_SUMMARY
    if not path.exists():
        raise FileNotFoundError(f"{path}: no tuning summary; run python -m flows.tune --profile {ctx.profile} first")
    summary = read_json(path)
    untuned = [m for m in methods if m not in summary["selection"]]
    if untuned:
        raise KeyError(f"{path}: selection: no grid run for {', '.join(untuned)} (python -m flows.tune --methods ...)")
    selection = {m: summary["selection"][m] for m in methods}
    contexts = {}
    for method, chosen in selection.items():
        if chosen["status"] != SELECTED:
            logging.getLogger(__name__).warning("%s: left out of the tuned comparison (%s)", method, chosen["status"])
            continue
        contexts[method] = ctx.with_method_params(method, chosen["params"])
    record = {"tune_git_commit": summary["git_commit"], "tune_params_hash": summary["params_hash"]}
    write_json(leaderboard_dir(ctx) / SELECTION_FILE, {**record, "selection": selection})
    return contexts


def selection_notes(ctx: RunContext) -> str:
    """The tuned leaderboard's footnote: each method's point and params, or why it was left out."""
    path = leaderboard_dir(ctx) / SELECTION_FILE
    if not is_tuned(ctx) or not path.exists():
        return ""
    saved = read_json(path)
    lines = [f"\nEach method at the point `flows.tune` selected (tune.json at commit {saved['tune_git_commit']}):\n"]
    for method, chosen in saved["selection"].items():
        where = f"point {chosen['index']}, {chosen['params']}" if chosen["status"] == SELECTED else chosen["status"]
        lines.append(f"- {method}: {where}")
    return "\n".join(lines) + "\n"


@task(name="unlearn_method", cache_policy=NONE)
def unlearn_method(ctx: RunContext, method: str) -> dict[str, Any]:
    """Unlearn the pipeline's forget split with one method, from the model the method starts from (the
    codebook model for CodeUnlearn, the target for the others). Wall time and peak memory cover the
    unlearning step only."""
    ctx.apply_threads()
    out = method_dir(ctx, method)
    identity = method_fingerprint(ctx, method)
    if (previous := completed_method(ctx, method, identity)) is not None:
        return previous
    forget = read_jsonl_records(ctx.stage_dir("splits") / "forget.jsonl")
    retain, _ = ctx.retain_split()  # the authors a method may use; the others are scored
    provenance = {"params_hash": ctx.params_hash, "request": "compare"}
    with tracking.stage_run(ctx, f"unlearn_{method}"):
        run = run_method(ctx, method, forget, retain, out, provenance)
        stats = {
            **{k: v for k, v in run.result.stats.items() if isinstance(v, int | float | str)},
            "wall_s": run.wall_s,
            "peak_mem_mb": run.peak_mem_mb,
        }
        tracking.log_metrics({k: v for k, v in stats.items() if isinstance(v, int | float)})
    write_json(out / "stats.json", {**stats, "fingerprint": identity})
    return stats


def method_fingerprint(ctx: RunContext, method: str) -> str:
    """The method's params and the identity of the model it starts from (that stage's fingerprint)."""
    block = ctx.method_params(method, {})
    start = fingerprint(ctx, get_method(method).base_stage)
    return settings_hash({"method": method, "params": block, "start": start})


def completed_method(ctx: RunContext, method: str, identity: str) -> dict[str, Any] | None:
    """A previous comparison's result for the same method, params and starting model (a killed comparison
    restarts without retraining the methods it finished), unless ``resume`` is off."""
    out = method_dir(ctx, method)
    stats_file = out / "stats.json"
    artifact = out / get_method(method).saved_as
    if not ctx.settings.get("resume", True) or not stats_file.exists() or not artifact.exists():
        return None
    stats = read_json(stats_file)
    if stats.pop("fingerprint", None) != identity:
        return None
    return stats


def evaluation_fingerprint(ctx: RunContext, name: str) -> str:
    """What one comparison row depends on: the evaluation settings, the model's identity and the oracle's
    (every row's forget quality and PrivLeak are relative to it). The data is in each stage fingerprint."""
    if name in ("target", "oracle"):
        model = fingerprint(ctx, f"finetune_{name}")
    else:
        model = method_fingerprint(ctx, name)
    return settings_hash(
        {
            "row": name,
            "evaluate": ctx.settings["evaluate"],
            "model": model,
            "oracle": fingerprint(ctx, "finetune_oracle"),
        }
    )


def evaluation_file(ctx: RunContext, name: str) -> Path:
    return method_dir(ctx, name) / "evaluation.json"


def completed_evaluation(ctx: RunContext, name: str) -> dict[str, Any] | None:
    """A previous comparison's evaluation of the same model under the same settings and oracle, so a
    comparison re-run after one method changed re-evaluates that method only (``resume`` off: none)."""
    path = evaluation_file(ctx, name)
    if not ctx.settings.get("resume", True) or not path.exists():
        return None
    saved = read_json(path)
    return saved if saved.get("fingerprint") == evaluation_fingerprint(ctx, name) else None


def save_evaluation(ctx: RunContext, name: str, payload: dict[str, Any]) -> None:
    write_json(evaluation_file(ctx, name), {**payload, "fingerprint": evaluation_fingerprint(ctx, name)})


@task(name="evaluate_reference", cache_policy=NONE)
def evaluate_reference(ctx: RunContext) -> tuple[Suite, dict[str, Any]]:
    """The oracle through the pipeline's full suite; the returned suite carries its scores, the reference
    of every later model's forget quality and PrivLeak."""
    ctx.apply_threads()
    suite = build_suite(ctx)
    if (saved := completed_evaluation(ctx, "oracle")) is not None:
        suite.oracle_scores = ModelScores(**saved["scores"])
        return suite, saved["row"]
    with torch_threads(ctx.settings["evaluate"].get("threads")):
        row = suite.run("oracle", load_role(ctx, "oracle"), quantize=True, relearn=True)["row"]
    scores = suite.oracle_scores
    save_evaluation(ctx, "oracle", {"row": row, "scores": {"splits": scores.splits, "mia": scores.mia}})
    return suite, row


@task(name="evaluate_model", cache_policy=NONE)
def evaluate_model(ctx: RunContext, suite: Suite, name: str, stats: dict[str, Any]) -> dict[str, Any]:
    """One model (the target or a method's unlearned model) through the suite, attacks included."""
    ctx.apply_threads()
    if (saved := completed_evaluation(ctx, name)) is not None:
        return {**saved["row"], **stats}
    if name == "target":
        checkpoint = load_role(ctx, "target")
    else:
        checkpoint = deploy(ctx, name, method_dir(ctx, name) / get_method(name).saved_as)
    with torch_threads(ctx.settings["evaluate"].get("threads")):
        row = suite.run(name, checkpoint, quantize=True, relearn=True)["row"]
    save_evaluation(ctx, name, {"row": row})
    return {**row, **stats}


@task(name="leaderboard", cache_policy=NONE)
def leaderboard(ctx: RunContext, results: dict[str, dict]) -> list[dict[str, Any]]:
    rows = leaderboard_rows(results)
    out = leaderboard_dir(ctx)
    write_json(out / "results.json", results)
    write_json(out / "run.json", {"git_commit": ctx.git_commit, "params_hash": ctx.params_hash})
    write_json(out / "leaderboard.json", rows)
    atomic_write_text(out / "leaderboard.csv", to_csv(rows))
    atomic_write_text(out / "leaderboard.md", to_markdown(rows) + selection_notes(ctx))
    leaderboard_plot(rows, out / "leaderboard.png")
    with tracking.stage_run(ctx, "leaderboard"):
        flat = {f"{name}.{k}": v for name, row in results.items() for k, v in flatten_metrics(row).items()}
        tracking.log_metrics(flat)
        for name in ("leaderboard.json", "leaderboard.csv", "leaderboard.md", "leaderboard.png", SELECTION_FILE):
            if (out / name).exists():
                tracking.log_artifacts(out / name, "leaderboard")
    return rows
