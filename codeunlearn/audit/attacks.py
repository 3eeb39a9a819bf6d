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
from codeunlearn.lm.training import TrainSpec
from codeunlearn.metrics.recovery import recovery
from codeunlearn.metrics.scoring import forget_retain_rouge
from codeunlearn.metrics.sets import GenerationSpec


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
) -> tuple[dict[str, Any], dict[str, str]]:
    """RTN re-quantization and, if enabled, the relearning attack, on the model as deployed; ``full`` is
    its full-precision forget/retain ROUGE. Returns (metrics, skipped reasons)."""
    metrics: dict[str, Any] = {"quantization": {}}
    skipped: dict[str, str] = {}
    qspec = QuantizationSpec("rtn", settings.quant_bits, settings.quant_group_size)
    name = f"rtn_w{qspec.bits}_g{qspec.group_size}"
    clone, record = quantized_copy(model, qspec)
    try:
        quantized = forget_retain_rouge(clone, tokenizer, forget, retain, generation) if forget else None
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
    elif len(forget) < 2:
        skipped["relearn_recovery"] = f"the relearning attack needs at least 2 forget records, got {len(forget)}"
    else:
        metrics["relearn"] = relearn_attack(model, tokenizer, forget, relearn, generation, progress)
    return metrics, skipped
