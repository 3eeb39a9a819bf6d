"""Stage 8: the full evaluation suite for target, oracle, codebook, CodeUnlearn and the random-code control.

Per model: TOFU forget / retain / real-authors / world-facts numbers, forget quality and PrivLeak
against this run's oracle, membership inference, then the quantization and relearning attacks on
the model as deployed (CodeUnlearn with its mask applied), and MUSE-News (VerbMem, KnowMem,
PrivLeak against this run's oracle; ``evaluate.muse``). Writes ``eval/metrics.json`` (nested by
model: the DVC metrics), ``eval/details.json`` (per-item numbers, quantizer records, code usage,
timings; never text) and the plots; logs every number to MLflow as ``<model>.<metric>``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from prefect import task  # noqa: E402
from prefect.cache_policies import NONE  # noqa: E402

from codeunlearn.attacks.quantize import (  # noqa: E402
    QuantizationSpec,  # noqa: E402
    quantization_attack,
    quantization_specs,
)
from codeunlearn.attacks.relearn import relearn_attack  # noqa: E402
from codeunlearn.checkpoints import Checkpoint  # noqa: E402
from codeunlearn.data.records import read_jsonl_records, records_sha256  # noqa: E402
from codeunlearn.data.tofu import load_tofu_file  # noqa: E402
from codeunlearn.eval.muse import MuseScores, MuseSets, MuseSpec, load_muse_sets, muse_details, muse_row, score_muse  # noqa: E402
from codeunlearn.eval.scoring import ModelScores, flatten_metrics, per_item, same_logits, score_model, summarize  # noqa: E402
from codeunlearn.eval.sets import EvalSets, EvalSpec, evenly_spaced, truth_ratio_records  # noqa: E402
from codeunlearn.io import write_json  # noqa: E402
from codeunlearn.lm.generation import generate_answers  # noqa: E402
from codeunlearn.lm.training import TrainSpec  # noqa: E402
from codeunlearn.methods.codeunlearn.counting import count_codes  # noqa: E402
from codeunlearn.methods.codeunlearn.mask import CodeMask, apply_mask, load_mask, random_mask_like, unmask  # noqa: E402
from codeunlearn.metrics.tofu import rouge_l_recall  # noqa: E402
from codeunlearn.privacy import withhold_overlaps  # noqa: E402
from tasks import tracking  # noqa: E402
from tasks.context import RunContext, torch_threads  # noqa: E402
from tasks.models import load_role  # noqa: E402
from tasks.resume import resumable  # noqa: E402

log = logging.getLogger(__name__)

ROWS = ("target", "oracle", "codebook", "codeunlearn", "random_codes")
# The oracle is scored first: forget quality and PrivLeak of every other row are relative to it.
ORDER = ("oracle", "target", "codebook", "codeunlearn", "random_codes")
GENERAL_CHECK = "general_check.json"
PLOTS = {
    "rouge.png": "ROUGE-L, forget vs retain",
    "quantization.png": "Quantization attack: forget ROUGE and recovery per precision",
    "codes.png": "Code usage on forget vs retain, disabled codes highlighted",
}


# --------------------------------------------------------------------------------------- plots


def rouge_plot(metrics: dict[str, dict[str, Any]], path: Path) -> None:
    names = list(metrics)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(x - 0.2, [metrics[n]["forget_rouge"] for n in names], 0.4, label="forget (lower is better)")
    ax.bar(x + 0.2, [metrics[n]["retain_rouge"] for n in names], 0.4, label="retain (higher is better)")
    ax.set_xticks(x, names)
    ax.set_ylabel("ROUGE-L recall")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def quantization_plot(metrics: dict[str, dict[str, Any]], path: Path) -> None:
    """Left: forget ROUGE at full precision and per quantizer; right: recovery (quantized - full)."""
    models = [m for m in metrics if metrics[m].get("quant")]
    specs = sorted(
        {name for m in models for name in metrics[m]["quant"]},
        key=lambda n: (-int(n.split("_w")[1].split("_")[0]), n),
    )
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    positions = np.arange(len(specs) + 1)
    width = 0.8 / max(1, len(models))
    for i, model in enumerate(models):
        quant = metrics[model]["quant"]
        values = [metrics[model]["forget_rouge"], *[quant.get(s, {}).get("forget_rouge", np.nan) for s in specs]]
        left.plot(positions, values, marker="o", label=model)
        recoveries = [quant.get(s, {}).get("recovery", np.nan) for s in specs]
        right.bar(np.arange(len(specs)) + (i - (len(models) - 1) / 2) * width, recoveries, width, label=model)
    left.set_xticks(positions, ["full", *specs], rotation=20, fontsize=8)
    left.set_ylabel("forget ROUGE-L recall")
    left.set_ylim(0, 1.05)
    left.legend(fontsize=7)
    right.axhline(0, color="black", linewidth=0.8)
    right.set_xticks(np.arange(len(specs)), specs, rotation=20, fontsize=8)
    right.set_ylabel("recovery (quantized - full)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def codes_plot(usage: dict[str, Any], path: Path) -> None:
    """Per-code usage rate on retain (x) vs forget (y), log-log; disabled and random-control codes marked."""
    forget = np.asarray(usage["forget_rate"])
    retain = np.asarray(usage["retain_rate"])
    floor = 0.5 / max(usage["forget_slots"], usage["retain_slots"])
    fx, fy = np.maximum(retain, floor), np.maximum(forget, floor)
    live = (forget > 0) | (retain > 0)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.scatter(fx[live], fy[live], s=6, color="0.6", label=f"live codes ({int(live.sum())})")
    random_ids = usage["random_ids"]
    ax.scatter(
        fx[random_ids],
        fy[random_ids],
        s=26,
        facecolors="none",
        edgecolors="tab:blue",
        label=f"random control ({len(random_ids)})",
    )
    mask_ids = usage["mask_ids"]
    ax.scatter(fx[mask_ids], fy[mask_ids], s=18, color="tab:red", label=f"disabled by CodeUnlearn ({len(mask_ids)})")
    bounds = [floor * 0.8, max(fx.max(), fy.max()) * 1.25]
    ax.plot(bounds, bounds, color="black", linewidth=0.6, linestyle="--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(bounds)
    ax.set_ylim(bounds)
    ax.set_xlabel("usage rate on retain split (share of code slots; unused at the edge)")
    ax.set_ylabel("usage rate on forget set (share of code slots)")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------ the stage


def load_sets(ctx: RunContext) -> EvalSets:
    """The evaluation records: forget with truth-ratio data, the model-utility sets (``utility_sets``:
    scored retain authors, RA/WF subsets), the MIA holdout."""
    cfg = ctx.settings["evaluate"]
    splits = ctx.stage_dir("splits")
    tofu_dir = ctx.resolve(ctx.settings["paths"]["tofu_dir"])
    forget = truth_ratio_records(read_jsonl_records(splits / "forget.jsonl"), "forget")
    utility = ctx.utility_sets()
    for kind, records in (("forget", forget), ("retain", utility.retain)):
        if not records:
            raise ValueError(f"{kind}: no record carries the perturbed answers the truth ratio needs")
    holdout_file = cfg["mia"]["holdout_file"]
    holdout = load_tofu_file(tofu_dir / holdout_file) if holdout_file else read_jsonl_records(splits / "holdout.jsonl")
    holdout = evenly_spaced(holdout, cfg["mia"]["holdout_size"])
    if not holdout:
        log.warning("no holdout records: membership inference and PrivLeak are skipped")
    return EvalSets(
        forget=evenly_spaced(forget, cfg["forget_eval_size"]),
        retain=utility.retain,
        real_authors=utility.real_authors,
        world_facts=utility.world_facts,
        holdout=holdout,
    )


def code_usage(
    checkpoint: Checkpoint,
    forget_records: list,
    retain_records: list,
    mask: CodeMask,
    control: CodeMask,
    select: dict[str, Any],
) -> dict[str, Any]:
    """Per-code usage rates of the unmasked codebook model on forget vs retain (the selection's view)."""
    counting = {
        "batch_size": select["batch_size"],
        "max_length": select["max_length"],
        "positions": select["positions"],
    }
    forget = count_codes(checkpoint.model, checkpoint.bottleneck, checkpoint.tokenizer, forget_records, **counting)
    kept = count_codes(checkpoint.model, checkpoint.bottleneck, checkpoint.tokenizer, retain_records, **counting)
    forget_rate = (forget.counts.double() / max(1, forget.slots)).numpy()
    retain_rate = (kept.counts.double() / max(1, kept.slots)).numpy()

    def share(ids: list[int], rate: np.ndarray) -> float:
        return float(rate[ids].sum()) if ids else 0.0

    return {
        "forget_rate": forget_rate.tolist(),
        "retain_rate": retain_rate.tolist(),
        "forget_slots": forget.slots,
        "retain_slots": kept.slots,
        "mask_ids": list(mask.disabled_ids),
        "random_ids": list(control.disabled_ids),
        "positions": select["positions"],
        "live_forget": int((forget.counts > 0).sum()),
        "live_retain": int((kept.counts > 0).sum()),
        "codeunlearn": {
            "masked_usage_forget": share(mask.disabled_ids, forget_rate),
            "masked_usage_retain": share(mask.disabled_ids, retain_rate),
        },
        "random_codes": {
            "masked_usage_forget": share(control.disabled_ids, forget_rate),
            "masked_usage_retain": share(control.disabled_ids, retain_rate),
        },
    }


@contextmanager
def deployed(checkpoint: Checkpoint, mask: CodeMask | None, source: str) -> Iterator[Checkpoint]:
    """The codebook model with ``mask`` applied for the duration (unmasked again afterwards)."""
    if mask is None:
        yield checkpoint
        return
    apply_mask(checkpoint.bottleneck, mask, source=source)
    try:
        yield checkpoint
    finally:
        unmask(checkpoint.bottleneck)


@dataclass
class MuseRun:
    """MUSE-News on the suite's models (``evaluate.muse``); the oracle's AUC is every PrivLeak's reference.

    Our models are trained on TOFU, never on MUSE-News: the rows measure general news knowledge and
    what an unlearning edit costs it, not the forgetting of the MUSE forget corpus.
    """

    sets: MuseSets
    spec: MuseSpec
    models: tuple[str, ...]
    oracle_auc: float | None = None

    def run(self, name: str, checkpoint: Checkpoint, progress: bool) -> dict[str, Any]:
        began = time.perf_counter()
        scores: MuseScores = score_muse(checkpoint.model, checkpoint.tokenizer, self.sets, self.spec, progress)
        if name == "oracle":
            self.oracle_auc = scores.privleak_auc
        seconds = time.perf_counter() - began
        log.info("MUSE on %s in %.1f s", name, seconds)
        return {"row": muse_row(scores, self.oracle_auc), "per_item": muse_details(scores), "seconds": seconds}

    def describe(self) -> dict[str, Any]:
        """Counts, hashes and the spec: what an auditor needs to re-run it (no text)."""
        return {
            "sets": self.sets.counts(),
            "sha256": dict(self.sets.sha256),
            "spec": asdict(self.spec),
            "models": list(self.models),
            "per_item": {},
            "timing_s": {},
        }


def build_muse(ctx: RunContext) -> MuseRun | None:
    """The MUSE-News run of ``evaluate.muse`` (None when disabled)."""
    cfg = ctx.settings["evaluate"].get("muse") or {}
    if not cfg.get("enabled"):
        return None
    sets = load_muse_sets(
        ctx.resolve(ctx.settings["paths"]["muse_dir"]),
        verbmem_size=cfg["verbmem_size"],
        knowmem_size=cfg["knowmem_size"],
        privleak_size=cfg["privleak_size"],
        icl_examples=cfg["icl_examples"],
    )
    spec = MuseSpec(
        batch_size=cfg["batch_size"],
        score_batch_size=cfg["score_batch_size"],
        max_new_tokens=cfg["max_new_tokens"],
        knowmem_max_new_tokens=cfg["knowmem_max_new_tokens"],
        max_prompt_tokens=cfg["max_prompt_tokens"],
        privleak_max_length=cfg["privleak_max_length"],
        min_k=ctx.settings["evaluate"]["mia"]["min_k"],
    )
    return MuseRun(sets=sets, spec=spec, models=tuple(cfg["models"]))


@dataclass
class Suite:
    """Everything one model is put through: TOFU metrics, MIA, and the quantization and relearning attacks.

    The oracle is scored first; its per-item numbers are the reference of every later model's forget
    quality and PrivLeak.
    """

    sets: EvalSets
    spec: EvalSpec
    quantization: list[QuantizationSpec]
    relearn: TrainSpec | None
    progress: bool
    oracle_scores: ModelScores | None = None
    muse: MuseRun | None = None

    def run(self, name: str, checkpoint: Checkpoint, quantize: bool, relearn: bool) -> dict[str, Any]:
        began = time.perf_counter()
        phases: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(phase: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            phases[phase] = now - clock
            clock = now

        scores = score_model(checkpoint.model, checkpoint.tokenizer, self.sets, self.spec, self.progress)
        if name == "oracle":
            self.oracle_scores = scores
        row: dict[str, Any] = summarize(scores, self.oracle_scores)
        lap("tofu")
        muse_result = None
        if self.muse is not None and name in self.muse.models:
            muse_result = self.muse.run(name, checkpoint, self.progress)
            row.update(muse_result["row"])
            lap("muse")
        quant_records: Any = None
        if quantize and self.quantization:
            row["quant"], quant_records = quantization_attack(
                checkpoint.model,
                checkpoint.tokenizer,
                self.sets,
                self.spec,
                self.quantization,
                row,
                self.oracle_scores,
                self.progress,
            )
            lap("quantization")
        if relearn and self.relearn is not None:
            row["relearn"] = relearn_attack(
                checkpoint.model,
                checkpoint.tokenizer,
                self.sets.forget,
                self.relearn,
                self.spec.generation,
                self.progress,
            )
            lap("relearn")
        seconds = time.perf_counter() - began
        log.info("evaluated %s in %.1f s (%s)", name, seconds, ", ".join(f"{k} {v:.0f} s" for k, v in phases.items()))
        return {
            "row": row,
            "per_item": per_item(scores),
            "quantization": quant_records,
            "seconds": seconds,
            "phases_s": phases,
            "muse": muse_result,
        }


def relearn_spec(ctx: RunContext) -> TrainSpec:
    """The relearning attack's fine-tune (``evaluate.relearn``, on ``evaluate.max_length`` tokens; pipeline and
    audits), logging only its last step."""
    cfg = ctx.settings["evaluate"]
    relearn = cfg["relearn"]
    return TrainSpec(
        steps=relearn["steps"],
        batch_size=relearn["batch_size"],
        lr=relearn["lr"],
        weight_decay=relearn["weight_decay"],
        warmup_steps=relearn["warmup_steps"],
        max_length=cfg["max_length"],
        grad_clip=relearn["grad_clip"],
        seed=ctx.settings["seed"],
        log_every=max(1, relearn["steps"]),
    )


def build_suite(ctx: RunContext, with_muse: bool = False) -> Suite:
    """The evaluation suite of ``evaluate``'s params; MUSE-News only where asked (the pipeline's evaluate)."""
    cfg = ctx.settings["evaluate"]
    quant_cfg = cfg["quantization"]
    return Suite(
        sets=load_sets(ctx),
        spec=ctx.eval_spec(),
        quantization=quantization_specs(quant_cfg) if quant_cfg["enabled"] else [],
        relearn=relearn_spec(ctx) if cfg["relearn"]["enabled"] else None,
        progress=ctx.progress,
        muse=build_muse(ctx) if with_muse else None,
    )


def general_check_questions(ctx: RunContext) -> list:
    """``evaluate.general_check`` world-fact questions, evenly spaced: the report's side-by-side check."""
    size = ctx.settings["evaluate"]["general_check"]
    if size <= 0:
        return []
    tofu_dir = ctx.resolve(ctx.settings["paths"]["tofu_dir"])
    return evenly_spaced(load_tofu_file(tofu_dir / "world_facts_perturbed.json"), size)


def reusable_as_target(ctx: RunContext, target: Checkpoint, codebook_model: Checkpoint, sets: EvalSets) -> bool:
    """Whether the codebook model's row may be the target's: a residual codebook, attacked wherever the
    target is, and bit-identical logits on every forget and retain QA scored."""
    cfg = ctx.settings["evaluate"]
    attacked_as_target = all(
        ("codebook" in cfg[block]["models"]) <= ("target" in cfg[block]["models"])
        for block in ("quantization", "relearn", "muse")
    )
    if codebook_model.bottleneck is None or not codebook_model.bottleneck.residual or not attacked_as_target:
        return False
    records = [*sets.forget, *sets.retain]
    return same_logits(
        target.model, codebook_model.model, target.tokenizer, records, cfg["score_batch_size"], cfg["max_length"]
    )


def reuse_row(name: str, source: str, metrics: dict[str, Any], details: dict[str, Any]) -> None:
    """``name``'s evaluation is ``source``'s (the same model, proven by ``reusable_as_target``)."""
    metrics[name] = dict(metrics[source])
    for block in ("per_item", "quantization"):
        if source in details[block]:
            details[block][name] = details[block][source]
    if "muse" in details and source in details["muse"]["per_item"]:
        details["muse"]["per_item"][name] = details["muse"]["per_item"][source]
    details["timing_s"][name] = 0.0
    details.setdefault("reused_rows", {})[name] = {"from": source, "proof": "equal logits on every scored QA"}


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
        if reusable_as_target(ctx, checkpoints["target"], codebook_model, sets):
            # Residual mode: the unmasked codebook model is the target (equal logits, checked just now).
            reuse_row("codebook", "target", metrics, details)
        else:
            run_suite("codebook", codebook_model)
        del checkpoints
        for name, applied in (("codeunlearn", mask), ("random_codes", control)):
            with deployed(codebook_model, applied, source=str(mask_dir)):
                run_suite(name, codebook_model)
                if name == "codeunlearn":
                    answer_general(name, codebook_model)
        # The control authors, as the selection counted them (the eval subset is only a sample of retain).
        usage = code_usage(codebook_model, sets.forget, ctx.retain_split()[0], mask, control, ctx.settings["select"])
    for name in ("codeunlearn", "random_codes"):
        metrics[name].update(usage.pop(name))
    metrics = {name: metrics[name] for name in ROWS}
    details["timing_s"]["total"] = time.perf_counter() - started

    out = ctx.stage_dir("eval")
    if general:
        forget_text = [text for r in sets.forget for text in (r.question, r.answer)]
        shown = {
            name: withhold_overlaps(answers, forget_text, cfg["general_check_ngram"])
            for name, answers in general_answers.items()
        }
        write_json(
            out / GENERAL_CHECK,
            {
                "questions": [r.question for r in general],
                "gold": [r.answer for r in general],
                "target": shown["target"],
                "deployed": "codeunlearn",
                "deployed_answers": shown["codeunlearn"],
                "rouge_target": rouge_l_recall(general_answers["target"], [r.answer for r in general]),
                "rouge_deployed": rouge_l_recall(general_answers["codeunlearn"], [r.answer for r in general]),
            },
        )
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
