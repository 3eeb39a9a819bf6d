"""The attacks an audit runs on the model as deployed: RTN re-quantization and the relearning attack.

``audit.quantization`` picks the quantizer, ``audit.relearn`` switches the relearning attack; the
relearning fine-tune is the evaluation's (``eval.suite.relearn_spec``). Numbers only, never text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from codeunlearn.attacks.quantize import QuantizationSpec, quantized_copy
from codeunlearn.attacks.relearn import relearn_attack
from codeunlearn.audit.judge import Thresholds
from codeunlearn.data.forget_files import PassageRecord
from codeunlearn.lm.training import TrainSpec
from codeunlearn.metrics.passage import passage_verbmem
from codeunlearn.metrics.recovery import recovery
from codeunlearn.metrics.scoring import forget_retain_rouge, split_rouge
from codeunlearn.metrics.sets import GenerationSpec, PassageSpec


@dataclass(frozen=True)
class AuditSettings:
    thresholds: Thresholds
    quant_bits: int
    quant_group_size: int
    relearn: bool

    @classmethod
    def from_settings(cls, block: Mapping[str, Any] | None) -> AuditSettings:
        """``audit:`` in params.yaml (every key optional)."""
        block = block or {}
        quant = block.get("quantization") or {}
        return cls(
            thresholds=Thresholds.from_settings(block),
            quant_bits=int(quant.get("bits", 4)),
            quant_group_size=int(quant.get("group_size", 64)),
            relearn=bool(block.get("relearn", True)),
        )


def attack_metrics(
    model: nn.Module,
    tokenizer: Any,
    forget: Sequence[Any],
    retain: Sequence[Any],
    full: Mapping[str, float],
    settings: AuditSettings,
    relearn: TrainSpec,
    generation: GenerationSpec,
    progress: bool = False,
    passage: PassageSpec | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """RTN re-quantization and, if enabled, the relearning attack, on the model as deployed; ``full`` is
    its full-precision forget/retain ROUGE. Passage records (``passage``: how they are scored) are scored
    by their VerbMem continuation ROUGE, as the request's ``forget_rouge`` is. Returns (metrics, skipped
    reasons)."""
    metrics: dict[str, Any] = {"quantization": {}}
    skipped: dict[str, str] = {}
    qspec = QuantizationSpec("rtn", settings.quant_bits, settings.quant_group_size)
    name = f"rtn_w{qspec.bits}_g{qspec.group_size}"
    clone, record = quantized_copy(model, qspec)
    try:
        quantized = _forget_retain(clone, tokenizer, forget, retain, generation, passage) if forget else None
    finally:
        del clone
    if quantized is None:
        skipped["quant_recovery"] = "no forget records to score"
    else:
        metrics["quantization"][name] = {
            **quantized,
            "recovery": recovery(quantized["forget_rouge"], full["forget_rouge"]),
            "retain_change": quantized["retain_rouge"] - full["retain_rouge"],
            "weight_error": record.mean_relative_error,
            "bits": qspec.bits,
            "group_size": qspec.group_size,
            "quantizer": "rtn",
        }
    if not settings.relearn:
        skipped["relearn_recovery"] = "audit.relearn is false"
    elif any(isinstance(record, PassageRecord) for record in forget):
        skipped["relearn_recovery"] = "the relearning attack scores held-out QAs; a passage request has none"
    elif len(forget) < 2:
        skipped["relearn_recovery"] = f"the relearning attack needs at least 2 forget records, got {len(forget)}"
    else:
        metrics["relearn"] = relearn_attack(model, tokenizer, forget, relearn, generation, progress)
    return metrics, skipped


def _forget_retain(
    model: nn.Module,
    tokenizer: Any,
    forget: Sequence[Any],
    retain: Sequence[Any],
    generation: GenerationSpec,
    passage: PassageSpec | None,
) -> dict[str, float]:
    passages = [record.text for record in forget if isinstance(record, PassageRecord)]
    if not passages:
        return forget_retain_rouge(model, tokenizer, forget, retain, generation)
    if passage is None:
        raise ValueError("passage records need a PassageSpec (forget_set.passage in params.yaml)")
    verbmem = passage_verbmem(
        model, tokenizer, passages, passage.prompt_tokens, passage.continuation_tokens, generation.batch_size
    )
    return {"forget_rouge": verbmem, "retain_rouge": split_rouge(model, tokenizer, retain, generation)}
