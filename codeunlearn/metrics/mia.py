"""Membership-inference attacks (LOSS, Min-K% Prob) and their AUC.

Score convention (open-unlearning's and MUSE's): a per-item attack score is *higher for items less
likely to be training members* (a loss, or minus a log-probability). ``mia_auc`` is the usual
attack AUC: the probability that a random member scores lower than a random non-member, so 1.0
means members are perfectly identified and 0.5 means chance. On an unlearned model, forget vs
holdout AUC near the retain model's value (about 0.5) is the goal; near 1.0 the forget set still
looks like training data.

``mia_auc(forget, holdout)`` equals open-unlearning's ``mia_*`` AUC, which labels forget 0 and
holdout 1 on the raw scores: AUC(y=holdout, s) = AUC(y=forget, -s). It is the project's one AUC:
MUSE publishes the complement, and ``metrics.muse.muse_auc`` derives it from this one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from codeunlearn.lm.generation import text_token_logprobs

# Min-K% Prob's K as MUSE (privleak key "Min-40%") and open-unlearning's min_k config set it.
MIN_K_RATIO = 0.4


def loss_score(logprobs: torch.Tensor | Sequence[float]) -> float:
    """LOSS attack: mean token NLL of the text (higher = less likely a member)."""
    values = _logprob_array(logprobs)
    return float(-values.mean())


def min_k_prob_score(logprobs: torch.Tensor | Sequence[float], k: float = MIN_K_RATIO) -> float:
    """Min-K% Prob (Shi et al. 2024): minus the mean of the lowest ``k`` fraction of token log-probs.

    As muse_bench: ``-mean(sort(logprobs)[:int(len * k)])``. Deviation: at least one token is kept
    (muse_bench returns NaN when ``int(len * k) == 0``, i.e. texts under 1/k tokens), so short
    texts score their single least likely token instead of breaking the AUC.
    """
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    values = np.sort(_logprob_array(logprobs))
    count = max(1, int(len(values) * k))
    return float(-values[:count].mean())


def min_k_attack(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    batch_size: int,
    max_length: int,
    k: float = MIN_K_RATIO,
    add_bos: bool = True,
    progress: bool = False,
) -> list[float]:
    """Per-text Min-K% Prob scores over every token after BOS (muse_bench's privleak inputs)."""
    logprobs = text_token_logprobs(model, tokenizer, texts, batch_size, max_length, add_bos, progress)
    return [min_k_prob_score(item, k) for item in logprobs]


def mia_auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """ROC AUC of separating members from non-members, lower score = member (sklearn roc_auc_score)."""
    members = _finite(member_scores, "member_scores")
    nonmembers = _finite(nonmember_scores, "nonmember_scores")
    labels = np.concatenate([np.ones(len(members)), np.zeros(len(nonmembers))])
    # Negated so that "higher = more likely a member", which is what roc_auc_score ranks.
    return float(roc_auc_score(labels, -np.concatenate([members, nonmembers])))


def _logprob_array(logprobs: torch.Tensor | Sequence[float]) -> np.ndarray:
    if isinstance(logprobs, torch.Tensor):
        values = logprobs.detach().float().cpu().numpy().reshape(-1)
    else:
        values = np.asarray(logprobs, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("no token log-probabilities to score")
    return values


def _finite(scores: Sequence[float], name: str) -> np.ndarray:
    array = np.asarray(scores, dtype=np.float64)
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} holds non-finite values at {np.flatnonzero(~np.isfinite(array)).tolist()}")
    return array
