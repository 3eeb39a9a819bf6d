"""MUSE-News run on any causal LM: VerbMem, KnowMem on forget and retain, PrivLeak against an oracle.

The metrics are ``metrics.muse``'s (muse_bench's definitions, shared/reference/eval-anchors.md
section 3); this module loads a fixed, evenly spaced subset of the MUSE-News files, fits the prompts
to the model's context and scores one model, keeping numbers only (never text: VerbMem's prompts
and the privleak forget texts are MUSE's forget corpus).

What the numbers mean depends on what the model was trained on. MUSE's own target model was
fine-tuned on the News forget set; a model that never saw it measures general news knowledge and
continuation ability instead, and its Min-K% AUC between the forget and the holdout articles sits
near chance. Compared across a run's models (target, oracle, codebook model, masked model) the rows
then measure collateral damage: how much an unlearning edit costs knowledge it was not asked to
remove.

Deviations from muse_bench, all settable: subsets of the 100 items per split; ``icl_examples`` of
the 10 in-context pairs; prompts longer than ``max_prompt_tokens`` (or than the model's context
minus the new tokens) keep their last tokens; privleak texts are scored on their first
``privleak_max_length`` tokens (muse_bench scores whole articles).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from codeunlearn.data.muse import read_pairs, read_texts
from codeunlearn.metrics import muse
from codeunlearn.metrics.mia import MIN_K_RATIO, min_k_attack
from codeunlearn.metrics.sets import evenly_spaced

# Files of shared/data/muse_news (the layout of muse_bench's data/bbc/).
VERBMEM_FILE = "verbmem/forget.json"
KNOWMEM_FILES = {
    "forget": ("knowmem/forget_qa.json", "knowmem/forget_qa_icl.json"),
    "retain": ("knowmem/retain2_qa.json", "knowmem/retain2_qa_icl.json"),
}
PRIVLEAK_FILES = {"forget": "privleak/forget.json", "holdout": "privleak/holdout.json"}
# Row keys, flat and numeric (metrics.json, MLflow), all on a 0-1 scale except PrivLeak (percent).
KEYS = (
    "muse_verbmem_rouge",
    "muse_knowmem_forget_rouge",
    "muse_knowmem_retain_rouge",
    "muse_privleak_auc",
    "muse_privleak",
)


@dataclass(frozen=True)
class MuseSets:
    """The MUSE items a model is scored on; an empty tuple skips its metric."""

    verbmem: tuple[tuple[str, str], ...] = ()  # (prompt, ground truth)
    knowmem_forget: tuple[tuple[str, str], ...] = ()  # (question, answer)
    knowmem_retain: tuple[tuple[str, str], ...] = ()
    icl_forget: tuple[tuple[str, str], ...] = ()
    icl_retain: tuple[tuple[str, str], ...] = ()
    privleak_forget: tuple[str, ...] = ()
    privleak_holdout: tuple[str, ...] = ()
    sha256: dict[str, str] = field(default_factory=dict)  # per set, of the items actually used

    def counts(self) -> dict[str, int]:
        return {
            "verbmem": len(self.verbmem),
            "knowmem_forget": len(self.knowmem_forget),
            "knowmem_retain": len(self.knowmem_retain),
            "icl_examples": len(self.icl_forget),
            "privleak_forget": len(self.privleak_forget),
            "privleak_holdout": len(self.privleak_holdout),
        }


@dataclass(frozen=True)
class MuseSpec:
    """How MUSE is run: batch sizes, decoding budgets, how much of each prompt and text is kept."""

    batch_size: int = 4  # generation batch
    score_batch_size: int = 8  # teacher-forced batch (privleak)
    max_new_tokens: int = muse.VERBMEM_MAX_NEW_TOKENS  # VerbMem continuation length (MUSE: 128)
    knowmem_max_new_tokens: int = muse.KNOWMEM_MAX_NEW_TOKENS  # MUSE: 32
    max_prompt_tokens: int | None = None  # None: whole prompts (still capped by the model's context)
    privleak_max_length: int = 2048  # tokens of each privleak text scored (capped by the context)
    min_k: float = MIN_K_RATIO


@dataclass
class MuseScores:
    """One model's MUSE numbers: the means, and per-text Min-K% scores for the AUC (no text)."""

    verbmem_rouge: float | None = None
    knowmem_forget_rouge: float | None = None
    knowmem_retain_rouge: float | None = None
    forget_min_k: list[float] = field(default_factory=list)
    holdout_min_k: list[float] = field(default_factory=list)

    @property
    def privleak_auc(self) -> float | None:
        """MUSE's orientation (``metrics.muse.muse_auc``): ~0.5 for a model that saw neither set."""
        if not self.forget_min_k or not self.holdout_min_k:
            return None
        return muse.muse_auc(self.forget_min_k, self.holdout_min_k)


