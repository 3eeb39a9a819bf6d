"""Scores of a passage forget set (a document to forget): VerbMem-style continuation ROUGE and Min-K%
membership, over consecutive token windows so that no part of a passage is cut away.

* ``passage_verbmem``: each passage is cut into windows of ``prompt_tokens + continuation_tokens``
  tokens (the last one ending at the passage's end); the model continues each window's first
  ``prompt_tokens`` greedily and is scored by ROUGE-L F1 against the window's rest
  (``metrics.muse.verbmem_rouge``, MUSE's VerbMem: lower after unlearning). As there, the reference
  is cut to ``continuation_tokens`` tokens with BOS counted, so its last token is not scored when the
  tokenizer has a BOS.
* ``passage_min_k``: each passage is cut into windows of ``window_tokens`` tokens, each scored after
  BOS in its own forward pass, and the passage's Min-K% Prob is taken over all its tokens together
  (``metrics.mia.min_k_prob_score``: higher = less likely a member); feed two lists to ``mia.mia_auc``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from codeunlearn.lm.generation import encode_raw, token_logprobs
from codeunlearn.metrics.mia import MIN_K_RATIO, min_k_prob_score
from codeunlearn.metrics.muse import verbmem_rouge


def token_windows(ids: Sequence[int], size: int) -> list[list[int]]:
    """Consecutive, non-overlapping windows of ``size`` tokens covering ``ids``; the last may be shorter."""
    if size < 1:
        raise ValueError(f"window size must be >= 1, got {size}")
    return [list(ids[start : start + size]) for start in range(0, len(ids), size)]


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    # As metrics.muse.truncate_to_tokens: no clean-up of spaces before punctuation.
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def continuation_pairs(
    tokenizer: Any, texts: Sequence[str], prompt_tokens: int, continuation_tokens: int
) -> list[tuple[str, str]]:
    """(prompt, ground truth) of every window of every passage: the window's first ``prompt_tokens``
    tokens and the rest, decoded. A short last window is replaced by the passage's last full window
    (overlapping the one before), so the passage's end is scored too; a passage no longer than
    ``prompt_tokens`` gives no pair."""
    if prompt_tokens < 1 or continuation_tokens < 1:
        raise ValueError(f"prompt and continuation need >= 1 token each, got {prompt_tokens}, {continuation_tokens}")
    size = prompt_tokens + continuation_tokens
    pairs = []
    for text in texts:
        ids = encode_raw(tokenizer, text, add_bos=False)
        windows = token_windows(ids, size)
        if len(windows) > 1 and len(windows[-1]) < size:
            windows[-1] = list(ids[-size:])
        for window in windows:
            if len(window) > prompt_tokens:
                pairs.append((_decode(tokenizer, window[:prompt_tokens]), _decode(tokenizer, window[prompt_tokens:])))
    if not pairs:
        raise ValueError(f"no passage is longer than prompt_tokens={prompt_tokens}: nothing to continue")
    return pairs


def passage_verbmem(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    prompt_tokens: int,
    continuation_tokens: int,
    batch_size: int,
    progress: bool = False,
) -> float:
    """Mean ROUGE-L F1 of greedy continuations of every window of the passages (lower = less verbatim)."""
    pairs = continuation_pairs(tokenizer, texts, prompt_tokens, continuation_tokens)
    prompts = [prompt for prompt, _ in pairs]
    truths = [truth for _, truth in pairs]
    return verbmem_rouge(model, tokenizer, prompts, truths, batch_size, continuation_tokens, progress=progress)


def passage_min_k(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    window_tokens: int,
    batch_size: int,
    k: float = MIN_K_RATIO,
    progress: bool = False,
) -> list[float]:
    """Per passage, Min-K% Prob over all its tokens, scored window by window after BOS."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    windows: list[list[int]] = []
    owners: list[int] = []
    for index, text in enumerate(texts):
        for window in token_windows(encode_raw(tokenizer, text, add_bos=False), window_tokens):
            if len(bos) + len(window) >= 2:  # without BOS a one-token window has nothing to score
                windows.append(bos + window)
                owners.append(index)
    logprobs = token_logprobs(model, tokenizer, windows, batch_size, progress)
    per_text: list[list[float]] = [[] for _ in texts]
    for owner, values in zip(owners, logprobs, strict=True):
        per_text[owner].extend(values.tolist())
    for index, values in enumerate(per_text):
        if not values:
            raise ValueError(f"passage {index}: no token to score")
    return [min_k_prob_score(values, k) for values in per_text]
