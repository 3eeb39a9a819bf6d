"""MUSE metrics (Shi et al., ICLR 2025), computed as swj0419/muse_bench does.

Definitions (shared/reference/eval-anchors.md section 3):

* VerbMem: greedy continuation of the prompt (raw text, BOS first), 128 new tokens, ROUGE-L F1
  *without* stemming against the ground truth cut to 128 tokens.
* KnowMem: ICL pairs "Question: q\\nAnswer: a\\n\\n" then "Question: q\\nAnswer: ", greedy, 32 new
  tokens, cut at "\\n\\n", "\\nQuestion" or "Question:", ROUGE-L F1 (no stemmer) against the answer.
* PrivLeak: Min-40% Prob per text; AUC with forget = non-member (label 0), holdout = member
  (label 1), ranked by -MinK; PrivLeak = (AUC_unl - AUC_retrain) / AUC_retrain * 100. The retrain
  ("oracle") AUC is always an argument: muse_bench hard-codes News 0.4772 / Books 0.5393 for its own
  Llama-2 models, which do not transfer to other models or splits.
* Scalability and sustainability: the same metrics after each growing forget set / each sequential
  request, laid out as a curve table.

All scores are on a 0-1 scale; MUSE's tables multiply VerbMem and KnowMem by 100.
Deviation: generation is batched (see ``codeunlearn.generation``); muse_bench generates one prompt
at a time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from rouge_score import rouge_scorer
from torch import nn

from codeunlearn.lm.generation import encode_raw, generate_continuations
from codeunlearn.metrics.mia import MIN_K_RATIO, mia_auc, min_k_attack, min_k_prob_score

__all__ = [
    "KNOWMEM_MAX_NEW_TOKENS",
    "KNOWMEM_STOP_STRINGS",
    "MIN_K_RATIO",
    "VERBMEM_MAX_NEW_TOKENS",
    "knowmem_prompt",
    "knowmem_rouge",
    "muse_auc",
    "min_k_prob_score",
    "privleak",
    "privleak_auc",
    "rouge_l_f1",
    "scalability_table",
    "sustainability_table",
    "truncate_to_tokens",
    "verbmem_rouge",
]

# muse_bench eval.py defaults.
VERBMEM_MAX_NEW_TOKENS = 128
KNOWMEM_MAX_NEW_TOKENS = 32
KNOWMEM_STOP_STRINGS: tuple[str, ...] = ("\n\n", "\nQuestion", "Question:")


def rouge_l_f1(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F1 without stemming, per item (muse_bench's RougeEvalLogger ``rougeL``)."""
    if len(predictions) != len(references):
        raise ValueError(f"length mismatch: {len(predictions)} predictions, {len(references)} references")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pairs = zip(predictions, references, strict=True)
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in pairs]


def truncate_to_tokens(tokenizer, text: str, max_tokens: int, add_bos: bool = True) -> str:
    """The text cut to its first ``max_tokens`` tokens and decoded back without special tokens.

    As muse_bench, BOS counts as one of the ``max_tokens`` when ``add_bos`` (it encodes the ground
    truth with ``add_special_tokens=True`` before slicing), so 127 text tokens remain for Llama.
    """
    ids = encode_raw(tokenizer, text, add_bos)[:max_tokens]
    # No clean-up of spaces before punctuation: see generation.generate_from_ids.
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def verbmem_rouge(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    ground_truths: Sequence[str],
    batch_size: int,
    max_new_tokens: int = VERBMEM_MAX_NEW_TOKENS,
    add_bos: bool = True,
    progress: bool = False,
    max_prompt_tokens: int | None = None,
) -> float:
    """VerbMem: mean ROUGE-L F1 of greedy continuations against the ground truth cut to
    ``max_new_tokens`` tokens (lower = less verbatim memorisation).

    ``max_prompt_tokens`` (deviation, None = whole prompts as muse_bench) keeps each prompt's last
    tokens, for models whose context is shorter than MUSE's prompts or to bound the cost.
    """
    if len(prompts) != len(ground_truths):
        raise ValueError(f"length mismatch: {len(prompts)} prompts, {len(ground_truths)} ground truths")
    options = {"add_bos": add_bos, "progress": progress, "max_prompt_tokens": max_prompt_tokens}
    outputs = generate_continuations(model, tokenizer, prompts, max_new_tokens, batch_size, **options)
    references = [truncate_to_tokens(tokenizer, gt, max_new_tokens, add_bos) for gt in ground_truths]
    return float(np.mean(rouge_l_f1(outputs, references)))


def knowmem_prompt(question: str, icl_questions: Sequence[str], icl_answers: Sequence[str]) -> str:
    """muse_bench's few-shot QA prompt: each ICL pair, then the question with an open answer slot."""
    if len(icl_questions) != len(icl_answers):
        raise ValueError(f"length mismatch: {len(icl_questions)} ICL questions, {len(icl_answers)} answers")
    pairs = zip(icl_questions, icl_answers, strict=True)
    prefix = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in pairs)
    return prefix + f"Question: {question}\nAnswer: "