def _subset(items: list[Any], size: int) -> list[Any]:
    """``size`` evenly spaced items; 0 = all, negative = none (the metric is skipped)."""
    return [] if size < 0 else evenly_spaced(items, size)


def _sha256(items: Sequence[Any]) -> str:
    return hashlib.sha256(json.dumps(list(items), ensure_ascii=False).encode()).hexdigest()


def load_muse_sets(
    muse_dir: Path, verbmem_size: int, knowmem_size: int, privleak_size: int, icl_examples: int = 10
) -> MuseSets:
    """Evenly spaced subsets of MUSE-News (each size: 0 = all 100, negative = skip that metric).

    ``knowmem_size`` is taken from the forget and the retain QAs each, ``privleak_size`` from the
    forget and the holdout texts each; ``icl_examples`` is how many of the 10 in-context pairs
    precede each KnowMem question. A missing or malformed file names the file, row and field.
    """
    muse_dir = Path(muse_dir)
    if icl_examples < 0:
        raise ValueError(f"icl_examples must be >= 0, got {icl_examples}")
    verbmem = _subset(read_pairs(muse_dir / VERBMEM_FILE, "prompt", "gt"), verbmem_size) if verbmem_size >= 0 else []
    knowmem: dict[str, list[tuple[str, str]]] = {}
    icl: dict[str, list[tuple[str, str]]] = {}
    for split, (qa_file, icl_file) in KNOWMEM_FILES.items():
        if knowmem_size < 0:
            knowmem[split], icl[split] = [], []
            continue
        knowmem[split] = _subset(read_pairs(muse_dir / qa_file, "question", "answer"), knowmem_size)
        icl[split] = read_pairs(muse_dir / icl_file, "question", "answer")[:icl_examples]
    privleak = {
        split: _subset(read_texts(muse_dir / name), privleak_size) if privleak_size >= 0 else []
        for split, name in PRIVLEAK_FILES.items()
    }
    used = {
        "verbmem": verbmem,
        "knowmem_forget": knowmem["forget"],
        "knowmem_retain": knowmem["retain"],
        "privleak_forget": privleak["forget"],
        "privleak_holdout": privleak["holdout"],
    }
    return MuseSets(
        verbmem=tuple(verbmem),
        knowmem_forget=tuple(knowmem["forget"]),
        knowmem_retain=tuple(knowmem["retain"]),
        icl_forget=tuple(icl["forget"]),
        icl_retain=tuple(icl["retain"]),
        privleak_forget=tuple(privleak["forget"]),
        privleak_holdout=tuple(privleak["holdout"]),
        sha256={name: _sha256(items) for name, items in used.items() if items},
    )


def context_length(model: nn.Module) -> int | None:
    """The model's position limit (``config.max_position_embeddings``), if it states one."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(value) if value else None


def prompt_budget(model: nn.Module, max_new_tokens: int, max_prompt_tokens: int | None) -> int | None:
    """Prompt tokens kept: ``max_prompt_tokens`` capped so that prompt + new tokens fit the context."""
    context = context_length(model)
    budget = max_prompt_tokens
    if context is not None:
        room = context - max_new_tokens
        if room < 2:
            raise ValueError(f"{max_new_tokens} new tokens leave no room for a prompt in a {context}-token context")
        budget = room if budget is None else min(budget, room)
    return budget


@dataclass(frozen=True)
class KnowMemSet:
    """KnowMem QAs and the in-context pairs that precede each question (no text leaves the scorer)."""

    qas: tuple[tuple[str, str], ...]  # (question, answer)
    icl: tuple[tuple[str, str], ...] = ()


def load_knowmem_set(muse_dir: Path, qa_file: str, icl_file: str, size: int, icl_examples: int) -> KnowMemSet:
    """``size`` evenly spaced QAs of ``qa_file`` (0 = all) and the first ``icl_examples`` pairs of
    ``icl_file``, both under ``muse_dir``: a KnowMem set outside a full MUSE run (a passage request's
    ``knowmem_retain``)."""
    if size < 0 or icl_examples < 0:
        raise ValueError(f"size and icl_examples must be >= 0, got {size} and {icl_examples}")
    qas = _subset(read_pairs(Path(muse_dir) / qa_file, "question", "answer"), size)
    icl = read_pairs(Path(muse_dir) / icl_file, "question", "answer")[:icl_examples]
    return KnowMemSet(tuple(qas), tuple(icl))


def knowmem_score(
    model: nn.Module, tokenizer: Any, knowmem: KnowMemSet, spec: MuseSpec, progress: bool = False
) -> float:
    """MUSE's KnowMem (``metrics.muse.knowmem_rouge``) of one model on ``knowmem``, its prompts fitted to
    the model's context as ``spec`` says."""
    return muse.knowmem_rouge(
        model,
        tokenizer,
        [q for q, _ in knowmem.qas],
        [a for _, a in knowmem.qas],
        [q for q, _ in knowmem.icl],
        [a for _, a in knowmem.icl],
        spec.batch_size,
        max_new_tokens=spec.knowmem_max_new_tokens,
        progress=progress,
        max_prompt_tokens=prompt_budget(model, spec.knowmem_max_new_tokens, spec.max_prompt_tokens),
    )


