"""Stage 8: the full evaluation suite for target, oracle, codebook, CodeUnlearn and the random-code control.

Per model: TOFU forget / retain / real-authors / world-facts numbers, forget quality and PrivLeak
against this run's oracle, membership inference, then the quantization and relearning attacks on
the model as deployed (CodeUnlearn with its mask applied), and MUSE-News (VerbMem, KnowMem,
PrivLeak against this run's oracle; ``evaluate.muse``): ``codeunlearn.eval.suite``. Writes
``eval/metrics.json`` (nested by model: the DVC metrics), ``eval/details.json`` (per-item numbers,
quantizer records, code usage, timings; never text) and the plots (``codeunlearn.report.plots``); logs
every number to MLflow as ``<model>.<metric>``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NONE

from codeunlearn.data.records import records_sha256
from codeunlearn.data.tofu import load_tofu_file
from codeunlearn.eval.suite import (
    GENERAL_CHECK,
    code_usage,
    deployed,
    general_check,
    reusable_as_target,
    reuse_row,
)
from codeunlearn.io import write_json
from codeunlearn.lm.generation import generate_answers
from codeunlearn.methods.codeunlearn.mask import load_mask, random_mask_like
from codeunlearn.metrics.scoring import flatten_metrics
from codeunlearn.metrics.sets import evenly_spaced
from codeunlearn.models.load import Checkpoint
from codeunlearn.report.plots import codes_plot, quantization_plot, rouge_plot
from codeunlearn.report.run import ROW_ORDER
from tasks import tracking
from tasks.common import build_suite, load_role
from tasks.context import RunContext, torch_threads
from tasks.resume import resumable

log = logging.getLogger(__name__)


def general_check_questions(ctx: RunContext) -> list:
    """``evaluate.general_check`` world-fact questions, evenly spaced: the report's side-by-side check."""
    size = ctx.settings["evaluate"]["general_check"]
    if size <= 0:
        return []
    tofu_dir = ctx.resolve(ctx.settings["paths"]["tofu_dir"])
    return evenly_spaced(load_tofu_file(tofu_dir / "world_facts_perturbed.json"), size)


@task(name="evaluate", cache_policy=NONE)
@resumable("evaluate")
def evaluate(ctx: RunContext) -> dict:
    started = time.perf_counter()
    cfg = ctx.settings["evaluate"]
    suite = build_suite(ctx, with_muse=True)
    sets = suite.sets
    mask_dir = ctx.stage_dir("mask")
    mask = load_mask(mask_dir)
    control = random_mask_like(mask, np.random.default_rng(ctx.settings["seed"]))

    metrics: dict[str, dict[str, Any]] = {}
    details: dict[str, Any] = {
        "sets": {
            **sets.counts(),
            **{
                f"{k}_sha256": records_sha256(getattr(sets, k))
                for k in ("forget", "retain", "holdout")
                if getattr(sets, k)
            },
        },
        "per_item": {},
        "quantization": {},
        "relearn": {
            "spec": asdict(suite.relearn) if suite.relearn else None,
            "split": "even positions attack, odd positions held out",
        },
        "timing_s": {},
        "phase_timing_s": {},
        "random_control_ids": list(control.disabled_ids),
    }
    if suite.muse is not None:
        details["muse"] = suite.muse.describe()

    def run_suite(name: str, checkpoint: Checkpoint) -> None:
        quantize = name in cfg["quantization"]["models"]
        relearn = name in cfg["relearn"]["models"]
        result = suite.run(name, checkpoint, quantize=quantize, relearn=relearn)
        metrics[name] = result["row"]
        details["per_item"][name] = result["per_item"]
        if result["quantization"] is not None:
            details["quantization"][name] = result["quantization"]
        details["timing_s"][name] = result["seconds"]
        details["phase_timing_s"][name] = result["phases_s"]
        if result["muse"] is not None:
            details["muse"]["per_item"][name] = result["muse"]["per_item"]
            details["muse"]["timing_s"][name] = result["muse"]["seconds"]

    general = general_check_questions(ctx)
    general_answers: dict[str, list[str]] = {}

    def answer_general(name: str, checkpoint: Checkpoint) -> None:
        if general:
            questions = [r.question for r in general]
            general_answers[name] = generate_answers(
                checkpoint.model, checkpoint.tokenizer, questions, cfg["max_new_tokens"], cfg["batch_size"]
            )

    with torch_threads(cfg.get("threads")):
        checkpoints = {}
        for role in ("oracle", "target"):
            checkpoints[role] = load_role(ctx, role)
            run_suite(role, checkpoints[role])
        answer_general("target", checkpoints["target"])
        codebook_model = load_role(ctx, "codebook")
        if reusable_as_target(cfg, checkpoints["target"], codebook_model, sets):
            # Residual mode: the unmasked codebook model is the target (equal logits, checked just now).
            reuse_row("codebook", "target", metrics, details)
        else:
            run_suite("codebook", codebook_model)
        del checkpoints
        with deployed(codebook_model, mask, source=str(mask_dir)):
            run_suite("codeunlearn", codebook_model)
            answer_general("codeunlearn", codebook_model)
        with deployed(codebook_model, control, source=str(mask_dir)):
            run_suite("random_codes", codebook_model)
        # The control authors, as the selection counted them (the eval subset is only a sample of retain).
        usage = code_usage(codebook_model, sets.forget, ctx.retain_split()[0], mask, control, ctx.settings["select"])
    for name in ("codeunlearn", "random_codes"):
        metrics[name].update(usage.pop(name))
    metrics = {name: metrics[name] for name in ROW_ORDER}
    details["timing_s"]["total"] = time.perf_counter() - started

    out = ctx.stage_dir("eval")
    if general:
        check = general_check(general, general_answers, sets.forget, cfg["general_check_ngram"], "codeunlearn")
        write_json(out / GENERAL_CHECK, check)
    write_json(out / "metrics.json", metrics)
    write_json(out / "run.json", {"git_commit": ctx.git_commit, "params_hash": ctx.params_hash})
    write_json(out / "details.json", details)
    write_json(out / "code_usage.json", usage)
    rouge_plot(metrics, out / "rouge.png")
    if any(values.get("quant") for values in metrics.values()):
        quantization_plot(metrics, out / "quantization.png")
    else:
        (out / "quantization.png").unlink(missing_ok=True)  # no stale plot of an earlier run
    codes_plot(usage, out / "codes.png")
    flat = {name: flatten_metrics(values) for name, values in metrics.items()}
    with tracking.stage_run(ctx, "evaluate"):
        tracking.log_metrics({f"{row}.{key}": value for row, values in flat.items() for key, value in values.items()})
        tracking.log_metrics({f"timing.{k}_s": v for k, v in details["timing_s"].items()})
        tracking.log_artifacts(out, "eval")
    log.info("evaluate stage: %.1f s", time.perf_counter() - started)
    return flat
