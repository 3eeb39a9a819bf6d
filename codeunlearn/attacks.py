"""Attacks on a deployed unlearned model: does the forgotten knowledge come back?

* ``quantization_attack`` (Zhang et al. 2024, arXiv 2410.16454): re-quantize a copy of the model
  (RTN and torchao, ``metrics.quantization``) and score it again on the forget and retain sets.
  ``recovery`` = forget ROUGE quantized - full precision (> 0 = knowledge revived).
* ``relearn_attack`` (the "relearning" / "jogging the memory" attack, e.g. Hu et al. 2024,
  arXiv 2406.13356): fine-tune a copy for a few steps on half of the forget set and measure forget
  ROUGE on the *other* half, which the attack never showed the model. A model that truly forgot
  should relearn the unseen half no faster than the oracle (retain-only model) learns it from scratch,
  so the oracle's row is the reference, not zero.

Both work on copies (``copy.deepcopy``), so the evaluated model is never changed. A codebook model
keeps its bottleneck and mask: ``attach_codebook``'s forward hook closes over the bottleneck, which
``deepcopy`` shares rather than copies, so the mask applied when the attack runs is the mask the
copy runs with. The relearning attacker trains the language model's weights; the shared codebook
(and its mask, a buffer) are the deployed artifact and stay frozen.

Numbers only: nothing here returns or logs the forget set's text or the model's answers.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from codeunlearn.evaluation import (
    EvalSets,
    EvalSpec,
    GenerationSpec,
    ModelScores,
    score_model,
    split_rouge,
    split_rouges,
    summarize,
)
from codeunlearn.lm.training import TrainSpec, train_answers
from codeunlearn.methods.codeunlearn.codebook import attached_codebook
from codeunlearn.metrics.quantization import QuantizationSpec, quantized_copy, recovery

log = logging.getLogger(__name__)

# The quantized model's numbers kept per spec (forget quality needs the oracle's truth ratios).
QUANT_METRICS = ("forget_rouge", "retain_rouge", "forget_prob", "forget_truth_ratio", "forget_quality", "retain_prob")


def quant_name(spec: QuantizationSpec) -> str:
    """``rtn_w4_g64``: the key a quantized row is stored under."""
    return f"{spec.quantizer}_w{spec.bits}_g{spec.group_size}"


def quantization_specs(config: dict[str, Any]) -> list[QuantizationSpec]:
    """Specs from params: ``{rtn: {bits: [8, 4], group_sizes: [64, 128]}, torchao: {...}}``, 8-bit first."""
    specs = []
    for quantizer in ("rtn", "torchao"):
        block = config.get(quantizer) or {}
        for bits in block.get("bits", []):
            for group_size in block.get("group_sizes", []):
                specs.append(QuantizationSpec(quantizer, int(bits), int(group_size)))
    return specs


def quantization_attack(
    model: nn.Module,
    tokenizer: Any,
    sets: EvalSets,
    spec: EvalSpec,
    specs: Sequence[QuantizationSpec],
    full_precision: dict[str, float],
    oracle: ModelScores | None,
    progress: bool = False,
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, Any]]]:
    """Score a quantized copy per spec on the forget and retain sets.

    Returns ``(metrics, records)``: per spec name the numbers (bits, group_size, forget/retain ROUGE,
    forget Prob / truth ratio / forget quality, ``recovery``, ``retain_change``, weight error) and the
    audit record (quantizer, bits, group size, symmetric, layers, skipped modules), or ``skipped``
    with the reason when a quantizer cannot handle this model (torchao needs in_features divisible
    by the group size, and torchao itself).
    """
    attack_sets = EvalSets(forget=sets.forget, retain=sets.retain)
    metrics: dict[str, dict[str, float]] = {}
    records: dict[str, dict[str, Any]] = {}
    for qspec in specs:
        name = quant_name(qspec)
        try:
            clone, record = quantized_copy(model, qspec)
        except (ValueError, ImportError, RuntimeError, NotImplementedError) as error:
            log.warning("quantization %s skipped: %s", name, error)
            records[name] = {**asdict(qspec), "skipped": str(error)}
            continue
        try:
            values = summarize(score_model(clone, tokenizer, attack_sets, spec, progress), oracle)
        finally:
            del clone
        row = {key: values[key] for key in QUANT_METRICS if key in values}
        row["bits"] = float(qspec.bits)
        row["group_size"] = float(qspec.group_size)
        row["recovery"] = recovery(values["forget_rouge"], full_precision["forget_rouge"])
        row["retain_change"] = values["retain_rouge"] - full_precision["retain_rouge"]
        row["weight_error"] = record.mean_relative_error
        metrics[name] = row
        records[name] = record.as_dict()
    return metrics, records


@dataclass(frozen=True)
class RelearnSpec:
    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    max_length: int
    grad_clip: float
    seed: int

    def train_spec(self) -> TrainSpec:
        return TrainSpec(**asdict(self), log_every=max(1, self.steps))


def split_halves(records: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """(attack half, held-out half): even and odd positions, so both halves cover every author and topic."""
    if len(records) < 2:
        raise ValueError(f"the relearning attack needs at least 2 forget records, got {len(records)}")
    return list(records[0::2]), list(records[1::2])


@contextmanager
def _frozen(module: nn.Module | None) -> Iterator[None]:
    """No gradient reaches a shared module (the attached codebook) while a copy of its host trains."""
    if module is None:
        yield
        return
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def relearn_attack(
    model: nn.Module,
    tokenizer: Any,
    forget: Sequence[Any],
    spec: RelearnSpec,
    generation: GenerationSpec,
    progress: bool = False,
) -> dict[str, float]:
    """Fine-tune a copy on half the forget set; forget ROUGE on the other half before and after.

    Returns ``heldout_rouge_before``, ``heldout_rouge_after``, ``recovery`` (after - before),
    ``attack_half_rouge_after`` (did the attack take), ``final_loss`` and the sizes.
    """
    attack_half, heldout = split_halves(forget)
    before = split_rouge(model, tokenizer, heldout, generation, progress)
    attacked = copy.deepcopy(model)
    try:
        with _frozen(attached_codebook(model)):
            history = train_answers(
                attacked, tokenizer, attack_half, spec.train_spec(), progress=progress, description="relearn"
            )
        after, attack_after = split_rouges(attacked, tokenizer, [heldout, attack_half], generation, progress)
    finally:
        del attacked
    return {
        "heldout_rouge_before": before,
        "heldout_rouge_after": after,
        "recovery": after - before,
        "attack_half_rouge_after": attack_after,
        "final_loss": float(history[-1]["ce"]),
        "steps": float(spec.steps),
        "attack_records": float(len(attack_half)),
        "heldout_records": float(len(heldout)),
    }