def knowmem_rouge(
    model: nn.Module,
    tokenizer,
    questions: Sequence[str],
    answers: Sequence[str],
    icl_questions: Sequence[str],
    icl_answers: Sequence[str],
    batch_size: int,
    max_new_tokens: int = KNOWMEM_MAX_NEW_TOKENS,
    stop_strings: Sequence[str] = KNOWMEM_STOP_STRINGS,
    add_bos: bool = True,
    progress: bool = False,
    max_prompt_tokens: int | None = None,
) -> float:
    """KnowMem: mean ROUGE-L F1 of few-shot greedy answers (on the forget QAs lower is better; on the
    retain QAs it is MUSE's utility). ``max_prompt_tokens`` as in ``verbmem_rouge``."""
    if len(questions) != len(answers):
        raise ValueError(f"length mismatch: {len(questions)} questions, {len(answers)} answers")
    prompts = [knowmem_prompt(question, icl_questions, icl_answers) for question in questions]
    options = {"add_bos": add_bos, "stop_strings": stop_strings, "progress": progress}
    outputs = generate_continuations(
        model, tokenizer, prompts, max_new_tokens, batch_size, **options, max_prompt_tokens=max_prompt_tokens
    )
    return float(np.mean(rouge_l_f1(outputs, list(answers))))


def muse_auc(forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> float:
    """MUSE's privleak AUC: 1 - ``mia.mia_auc(forget, holdout)``, the attack AUC with the forget texts as members.

    MUSE labels forget = 0 and holdout = 1 and ranks by -score, the complement of the attack view. With
    Min-K% scores it is the probability that a holdout text is *likelier* under the model than a forget
    text: about 0.5 for a model that never saw either, near 0 for one that memorised the forget set.
    """
    return 1.0 - mia_auc(forget_scores, holdout_scores)


def privleak(auc_unlearned: float, auc_oracle: float) -> float:
    """PrivLeak = (AUC_unlearned - AUC_oracle) / AUC_oracle * 100, with ``muse_auc``'s orientation.

    About 0 is ideal; strongly negative means under-unlearning, strongly positive over-unlearning.
    ``auc_oracle`` is the retrained (retain-only) model's AUC on the same texts, measured by the caller.
    """
    if not 0 < auc_oracle <= 1:
        raise ValueError(f"auc_oracle must be in (0, 1], got {auc_oracle}")
    if not 0 <= auc_unlearned <= 1:
        raise ValueError(f"auc_unlearned must be in [0, 1], got {auc_unlearned}")
    return (auc_unlearned - auc_oracle) / auc_oracle * 100.0


def privleak_auc(
    model: nn.Module,
    tokenizer,
    forget_texts: Sequence[str],
    holdout_texts: Sequence[str],
    batch_size: int,
    max_length: int,
    k: float = MIN_K_RATIO,
    progress: bool = False,
) -> float:
    """MUSE's forget-vs-holdout Min-K% AUC of one model (feed two of these to ``privleak``)."""
    forget = min_k_attack(model, tokenizer, forget_texts, batch_size, max_length, k=k, progress=progress)
    holdout = min_k_attack(model, tokenizer, holdout_texts, batch_size, max_length, k=k, progress=progress)
    return muse_auc(forget, holdout)


def scalability_table(
    forget_sizes: Sequence[int],
    results: Sequence[Mapping[str, float]],
    baseline: Mapping[str, float] | None = None,
    metrics: Sequence[str] | None = None,
) -> list[dict[str, float]]:
    """MUSE criterion 5: one row per forget-set size (e.g. News ``scal/forget_1..4``), each metric's
    value and, given the pre-unlearning ``baseline``, its change ``<metric>_delta``."""
    if len(forget_sizes) != len(results):
        raise ValueError(f"length mismatch: {len(forget_sizes)} sizes, {len(results)} results")
    return _curve_table("forget_size", list(forget_sizes), results, baseline, metrics)


def sustainability_table(
    results: Sequence[Mapping[str, float]],
    baseline: Mapping[str, float] | None = None,
    metrics: Sequence[str] | None = None,
) -> list[dict[str, float]]:
    """MUSE criterion 6: one row per sequential unlearning request (1, 2, ...), each starting from
    the previous model, with optional ``<metric>_delta`` against the pre-unlearning ``baseline``."""
    return _curve_table("request", list(range(1, len(results) + 1)), results, baseline, metrics)


def _curve_table(
    x_name: str,
    xs: list[int],
    results: Sequence[Mapping[str, float]],
    baseline: Mapping[str, float] | None,
    metrics: Sequence[str] | None,
) -> list[dict[str, float]]:
    if not results:
        raise ValueError("no per-step results to tabulate")
    names = list(metrics) if metrics is not None else sorted(set().union(*(r.keys() for r in results)))
    rows = []
    for x, result in zip(xs, results, strict=True):
        missing = [name for name in names if name not in result]
        if missing:
            raise KeyError(f"{x_name} {x}: missing metrics {missing}")
        row: dict[str, float] = {x_name: x}
        for name in names:
            row[name] = float(result[name])
            if baseline is not None and name in baseline:
                row[f"{name}_delta"] = float(result[name]) - float(baseline[name])
        rows.append(row)
    return rows
