"""Evaluation metrics: one plain function per metric, named in METRICS.

Keys are ``<family>.<metric>`` so that same-named metrics of different benchmarks cannot collide.
Adding a metric is one function in its family's module plus one line here, as open-unlearning's
metric registry does. The evaluation (``metrics.scoring``) looks a row's metrics and its
membership-inference attacks (``scoring.MIA_ATTACKS``) up here by name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from codeunlearn.metrics import choice, mia, muse, passage, recovery, tofu

METRICS: dict[str, Callable[..., Any]] = {
    # TOFU
    "tofu.rouge_l_recall": tofu.rouge_l_recall,
    "tofu.answer_probability": tofu.answer_probability,
    "tofu.truth_ratio": tofu.truth_ratio,
    "tofu.forget_truth_ratio_stat": tofu.forget_truth_ratio_stat,
    "tofu.retain_truth_ratio_stat": tofu.retain_truth_ratio_stat,
    "tofu.forget_quality": tofu.forget_quality,
    "tofu.normalized_probability": tofu.normalized_probability,
    "tofu.model_utility": tofu.model_utility,
    "tofu.evaluate_split": tofu.evaluate_tofu_split,
    # MUSE
    "muse.rouge_l_f1": muse.rouge_l_f1,
    "muse.verbmem_rouge": muse.verbmem_rouge,
    "muse.knowmem_rouge": muse.knowmem_rouge,
    "muse.muse_auc": muse.muse_auc,
    "muse.privleak_auc": muse.privleak_auc,
    "muse.privleak": muse.privleak,
    "muse.scalability_table": muse.scalability_table,
    "muse.sustainability_table": muse.sustainability_table,
    # Multiple choice (lm-eval's WMDP / MMLU scoring)
    "choice.accuracy": choice.choice_accuracy,
    "choice.accuracy_norm": choice.choice_accuracy_norm,
    # Passages (a document to forget)
    "passage.verbmem": passage.passage_verbmem,
    "passage.min_k": passage.passage_min_k,
    # Membership inference
    "mia.min_k_attack": mia.min_k_attack,
    "mia.min_k_prob_score": mia.min_k_prob_score,
    "mia.loss_score": mia.loss_score,
    "mia.mia_auc": mia.mia_auc,
    # Attacks
    "attacks.recovery": recovery.recovery,
}


def get_metric(name: str) -> Callable[..., Any]:
    if name not in METRICS:
        raise KeyError(f"unknown metric {name!r}; known metrics: {', '.join(sorted(METRICS))}")
    return METRICS[name]


__all__ = ["METRICS", "choice", "get_metric", "mia", "muse", "passage", "recovery", "tofu"]
