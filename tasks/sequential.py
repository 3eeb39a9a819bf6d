"""Sustainability (sequential requests) and scalability (growing forget sets) of CodeUnlearn.

Cheap by construction: a request is a code selection on the codebook model, measured with forget /
retain ROUGE (``codeunlearn.sequential``). Writes ``sequential/sustainability.json``,
``sequential/scalability.json`` and ``sequential/sequential.png``; logs the curves to MLflow with the
request number or author count as the step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from codeunlearn.data.records import read_jsonl_records
from codeunlearn.eval import sequential as studies
from codeunlearn.io import write_json
from codeunlearn.methods.codeunlearn.gate import gate_calibration
from codeunlearn.methods.codeunlearn.select import SelectionSpec
from codeunlearn.metrics.scoring import request_scores, split_rouges
from codeunlearn.metrics.sets import GenerationSpec
from codeunlearn.models.load import Checkpoint
from codeunlearn.report.plots import SEQUENTIAL_PLOT, sequential_plot
from tasks import tracking
from tasks.common import load_role
from tasks.context import RunContext, torch_threads
from tasks.resume import resumable

log = logging.getLogger(__name__)

UTILITY_KEYS = ("model_utility", "world_facts_rouge", "real_authors_rouge")


def study_spec(cfg: dict[str, Any], seed: int) -> studies.StudySpec:
    return studies.StudySpec(cfg["forget_eval_size"], cfg["retain_eval_size"], cfg["random_control"], seed)


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
    selector = studies.Selector(
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
        plan = studies.sustainability_plan(authors, sus["requests"], sus["authors_per_request"])
        return studies.sustainability(selector, plan, score, study_spec(sus, seed))

    utility_sets, spec = ctx.utility_sets(), ctx.eval_spec()

    def utility() -> dict[str, float]:
        row = request_scores(checkpoint.model, checkpoint.tokenizer, [], utility_sets, spec)
        return {key: row[key] for key in UTILITY_KEYS if key in row}

    def run_scalability() -> dict[str, Any]:
        plan = studies.scalability_plan(authors, scal["authors"])
        return studies.scalability(
            selector,
            plan,
            score,
            study_spec(scal, seed),
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
    authors = studies.group_by_subject(
        read_jsonl_records(splits / "forget.jsonl") + read_jsonl_records(splits / "retain.jsonl")
    )
    if cfg["sustainability"]["enabled"] or cfg["scalability"]["enabled"]:
        results = run_experiments(ctx, authors, load_role(ctx, "codebook"))
    else:
        results = {name: _run(name, cfg[name], dict) for name in studies.FILES}
    out = ctx.stage_dir("sequential")
    for name, file in studies.FILES.items():
        write_json(out / file, results[name])
    sequential_plot(results, out / SEQUENTIAL_PLOT)
    with tracking.stage_run(ctx, "sequential"):
        for row in results["sustainability"].get("rows", []):
            tracking.log_metrics({f"sustainability.{k}": v for k, v in row.items()}, step=int(row["request"]))
        for row in results["scalability"].get("rows", []):
            tracking.log_metrics({f"scalability.{k}": v for k, v in row.items()}, step=int(row["authors"]))
        tracking.log_artifacts(out, "sequential")
    return {name: result.get("rows", []) for name, result in results.items()}
