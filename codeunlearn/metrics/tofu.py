"""TOFU metrics (Maini et al., COLM 2024), computed as locuslab/tofu (legacy) and open-unlearning do.

Definitions (shared/reference/eval-anchors.md section 2):

* ROUGE: ROUGE-L *recall* (``rouge_score``, Porter stemmer) of the greedy answer against the gold answer.
* Prob: P~(a|q) = exp(-mean answer-token NLL) on forget/retain; on real authors and world facts the
  normalised P~(true) / (P~(true) + sum_j P~(perturbed_j)).
* Truth ratio per item: R = P~_pert / P~_para = exp(L_para - mean_j L_pert_j), where L is the mean
  answer-token NLL and the perturbed answers are combined by a *geometric* mean (the code's choice;
  the paper writes an arithmetic mean). Real authors and world facts use the original answer in
  place of the paraphrase. Forget statistic: mean(min(R, 1/R)); retain/RA/WF: mean(max(0, 1 - R)).
* Forget quality: ``scipy.stats.ks_2samp`` p-value between the unlearned and retain-model ("oracle")
  per-item R on the forget split.
* Model utility: harmonic mean of the nine retain / real-authors / world-facts numbers
  (Prob, ROUGE, truth-ratio statistic for each).

Deviations, all below float rounding in practice: open-unlearning guards two divisions with
``+ 1e-10`` (R's denominator and 1/R); here R is computed in log space as legacy TOFU does, and
min(R, 1/R) without the guard. Legacy TOFU and open-unlearning run the KS test on 1/R; the test is
invariant to that monotone map, so it is run on R.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from rouge_score import rouge_scorer
from scipy import stats
from torch import nn

from codeunlearn.lm.generation import answer_token_logprobs, generate_answers, mean_nll

SplitKind = Literal["forget", "retain", "real_authors", "world_facts"]
SPLIT_KINDS: tuple[str, ...] = ("forget", "retain", "real_authors", "world_facts")
# TOFU's generation budget (legacy and open-unlearning configs): greedy, 200 new tokens.
TOFU_MAX_NEW_TOKENS = 200
# The splits whose numbers enter Model Utility, in TOFU's order; forget metrics are excluded.
UTILITY_SPLITS: tuple[str, ...] = ("retain", "real_authors", "world_facts")
UTILITY_METRICS: tuple[str, ...] = ("prob", "rouge", "truth_ratio")


def rouge_l_recall(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L recall with stemming, per item: LCS(pred, ref) / len(ref tokens)."""
    _same_length(predictions=predictions, references=references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    # rouge_score's argument order is (target, prediction); recall is relative to the target.
    pairs = zip(predictions, references, strict=True)
    return [scorer.score(ref, pred)["rougeL"].recall for pred, ref in pairs]


def answer_probability(mean_nlls: Sequence[float]) -> list[float]:
    """P~(a|q) = exp(-mean token NLL): the length-normalised answer probability, per item."""
    return [math.exp(-nll) for nll in mean_nlls]


def truth_ratio(paraphrased_nlls: Sequence[float], perturbed_nlls: Sequence[Sequence[float]]) -> list[float]:
    """Per-item R = exp(L_para - mean_j L_pert_j) = P~_pert / P~_para (geometric mean over perturbations).

    R < 1: the model prefers the true (paraphrased) answer; R near 1: it cannot tell true from false.
    """
    _same_length(paraphrased_nlls=paraphrased_nlls, perturbed_nlls=perturbed_nlls)
    ratios = []
    for index, (para, perturbed) in enumerate(zip(paraphrased_nlls, perturbed_nlls, strict=True)):
        if len(perturbed) == 0:
            raise ValueError(f"item {index}: no perturbed-answer NLLs to form a truth ratio")
        ratios.append(math.exp(para - float(np.mean(perturbed))))
    return ratios


def forget_truth_ratio_stat(ratios: Sequence[float]) -> float:
    """mean(min(R, 1/R)): 1 when true and false answers are equally likely (the forget-set ideal)."""
    array = _nonempty(ratios, "ratios")
    with np.errstate(divide="ignore"):
        return float(np.mean(np.minimum(array, 1.0 / array)))


def retain_truth_ratio_stat(ratios: Sequence[float]) -> float:
    """mean(max(0, 1 - R)): high when the true answer is much likelier than the perturbed ones."""
    return float(np.mean(np.maximum(0.0, 1.0 - _nonempty(ratios, "ratios"))))


def forget_quality(unlearned_ratios: Sequence[float], oracle_ratios: Sequence[float]) -> float:
    """KS-test p-value between the unlearned and the retain model's per-item truth ratios (forget split).

    1.0 means indistinguishable from the model that never saw the forget set; < 0.05 is the usual
    line for "distinguishable". Both samples must come from the same items, code and item count.
    """
    unlearned = _nonempty(unlearned_ratios, "unlearned_ratios")
    oracle = _nonempty(oracle_ratios, "oracle_ratios")
    return float(stats.ks_2samp(unlearned, oracle).pvalue)


def normalized_probability(true_nlls: Sequence[float], perturbed_nlls: Sequence[Sequence[float]]) -> list[float]:
    """Per item P~(true) / (P~(true) + sum_j P~(pert_j)), for real authors and world facts.

    Computed as 1 / (1 + sum_j exp(L_true - L_pert_j)), the same number without underflow.
    """
    _same_length(true_nlls=true_nlls, perturbed_nlls=perturbed_nlls)
    probs = []
    for index, (true, perturbed) in enumerate(zip(true_nlls, perturbed_nlls, strict=True)):
        if len(perturbed) == 0:
            raise ValueError(f"item {index}: no perturbed-answer NLLs to normalise against")
        probs.append(1.0 / (1.0 + sum(math.exp(true - pert) for pert in perturbed)))
    return probs


def model_utility(values: Sequence[float] | Mapping[str, float]) -> float:
    """Harmonic mean of the retain / real-authors / world-facts numbers (TOFU uses nine); 0 if any is 0."""
    numbers = list(values.values()) if isinstance(values, Mapping) else list(values)
    array = _nonempty(numbers, "values")
    if np.any(~np.isfinite(array)) or np.any(array < 0):
        raise ValueError(f"model utility needs finite non-negative numbers, got {numbers}")
    if np.any(array == 0):
        return 0.0
    return float(stats.hmean(array))


def model_utility_inputs(split_results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """The nine Model Utility inputs, named ``<split>_<metric>``, from ``evaluate_tofu_split`` results
    keyed by split kind ("retain", "real_authors", "world_facts")."""
    missing = [split for split in UTILITY_SPLITS if split not in split_results]
    if missing:
        raise KeyError(f"model utility needs results for {missing}; got {sorted(split_results)}")
    return {
        f"{split}_{metric}": float(split_results[split][metric])
        for split in UTILITY_SPLITS
        for metric in UTILITY_METRICS
    }


def evaluate_tofu_split(
    model: nn.Module,
    tokenizer,
    records: Sequence[Any],
    kind: SplitKind,
    *,
    generation_batch_size: int,
    score_batch_size: int,
    max_length: int,
    max_new_tokens: int = TOFU_MAX_NEW_TOKENS,
    progress: bool = False,
) -> dict[str, Any]:
    """ROUGE, Prob and truth ratio of one TOFU evaluation split, as TOFU reports them.

    ``records`` carry ``question``, ``answer``, ``paraphrased_answer`` (required for forget/retain)
    and ``perturbed_answers``. Returns numbers only (never generated text, which may quote the
    forget set): ``rouge``, ``prob``, ``truth_ratio`` (the split's statistic: min(R, 1/R) on forget,
    max(0, 1 - R) elsewhere), per-item ``rouge_by_item``, ``prob_by_item``, ``truth_ratios`` (R, for
    the KS test) and ``n``.
    """
    if kind not in SPLIT_KINDS:
        raise ValueError(f"kind must be one of {SPLIT_KINDS}, got {kind!r}")
    if not records:
        raise ValueError(f"no records to evaluate for the {kind} split")
    uses_paraphrase = kind in ("forget", "retain")
    for index, record in enumerate(records):
        where = f"{kind} record {index} (id {getattr(record, 'id', '?')})"
        if uses_paraphrase and not (record.paraphrased_answer or "").strip():
            raise ValueError(f"{where}: paraphrased_answer is required for the truth ratio")
        if not record.perturbed_answers:
            raise ValueError(f"{where}: perturbed_answers is empty")

    questions = [record.question for record in records]
    generated = generate_answers(model, tokenizer, questions, max_new_tokens, generation_batch_size, progress)
    rouge = rouge_l_recall(generated, [record.answer for record in records])

    # One flat scoring pass: gold answers, then the truth ratio's base answers (paraphrases on
    # forget/retain; RA/WF reuse the gold NLLs), then every perturbed answer.
    pairs = [(record.question, record.answer) for record in records]
    if uses_paraphrase:
        pairs += [(record.question, record.paraphrased_answer) for record in records]
    perturbed_counts = [len(record.perturbed_answers) for record in records]
    pairs += [(record.question, answer) for record in records for answer in record.perturbed_answers]
    nlls = [
        mean_nll(item)
        for item in answer_token_logprobs(model, tokenizer, pairs, score_batch_size, max_length, progress)
    ]

    n = len(records)
    gold_nlls = nlls[:n]
    base_nlls = nlls[n : 2 * n] if uses_paraphrase else gold_nlls
    flat_perturbed = nlls[2 * n :] if uses_paraphrase else nlls[n:]
    perturbed_nlls, offset = [], 0
    for count in perturbed_counts:
        perturbed_nlls.append(flat_perturbed[offset : offset + count])
        offset += count

    if uses_paraphrase:
        prob = answer_probability(gold_nlls)
    else:
        prob = normalized_probability(gold_nlls, perturbed_nlls)
    ratios = truth_ratio(base_nlls, perturbed_nlls)
    ratio_stat = forget_truth_ratio_stat(ratios) if kind == "forget" else retain_truth_ratio_stat(ratios)
    return {
        "rouge": float(np.mean(rouge)),
        "prob": float(np.mean(prob)),
        "truth_ratio": ratio_stat,
        "rouge_by_item": rouge,
        "prob_by_item": prob,
        "truth_ratios": ratios,
        "n": n,
    }


def _same_length(**sequences: Sequence[Any]) -> None:
    lengths = {name: len(values) for name, values in sequences.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"length mismatch: {lengths}")


def _nonempty(values: Sequence[float], name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    return array