def muse_spec(evaluate: Mapping[str, Any]) -> MuseSpec:
    """How ``evaluate.muse`` in params.yaml runs MUSE (batches, decoding budgets, kept lengths)."""
    cfg = evaluate["muse"]
    return MuseSpec(
        batch_size=cfg["batch_size"],
        score_batch_size=cfg["score_batch_size"],
        max_new_tokens=cfg["max_new_tokens"],
        knowmem_max_new_tokens=cfg["knowmem_max_new_tokens"],
        max_prompt_tokens=cfg["max_prompt_tokens"],
        privleak_max_length=cfg["privleak_max_length"],
        min_k=evaluate["mia"]["min_k"],
    )


def score_muse(model: nn.Module, tokenizer: Any, sets: MuseSets, spec: MuseSpec, progress: bool = False) -> MuseScores:
    """Run one model over every non-empty MUSE set (greedy decoding, teacher-forced Min-K%)."""
    scores = MuseScores()
    if sets.verbmem:
        scores.verbmem_rouge = muse.verbmem_rouge(
            model,
            tokenizer,
            [prompt for prompt, _ in sets.verbmem],
            [truth for _, truth in sets.verbmem],
            spec.batch_size,
            max_new_tokens=spec.max_new_tokens,
            progress=progress,
            max_prompt_tokens=prompt_budget(model, spec.max_new_tokens, spec.max_prompt_tokens),
        )
    for split, items, icl in (
        ("forget", sets.knowmem_forget, sets.icl_forget),
        ("retain", sets.knowmem_retain, sets.icl_retain),
    ):
        if items:
            value = knowmem_score(model, tokenizer, KnowMemSet(items, icl), spec, progress)
            setattr(scores, f"knowmem_{split}_rouge", value)
    if sets.privleak_forget and sets.privleak_holdout:
        context = context_length(model)
        length = spec.privleak_max_length if context is None else min(spec.privleak_max_length, context)
        for split, texts in (("forget", sets.privleak_forget), ("holdout", sets.privleak_holdout)):
            values = min_k_attack(
                model, tokenizer, list(texts), spec.score_batch_size, length, spec.min_k, progress=progress
            )
            setattr(scores, f"{split}_min_k", values)
    return scores


def muse_row(scores: MuseScores, oracle_auc: float | None) -> dict[str, float]:
    """The run's flat MUSE keys (``KEYS``) of one model; present only where measured.

    ``muse_privleak`` is (AUC - AUC_oracle) / AUC_oracle x 100 against ``oracle_auc``, the oracle's
    ``privleak_auc`` on the same texts (0 for the oracle itself); absent without a usable oracle AUC.
    """
    row: dict[str, float] = {}
    for key, value in (
        ("muse_verbmem_rouge", scores.verbmem_rouge),
        ("muse_knowmem_forget_rouge", scores.knowmem_forget_rouge),
        ("muse_knowmem_retain_rouge", scores.knowmem_retain_rouge),
        ("muse_privleak_auc", scores.privleak_auc),
    ):
        if value is not None:
            row[key] = float(value)
    auc = scores.privleak_auc
    if auc is not None and oracle_auc is not None and oracle_auc > 0:
        row["muse_privleak"] = muse.privleak(auc, oracle_auc)
    return row


def muse_details(scores: MuseScores) -> dict[str, Any]:
    """Per-text Min-K% scores (JSON-ready numbers, no text)."""
    return {"forget_min_k": list(scores.forget_min_k), "holdout_min_k": list(scores.holdout_min_k)}
