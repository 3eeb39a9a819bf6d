"""The comparison: every method on the same model, forget set and evaluation, then a leaderboard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from prefect import task  # noqa: E402
from prefect.cache_policies import NONE  # noqa: E402

from codeunlearn.checkpoints import load_checkpoint, save_checkpoint  # noqa: E402
from codeunlearn.config import settings_hash  # noqa: E402
from codeunlearn.data.records import read_jsonl_records  # noqa: E402
from codeunlearn.eval.scoring import ModelScores, flatten_metrics  # noqa: E402
from codeunlearn.io import atomic_write_text, read_json, write_json  # noqa: E402
from codeunlearn.methods import get_method  # noqa: E402
from codeunlearn.methods.codeunlearn.mask import apply_mask, load_mask, save_mask  # noqa: E402
from codeunlearn.profiling import ResourceMeter  # noqa: E402
from codeunlearn.report.leaderboard import leaderboard_rows, to_csv, to_markdown  # noqa: E402
from tasks import tracking  # noqa: E402
from tasks.context import RunContext, torch_threads  # noqa: E402
from tasks.evaluate import Suite, build_suite  # noqa: E402
from tasks.models import load_role  # noqa: E402
from tasks.resume import fingerprint  # noqa: E402

MEMORY_SAMPLE_S = 0.05


def method_dir(ctx: RunContext, method: str) -> Path:
    return ctx.stage_dir("compare") / method


@task(name="run_method", cache_policy=NONE)
def run_method(ctx: RunContext, method: str) -> dict[str, Any]:
    """Unlearn the pipeline's forget split with one method; CodeUnlearn starts from the codebook model,
    every other method from the target. Wall time and peak memory cover the unlearning step only."""
    ctx.apply_threads()
    out = method_dir(ctx, method)
    identity = method_fingerprint(ctx, method)
    if (previous := completed_method(ctx, method, identity)) is not None:
        return previous
    splits = ctx.stage_dir("splits")
    forget = read_jsonl_records(splits / "forget.jsonl")
    retain, _ = ctx.retain_split()  # the authors a method may use; the others are scored
    checkpoint = load_role(ctx, "codebook" if method == "codeunlearn" else "target")
    params = ctx.method_params(method, {"params_hash": ctx.params_hash, "request": "compare"})
    with tracking.stage_run(ctx, f"unlearn_{method}"):
        with ResourceMeter(MEMORY_SAMPLE_S) as meter:
            result = get_method(method).unlearn(checkpoint.model, checkpoint.tokenizer, forget, retain, params)
        if "code_mask" in result.artifacts:
            save_mask(result.artifacts["code_mask"], out / "mask")
        else:
            save_checkpoint(result.model, checkpoint.tokenizer, out / "model")
        stats = {
            **{k: v for k, v in result.stats.items() if isinstance(v, int | float | str)},
            "wall_s": meter.wall_s,
            "peak_mem_mb": meter.peak_mem_mb,
        }
        tracking.log_metrics({k: v for k, v in stats.items() if isinstance(v, int | float)})
    write_json(out / "stats.json", {**stats, "fingerprint": identity})
    return stats


def method_fingerprint(ctx: RunContext, method: str) -> str:
    """The method's params and the identity of the model it starts from (that stage's fingerprint)."""
    start = "train_codebook" if method == "codeunlearn" else "finetune_target"
    block = ctx.method_params(method, {})
    return settings_hash({"method": method, "params": block, "start": fingerprint(ctx, start)})


def completed_method(ctx: RunContext, method: str, identity: str) -> dict[str, Any] | None:
    """A previous comparison's result for the same method, params and starting model (a killed comparison
    restarts without retraining the methods it finished), unless ``resume`` is off."""
    out = method_dir(ctx, method)
    stats_file = out / "stats.json"
    artifact = out / ("mask" if method == "codeunlearn" else "model")
    if not ctx.settings.get("resume", True) or not stats_file.exists() or not artifact.exists():
        return None
    stats = read_json(stats_file)
    if stats.pop("fingerprint", None) != identity:
        return None
    return stats


def load_unlearned(ctx: RunContext, method: str):
    out = method_dir(ctx, method)
    if method == "codeunlearn":
        checkpoint = load_role(ctx, "codebook")
        apply_mask(checkpoint.bottleneck, load_mask(out / "mask"), source=str(out / "mask"))
        return checkpoint
    return load_checkpoint(out / "model")


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
    checkpoint = load_role(ctx, "target") if name == "target" else load_unlearned(ctx, name)
    with torch_threads(ctx.settings["evaluate"].get("threads")):
        row = suite.run(name, checkpoint, quantize=True, relearn=True)["row"]
    save_evaluation(ctx, name, {"row": row})
    return {**row, **stats}


def leaderboard_plot(rows: list[dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        if row["forget_rouge"] is None or row["retain_rouge"] is None:
            continue
        ax.scatter(row["forget_rouge"], row["retain_rouge"], s=50)
        ax.annotate(
            row["method"],
            (row["forget_rouge"], row["retain_rouge"]),
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
        )
        q4 = row.get("forget_rouge_q4")
        if q4 is not None:
            ax.annotate(
                "",
                xy=(q4, row["retain_rouge"]),
                xytext=(row["forget_rouge"], row["retain_rouge"]),
                arrowprops={"arrowstyle": "->", "color": "tab:red", "alpha": 0.6},
            )
    ax.set_xlabel("forget ROUGE-L recall (lower is better); red arrow: after 4-bit RTN")
    ax.set_ylabel("retain ROUGE-L recall (higher is better)")
    ax.set_title("Methods on the same model and forget set")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


@task(name="leaderboard", cache_policy=NONE)
def leaderboard(ctx: RunContext, results: dict[str, dict]) -> list[dict[str, Any]]:
    rows = leaderboard_rows(results)
    out = ctx.stage_dir("compare")
    write_json(out / "results.json", results)
    write_json(out / "run.json", {"git_commit": ctx.git_commit, "params_hash": ctx.params_hash})
    write_json(out / "leaderboard.json", rows)
    atomic_write_text(out / "leaderboard.csv", to_csv(rows))
    atomic_write_text(out / "leaderboard.md", to_markdown(rows))
    leaderboard_plot(rows, out / "leaderboard.png")
    with tracking.stage_run(ctx, "leaderboard"):
        flat = {f"{name}.{k}": v for name, row in results.items() for k, v in flatten_metrics(row).items()}
        tracking.log_metrics(flat)
        for name in ("leaderboard.json", "leaderboard.csv", "leaderboard.md", "leaderboard.png"):
            tracking.log_artifacts(out / name, "leaderboard")
    return rows
