"""What a model is evaluated on and how: the evaluation sets, their fixed subsets, and the decoding budget."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from codeunlearn.metrics import mia

log = logging.getLogger(__name__)

# Splits whose truth ratio uses a paraphrased answer; real authors / world facts use the gold answer.
PARAPHRASE_SPLITS = ("forget", "retain")
TOFU_SPLIT_ORDER = ("forget", "retain", "real_authors", "world_facts")


@dataclass(frozen=True)
class GenerationSpec:
    max_new_tokens: int
    batch_size: int


@dataclass(frozen=True)
class PassageSpec:
    """How a passage forget set is scored (``forget_set.passage``; ``metrics.passage``)."""

    prompt_tokens: int  # VerbMem: each window's first tokens, continued by the model ...
    continuation_tokens: int  # ... and scored against the window's next ones
    window_tokens: int  # Min-K% membership: tokens per scored window


@dataclass(frozen=True)
class EvalSpec:
    """How a model is scored: greedy decoding budget and batch, teacher-forced batch and length."""

    max_new_tokens: int
    batch_size: int  # generation batch
    score_batch_size: int  # teacher-forced scoring batch
    max_length: int  # tokens of prompt + answer scored (longer QAs are cut; answer tokens must survive)
    min_k: float = mia.MIN_K_RATIO
    passage: PassageSpec | None = None  # how a passage request is scored; None: not scored

    @property
    def generation(self) -> GenerationSpec:
        return GenerationSpec(self.max_new_tokens, self.batch_size)


@dataclass
class EvalSets:
    """The records a model is scored on. Empty optional sets are skipped (and their metrics absent)."""

    forget: Sequence[Any]
    retain: Sequence[Any]
    real_authors: Sequence[Any] = ()
    world_facts: Sequence[Any] = ()
    holdout: Sequence[Any] = ()  # MIA non-members: QAs about authors no model was trained on

    def tofu_splits(self) -> dict[str, Sequence[Any]]:
        return {kind: getattr(self, kind) for kind in TOFU_SPLIT_ORDER if len(getattr(self, kind))}

    def counts(self) -> dict[str, int]:
        return {kind: len(getattr(self, kind)) for kind in (*TOFU_SPLIT_ORDER, "holdout")}


def evenly_spaced(records: Sequence[Any], size: int) -> list[Any]:
    """A fixed subset spread over every author, so a smaller eval set still covers the whole split."""
    if size <= 0 or size >= len(records):
        return list(records)
    picks = np.linspace(0, len(records) - 1, size).round().astype(int)
    return [records[i] for i in picks]


def has_truth_ratio_data(record: Any, kind: str) -> bool:
    """Whether a record carries what its split's truth ratio needs (TOFU perturbs only some authors)."""
    if not getattr(record, "perturbed_answers", None):
        return False
    return kind not in PARAPHRASE_SPLITS or bool((getattr(record, "paraphrased_answer", None) or "").strip())


def truth_ratio_records(records: Sequence[Any], kind: str) -> list[Any]:
    """The records whose split's truth ratio can be computed; logs how many lack perturbed data."""
    kept = [r for r in records if has_truth_ratio_data(r, kind)]
    if len(kept) < len(records):
        missing = len(records) - len(kept)
        log.warning("%s: %d of %d records lack perturbed data and are not evaluated", kind, missing, len(records))
    return kept
