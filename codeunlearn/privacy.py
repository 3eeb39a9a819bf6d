"""Keep the forget set's text out of what a run shows: any generated text that repeats it is withheld."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

WITHHELD = "[withheld: repeats forget-set text]"
_WORD = re.compile(r"\w+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _grams(words: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def withhold_overlaps(texts: Sequence[str], forget_texts: Iterable[str], ngram: int) -> list[str]:
    """``texts`` with each one that shares a run of ``ngram`` words (or a whole shorter forget text)
    with any of ``forget_texts`` replaced by ``WITHHELD``: a model's answer to a public question can
    still recite what it was asked to forget, and the report must not print it."""
    sensitive: set[tuple[str, ...]] = set()
    for text in forget_texts:
        words = _words(text)
        if words:
            sensitive |= _grams(words, min(ngram, len(words)))
    lengths = sorted({len(gram) for gram in sensitive})
    out = []
    for text in texts:
        words = _words(text)
        leaks = any(_grams(words, n) & sensitive for n in lengths)
        out.append(WITHHELD if leaks else text)
    return out
