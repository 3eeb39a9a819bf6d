"""Which codes to disable for a forget request: CodeUnlearn's enrichment test and its selection loop.

Per-token code counts on the forget set against a control set (``counting``), a 2x2 chi-squared test
per code, and the top S' codes that fire significantly more on the forget set; with ``rounds`` > 1 the
counts are redone with the chosen codes disabled, so the codes that take their place are found too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from scipy.stats import chi2 as chi2_distribution
from torch import nn

from codeunlearn.methods.codeunlearn.codebook import CodebookBottleneck, codebook_sha256
from codeunlearn.methods.codeunlearn.counting import CodeCounts, CodeRanking, rank_codes
from codeunlearn.methods.codeunlearn.mask import CodeMask


@dataclass(frozen=True)
class Enrichment:
    chi2: np.ndarray  # [num_codes] Pearson chi-squared of the 2x2 table (no continuity correction)
    p_value: np.ndarray
    log_ratio: np.ndarray  # log of forget rate over control rate (smoothed): the direction of the effect


def chi2_enrichment(forget: CodeCounts, control: CodeCounts, smoothing: float) -> Enrichment:
    """Vectorised 2x2 chi-squared per code: [used, not used] x [forget, control], counted per slot."""
    a = forget.counts.double().numpy()
    c = control.counts.double().numpy()
    b = forget.slots - a
    d = control.slots - c
    n = a + b + c + d
    denominator = (a + b) * (c + d) * (a + c) * (b + d)
    with np.errstate(divide="ignore", invalid="ignore"):
        chi2 = np.where(denominator > 0, n * (a * d - b * c) ** 2 / denominator, 0.0)
    p_value = chi2_distribution.sf(chi2, df=1)
    log_ratio = np.log((a + smoothing) / (forget.slots + smoothing)) - np.log(
        (c + smoothing) / (control.slots + smoothing)
    )
    return Enrichment(chi2=chi2, p_value=p_value, log_ratio=log_ratio)


def rank_enriched_codes(
    enrichment: Enrichment,
    *,
    alpha: float,
    already_disabled: torch.Tensor | None = None,
    protected: np.ndarray | None = None,
) -> np.ndarray:
    """Code ids significantly enriched on the forget set (p < alpha, forget rate > control rate), by chi2.

    ``protected`` codes (e.g. ones the retain set relies on) and already-disabled codes are never returned.
    """
    eligible = (enrichment.p_value < alpha) & (enrichment.log_ratio > 0)
    if already_disabled is not None:
        eligible &= ~already_disabled.cpu().numpy()
    if protected is not None:
        eligible &= ~protected
    ids = np.flatnonzero(eligible)
    # Stable sort on (-chi2, id) so ties never depend on the platform's sort.
    order = np.lexsort((ids, -enrichment.chi2[ids]))
    return ids[order]


@dataclass(frozen=True)
class SelectionSpec:
    num_codes_to_disable: int  # S'
    alpha: float
    smoothing: float
    positions: str
    batch_size: int
    max_length: int
    # Protect codes the retain set leans on: a code whose forget/retain usage log-ratio is at or below
    # this margin is never disabled. Only meaningful when the control is not the retain set itself.
    protect_retain: bool = False
    protect_log_ratio: float = 0.0
    # Iterative selection: disabled codes are replaced by their nearest neighbours, which may carry
    # the same knowledge; re-counting with the mask applied finds those substitutes in later rounds.
    rounds: int = 1
    strength: float = 1.0  # residual mode: the mask's c (see CodeMask.strength)
    shared_prefix: bool = False  # the records' common leading tokens run once (``counting``)


def _select_once(
    disabled: torch.Tensor,
    forget_counts: CodeCounts,
    control_counts: CodeCounts,
    retain_counts: CodeCounts | None,
    spec: SelectionSpec,
    codebook: tuple[str, int],
    provenance: dict[str, Any],
) -> tuple[CodeMask, Enrichment]:
    """One round: test the counts, keep the top forget-enriched codes that are not ``disabled`` yet."""
    enrichment = chi2_enrichment(forget_counts, control_counts, spec.smoothing)
    protected = None
    if retain_counts is not None:
        versus_retain = chi2_enrichment(forget_counts, retain_counts, spec.smoothing)
        protected = versus_retain.log_ratio <= spec.protect_log_ratio
    ranked = rank_enriched_codes(enrichment, alpha=spec.alpha, already_disabled=disabled, protected=protected)
    chosen = ranked[: spec.num_codes_to_disable]
    details = {
        **provenance,
        "selection": asdict(spec),
        "enriched_codes": int(len(ranked)),
        "protected_codes": int(protected.sum()) if protected is not None else 0,
        "forget_tokens": forget_counts.tokens,
        "control_tokens": control_counts.tokens,
    }
    mask = CodeMask(
        disabled_ids=[int(i) for i in chosen],
        scores=[float(enrichment.chi2[i]) for i in chosen],
        codebook_sha256=codebook[0],
        num_codes=codebook[1],
        provenance=details,
    )
    return mask, enrichment


def ranking_depth(spec: SelectionSpec, k: int) -> int:
    """How many codes per token a selection ranks: enough for every round, as at most per_round x
    (rounds - 1) codes are disabled before the last."""
    return k + _per_round(spec) * (spec.rounds - 1)


def _per_round(spec: SelectionSpec) -> int:
    return -(-spec.num_codes_to_disable // spec.rounds)


def select_mask(
    model: nn.Module,
    bottleneck: CodebookBottleneck,
    tokenizer: Any,
    forget: Sequence[Any],
    control: Sequence[Any],
    spec: SelectionSpec,
    provenance: dict[str, Any],
    progress: bool = False,
    retain: Sequence[Any] | None = None,
    control_ranking: CodeRanking | None = None,
) -> tuple[CodeMask, Enrichment]:
    """CodeUnlearn's zero-shot step: S' forget-enriched codes, found in ``spec.rounds`` rounds.

    Each round counts codes with the codes chosen so far disabled, so the substitutes that take their
    place can be chosen next. The mask changes only what the codebook outputs, never its input, so
    the forget, control (and retain) sets are each run through the model once, up to the codebook,
    and every round re-counts them exactly from the tokens' code rankings (see ``CodeRanking``).

    ``control_ranking``, the control's cached unmasked ranking (``ControlStatistics.ranking``), replaces
    the control's forward pass; it must rank deep enough for the codes already disabled and every round.

    The ids come out in the order they were chosen, so a prefix is the selection at a smaller S'.
    The bottleneck's mask is never touched.
    """
    if spec.rounds < 1:
        raise ValueError(f"select.rounds must be >= 1, got {spec.rounds}")
    if spec.protect_retain and retain is None:
        raise ValueError("protect_retain needs the retain records")
    counting = {
        "batch_size": spec.batch_size,
        "max_length": spec.max_length,
        "positions": spec.positions,
        "shared_prefix": spec.shared_prefix,
    }
    per_round = _per_round(spec)
    depth = ranking_depth(spec, bottleneck.spec.k)

    def rank(records: Sequence[Any]) -> CodeRanking:
        return rank_codes(model, bottleneck, tokenizer, records, depth=depth, progress=progress, **counting)

    forget_ranking = rank(forget)
    control_ranking = control_ranking if control_ranking is not None else rank(control)
    retain_ranking = rank(retain) if spec.protect_retain else None
    codebook = (codebook_sha256(bottleneck), bottleneck.spec.num_codes)
    disabled = bottleneck.disabled.detach().cpu().clone()
    ids: list[int] = []
    scores: list[float] = []
    first: tuple[CodeMask, Enrichment] | None = None
    rounds_run = 0
    for _ in range(spec.rounds):
        wanted = min(per_round, spec.num_codes_to_disable - len(ids))
        if wanted <= 0:
            break
        mask, enrichment = _select_once(
            disabled,
            forget_ranking.counts(disabled),
            control_ranking.counts(disabled),
            retain_ranking.counts(disabled) if retain_ranking is not None else None,
            replace(spec, num_codes_to_disable=wanted),
            codebook,
            provenance,
        )
        first = first or (mask, enrichment)
        if not mask.disabled_ids:
            break
        rounds_run += 1
        ids.extend(mask.disabled_ids)
        scores.extend(mask.scores)
        disabled[torch.tensor(mask.disabled_ids, dtype=torch.long)] = True
    first_mask, first_enrichment = first
    details = {**first_mask.provenance, "selection": asdict(spec), "rounds_run": rounds_run}
    mask = CodeMask(ids, scores, first_mask.codebook_sha256, first_mask.num_codes, details, strength=spec.strength)
    return mask, first_enrichment
