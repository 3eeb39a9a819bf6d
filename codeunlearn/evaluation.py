"""Evaluate one model on the run's evaluation sets: the numbers every report and leaderboard row uses."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from codeunlearn.generation import generate_answers
from codeunlearn.metrics.tofu import rouge_l_recall


@dataclass(frozen=True)
class GenerationSpec:
    max_new_tokens: int
    batch_size: int


def evenly_spaced(records: Sequence[Any], size: int) -> list[Any]:
    """A fixed subset spread over every author, so a smaller eval set still covers the whole split."""
    if size <= 0 or size >= len(records):
        return list(records)
    picks = np.linspace(0, len(records) - 1, size).round().astype(int)
    return [records[i] for i in picks]


def split_rouge(
    model: nn.Module, tokenizer: Any, records: Sequence[Any], spec: GenerationSpec, progress: bool
) -> float:
    """Mean ROUGE-L recall of greedy answers against the gold answers (TOFU's ROUGE)."""
    answers = generate_answers(
        model, tokenizer, [r.question for r in records], spec.max_new_tokens, spec.batch_size, progress=progress
    )
    return float(np.mean(rouge_l_recall(answers, [r.answer for r in records])))


def forget_retain_rouge(
    model: nn.Module,
    tokenizer: Any,
    forget: Sequence[Any],
    retain: Sequence[Any],
    spec: GenerationSpec,
    progress: bool = False,
) -> dict[str, float]:
    return {
        "forget_rouge": split_rouge(model, tokenizer, forget, spec, progress),
        "retain_rouge": split_rouge(model, tokenizer, retain, spec, progress),
    }
