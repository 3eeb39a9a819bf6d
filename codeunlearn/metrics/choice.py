"""Multiple-choice accuracy by the options' log-likelihood, as lm-evaluation-harness scores WMDP and MMLU.

Each option is a continuation of the question's prompt (``lm.prompting.build_prompt``: the model's
chat template, or the plain QA frame); its log-likelihood is the sum of its tokens' log-probabilities
given the prompt, teacher-forced, without EOS (lm-eval's ``loglikelihood`` request). ``acc`` counts
the questions whose right option has the highest log-likelihood; ``acc_norm`` divides each option's
log-likelihood by its length in UTF-8 bytes first (lm-eval's byte-length normalisation), so long
options are not penalised for their length. Ties go to the first option (``numpy.argmax``), as in
lm-eval.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import nn

from codeunlearn.lm.generation import answer_token_logprobs
from codeunlearn.lm.prompting import answer_text


def option_loglikelihoods(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[Any],
    batch_size: int,
    max_length: int,
    progress: bool = False,
) -> list[list[float]]:
    """Per record (``question``, ``choices``), each option's summed token log-probability given the prompt."""
    pairs = [(record.question, choice) for record in records for choice in record.choices]
    logprobs = answer_token_logprobs(
        model, tokenizer, pairs, batch_size, max_length, progress, "evaluate.max_length", add_eos=False
    )
    sums = iter(float(item.sum()) for item in logprobs)
    return [[next(sums) for _ in record.choices] for record in records]


def option_byte_lengths(records: Sequence[Any]) -> list[list[int]]:
    """Each option's length in UTF-8 bytes as scored (with the leading space the answer is given)."""
    return [[len(answer_text(choice).encode("utf-8")) for choice in record.choices] for record in records]


def choice_accuracy(loglikelihoods: Sequence[Sequence[float]], answers: Sequence[int]) -> float:
    """lm-eval's ``acc``: the share of questions whose right option has the highest log-likelihood."""
    if len(loglikelihoods) != len(answers) or not answers:
        raise ValueError(f"need one answer per question and at least one: {len(loglikelihoods)} vs {len(answers)}")
    hits = [int(np.argmax(scores)) == answer for scores, answer in zip(loglikelihoods, answers, strict=True)]
    return float(np.mean(hits))


def choice_accuracy_norm(
    loglikelihoods: Sequence[Sequence[float]], byte_lengths: Sequence[Sequence[int]], answers: Sequence[int]
) -> float:
    """lm-eval's ``acc_norm``: ``acc`` on each option's log-likelihood divided by its byte length."""
    if len(byte_lengths) != len(loglikelihoods):
        raise ValueError(f"length mismatch: {len(loglikelihoods)} questions, {len(byte_lengths)} length rows")
    normalised = [
        [score / length for score, length in zip(scores, lengths, strict=True)]
        for scores, lengths in zip(loglikelihoods, byte_lengths, strict=True)
    ]
    return choice_accuracy(normalised, answers)
