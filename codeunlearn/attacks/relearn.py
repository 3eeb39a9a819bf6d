"""The relearning attack ("jogging the memory", e.g. Hu et al. 2024, arXiv 2406.13356): does a little
fine-tuning bring the forgotten knowledge back?

Fine-tune a copy for a few steps on half of the forget set and measure forget ROUGE on the *other* half,
which the attack never showed the model. A model that truly forgot should relearn the unseen half no
faster than the oracle (retain-only model) learns it from scratch, so the oracle's row is the
reference, not zero.

The attack works on a copy (``copy.deepcopy``), so the evaluated model is never changed. A codebook
model keeps its bottleneck and mask: ``attach_codebook``'s forward hook closes over the bottleneck,
which ``deepcopy`` shares rather than copies, so the mask applied when the attack runs is the mask the
copy runs with. The attacker trains the language model's weights; the shared codebook (and its mask,
a buffer) are the deployed artifact and stay frozen.

Numbers only: nothing here returns or logs the forget set's text or the model's answers.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn

from codeunlearn.lm.training import TrainSpec, train_answers
from codeunlearn.methods.codeunlearn.codebook import attached_codebook
from codeunlearn.metrics.recovery import recovery
from codeunlearn.metrics.scoring import split_rouge, split_rouges
from codeunlearn.metrics.sets import GenerationSpec

log = logging.getLogger(__name__)


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
    spec: TrainSpec,
    generation: GenerationSpec,
    progress: bool = False,
) -> dict[str, float]:
    """Fine-tune a copy on half the forget set (``spec``: the attacker's fine-tune); forget ROUGE on
    the other half before and after.

    Returns ``heldout_rouge_before``, ``heldout_rouge_after``, ``recovery`` (after - before),
    ``attack_half_rouge_after`` (did the attack take), ``final_loss`` and the sizes.
    """
    attack_half, heldout = split_halves(forget)
    before = split_rouge(model, tokenizer, heldout, generation, progress)
    attacked = copy.deepcopy(model)
    try:
        with _frozen(attached_codebook(model)):
            history = train_answers(attacked, tokenizer, attack_half, spec, progress=progress, description="relearn")
        after, attack_after = split_rouges(attacked, tokenizer, [heldout, attack_half], generation, progress)
    finally:
        del attacked
    return {
        "heldout_rouge_before": before,
        "heldout_rouge_after": after,
        "recovery": recovery(after, before),
        "attack_half_rouge_after": attack_after,
        "final_loss": float(history[-1]["ce"]),
        "steps": float(spec.steps),
        "attack_records": float(len(attack_half)),
        "heldout_records": float(len(heldout)),
    }
