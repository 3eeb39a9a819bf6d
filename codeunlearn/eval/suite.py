"""What the pipeline's evaluation puts each model through, and the pieces of its rows.

``Suite`` scores one model on the TOFU sets, membership inference, MUSE-News (``MuseRun``) and the
quantization and relearning attacks; the oracle goes first, as every later row's forget quality and
PrivLeak are relative to it. ``code_usage`` is the selection's view of the codebook model,
``reusable_as_target``/``reuse_row`` let a residual codebook model share the target's row when their
logits are proven equal, ``general_check`` is the report's side-by-side world-fact answers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from codeunlearn.attacks.quantize import QuantizationSpec, quantization_attack
from codeunlearn.attacks.relearn import relearn_attack
from codeunlearn.eval.muse import (
    MuseScores,
    MuseSets,
    MuseSpec,
    load_muse_sets,
    muse_details,
    muse_row,
    muse_spec,
    score_muse,
)
from codeunlearn.lm.training import TrainSpec
from codeunlearn.methods.codeunlearn.counting import count_codes
from codeunlearn.methods.codeunlearn.mask import CodeMask, apply_mask, unmask
from codeunlearn.metrics.scoring import ModelScores, per_item, same_logits, score_model, summarize
from codeunlearn.metrics.sets import EvalSets, EvalSpec
from codeunlearn.metrics.tofu import rouge_l_recall
from codeunlearn.models.load import Checkpoint
from codeunlearn.privacy import withhold_overlaps

log = logging.getLogger(__name__)

GENERAL_CHECK = "general_check.json"


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
        "shared_prefix": select["shared_prefix"],
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


def relearn_spec(evaluate: Mapping[str, Any], seed: int) -> TrainSpec:
    """The relearning attack's fine-tune (``evaluate.relearn``, on ``evaluate.max_length`` tokens; pipeline and
    audits), logging only its last step."""
    relearn = evaluate["relearn"]
    return TrainSpec(
        steps=relearn["steps"],
        batch_size=relearn["batch_size"],
        lr=relearn["lr"],
        weight_decay=relearn["weight_decay"],
        warmup_steps=relearn["warmup_steps"],
        max_length=evaluate["max_length"],
        grad_clip=relearn["grad_clip"],
        seed=seed,
        log_every=max(1, relearn["steps"]),
    )


def muse_run(evaluate: Mapping[str, Any], muse_dir: Path) -> MuseRun | None:
    """The MUSE-News run of ``evaluate.muse`` (None when disabled)."""
    cfg = evaluate.get("muse") or {}
    if not cfg.get("enabled"):
        return None
    sets = load_muse_sets(
        muse_dir,
        verbmem_size=cfg["verbmem_size"],
        knowmem_size=cfg["knowmem_size"],
        privleak_size=cfg["privleak_size"],
        icl_examples=cfg["icl_examples"],
    )
    return MuseRun(sets=sets, spec=muse_spec(evaluate), models=tuple(cfg["models"]))


def reusable_as_target(
    evaluate: Mapping[str, Any], target: Checkpoint, codebook_model: Checkpoint, sets: EvalSets
) -> bool:
    """Whether the codebook model's row may be the target's: a residual codebook, attacked wherever the
    target is, and bit-identical logits on every forget and retain QA scored."""
    attacked_as_target = all(
        ("codebook" in evaluate[block]["models"]) <= ("target" in evaluate[block]["models"])
        for block in ("quantization", "relearn", "muse")
    )
    if codebook_model.bottleneck is None or not codebook_model.bottleneck.residual or not attacked_as_target:
        return False
    records = [*sets.forget, *sets.retain]
    return same_logits(
        target.model,
        codebook_model.model,
        target.tokenizer,
        records,
        evaluate["score_batch_size"],
        evaluate["max_length"],
    )


def general_check(
    questions: Sequence[Any], answers: Mapping[str, list[str]], forget: Sequence[Any], ngram: int, deployed: str
) -> dict[str, Any]:
    """The world-fact questions answered by the target and the deployed model, side by side; answers that
    share an ``ngram``-gram with a forget question or answer are withheld (they may quote it)."""
    forget_text = [text for r in forget for text in (r.question, r.answer)]
    shown = {name: withhold_overlaps(given, forget_text, ngram) for name, given in answers.items()}
    gold = [r.answer for r in questions]
    return {
        "questions": [r.question for r in questions],
        "gold": gold,
        "target": shown["target"],
        "deployed": deployed,
        "deployed_answers": shown[deployed],
        "rouge_target": rouge_l_recall(answers["target"], gold),
        "rouge_deployed": rouge_l_recall(answers[deployed], gold),
    }


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
