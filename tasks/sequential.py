"""Sustainability (sequential requests) and scalability (growing forget sets) of CodeUnlearn.

Cheap by construction: a request is a code selection on the codebook model, measured with forget /
retain ROUGE (``codeunlearn.sequential``). Writes ``sequential/sustainability.json``,
``sequential/scalability.json`` and ``sequential/sequential.png``; logs the curves to MLflow with the
request number or author count as the step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from prefect import task  # noqa: E402
from prefect.cache_policies import NONE  # noqa: E402

from codeunlearn.checkpoints import Checkpoint  # noqa: E402
from codeunlearn.data.records import read_jsonl_records  # noqa: E402
from codeunlearn.eval.scoring import request_scores, split_rouges  # noqa: E402
from codeunlearn.eval.sequential import (  # noqa: E402
    Selector,
    group_by_subject,
    scalability,
    scalability_plan,
    sustainability,
    sustainability_plan,
)
from codeunlearn.eval.sets import GenerationSpec  # noqa: E402
from codeunlearn.io import write_json  # noqa: E402
from codeunlearn.methods.codeunlearn.gate import gate_calibration  # noqa: E402
from codeunlearn.methods.codeunlearn.select import SelectionSpec  # noqa: E402
from tasks import tracking  # noqa: E402
from tasks.context import RunContext, torch_threads  # noqa: E402
from tasks.models import load_role  # noqa: E402
from tasks.resume import resumable  # noqa: E402

log = logging.getLogger(__name__)

FILES = {"sustainability": "sustainability.json", "scalability": "scalability.json"}
UTILITY_KEYS = ("model_utility", "world_facts_rouge", "real_authors_rouge")
PLOT = "sequential.png"


def _plot_sustainability(ax: Any, result: dict[str, Any]) -> None:
    rows = result["rows"]
    x = [0, *[int(row["request"]) for row in rows]]
    baseline = result["baseline"]
    first = [baseline["forget_rouge_first"], *[row["forget_rouge_first"] for row in rows]]
    ax.plot(x, first, "o-", label="forget: first request's set")
    ax.plot(x[1:], [row["forget_rouge_requested"] for row in rows], "s-", label="forget: all requested so far")
    ax.plot(x[1:], [row["forget_rouge_current"] for row in rows], "^:", label="forget: the new request's set")
    ax.plot(x, [baseline["retain_rouge"], *[row["retain_rouge"] for row in rows]], "o-", label="retain")
    if rows and "random_retain_rouge" in rows[0]:
        ax.plot(
            x[1:],
            [row["random_forget_rouge_requested"] for row in rows],
            "s--",
            color="0.5",
            label="random codes: forget requested",
        )
        ax.plot(x[1:], [row["random_retain_rouge"] for row in rows], "o--", color="0.7", label="random codes: retain")
    ax.set_xticks(x)
    ax.set_xlabel("requests so far (0 = codebook model, no mask)")
    ax.set_ylabel("ROUGE-L recall")
    ax.set_ylim(0, 1.05)
    ax.set_title("Sustainability: sequential requests")
    ax.legend(fontsize=7)


def _plot_scalability(ax: Any, result: dict[str, Any]) -> None:
    rows = result["rows"]
    x = [int(row["authors"]) for row in rows]
    ax.plot(x, [row["forget_rouge_before"] for row in rows], "o:", color="0.3", label="forget, no mask")
    ax.plot(x, [row["forget_rouge"] for row in rows], "s-", label="forget, CodeUnlearn")
    ax.plot(x, [row["retain_rouge"] for row in rows], "o-", label="retain, CodeUnlearn")
    if rows and "random_forget_rouge" in rows[0]:
        ax.plot(x, [row["random_forget_rouge"] for row in rows], "s--", color="0.5", label="forget, random codes")
        ax.plot(x, [row["random_retain_rouge"] for row in rows], "o--", color="0.7", label="retain, random codes")
    ax.set_xticks(x)
    ax.set_xlabel("authors in the forget set")
    ax.set_ylabel("ROUGE-L recall")
    ax.set_ylim(0, 1.05)
    ax.set_title("Scalability: growing forget sets")
    ax.legend(fontsize=7)


def sequential_plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    """One panel per experiment that ran (a note in place of a disabled or skipped one)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (name, draw) in zip(
        axes, (("sustainability", _plot_sustainability), ("scalability", _plot_scalability)), strict=True
    ):
        result = results.get(name) or {}
        if result.get("rows"):
            draw(ax, result)
        else:
            ax.set_axis_off()
            ax.text(0.5, 0.5, f"{name}: {result.get('skipped', 'not run')}", ha="center", va="center", wrap=True)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _run(name: str, cfg: dict[str, Any], experiment: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    if not cfg["enabled"]:
        return {"enabled": False, "skipped": f"disabled in params (evaluate.{name}.enabled)"}
    try:
        return {"enabled": True, **experiment()}
    except ValueError as err:  # too few authors in this profile's splits: recorded, not fatal
        log.warning("%s skipped: %s", name, err)
        return {"enabled": True, "skipped": str(err)}


def run_experiments(ctx: RunContext, authors: list[list], checkpoint: Checkpoint) -> dict[str, dict[str, Any]]:
    """Both experiments on the codebook model, per ``evaluate.sustainability`` / ``evaluate.scalability``."""
    cfg = ctx.settings["evaluate"]
    sus, scal = cfg["sustainability"], cfg["scalability"]
    select_cfg, seed = ctx.settings["select"], ctx.settings["seed"]
    spec = SelectionSpec(**{k: select_cfg[k] for k in SelectionSpec.__dataclass_fields__})
    selector = Selector(
        model=checkpoint.model,
        bottleneck=checkpoint.bottleneck,
        tokenizer=checkpoint.tokenizer,
        spec=spec,
        control=select_cfg["control"],
        name_min_mentions=select_cfg["name_min_mentions"],
        gate=gate_calibration(select_cfg["gate"], spec) if select_cfg["gate"]["enabled"] else None,
    )
    generation = GenerationSpec(cfg["max_new_tokens"], cfg["batch_size"])

    def score(record_sets: list[list]) -> list[float]:
        return split_rouges(checkpoint.model, checkpoint.tokenizer, record_sets, generation)

    def run_sustainability() -> dict[str, Any]:
        plan = sustainability_plan(authors, sus["requests"], sus["authors_per_request"])
        return sustainability(
            selector, plan, score, sus["forget_eval_size"], sus["retain_eval_size"], sus["random_control"], seed
        )

    utility_sets, spec = ctx.utility_sets(), ctx.eval_spec()

    def utility() -> dict[str, float]:
        row = request_scores(checkpoint.model, checkpoint.tokenizer, [], utility_sets, spec)
        return {key: row[key] for key in UTILITY_KEYS if key in row}

    def run_scalability() -> dict[str, Any]:
        plan = scalability_plan(authors, scal["authors"])
        return scalability(
            selector,
            plan,
            score,
            scal["forget_eval_size"],
            scal["retain_eval_size"],
            scal["random_control"],
            seed,
            scal["codes_per_author"],
            utility if scal["utility"] else None,
        )

    with torch_threads(cfg.get("threads")):
        return {
            "sustainability": _run("sustainability", sus, run_sustainability),
            "scalability": _run("scalability", scal, run_scalability),
        }


@task(name="sequential", cache_policy=NONE)
@resumable("sequential")
def sequential(ctx: RunContext) -> dict:
    cfg = ctx.settings["evaluate"]
    splits = ctx.stage_dir("splits")
    # The forget split's authors first, then the retain split's: the codebook model saw them all.
    authors = group_by_subject(
        read_jsonl_records(splits / "forget.jsonl") + read_jsonl_records(splits / "retain.jsonl")
    )
    if cfg["sustainability"]["enabled"] or cfg["scalability"]["enabled"]:
        results = run_experiments(ctx, authors, load_role(ctx, "codebook"))
    else:
        results = {name: _run(name, cfg[name], dict) for name in FILES}
    out = ctx.stage_dir("sequential")
    for name, file in FILES.items():
        write_json(out / file, results[name])
    sequential_plot(results, out / PLOT)
    with tracking.stage_run(ctx, "sequential"):
        for row in results["sustainability"].get("rows", []):
            tracking.log_metrics({f"sustainability.{k}": v for k, v in row.items()}, step=int(row["request"]))
        for row in results["scalability"].get("rows", []):
            tracking.log_metrics({f"scalability.{k}": v for k, v in row.items()}, step=int(row["authors"]))
        tracking.log_artifacts(out, "sequential")
    return {name: result.get("rows", []) for name, result in results.items()}
