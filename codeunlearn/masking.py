"""Which codes to disable for a forget request, and the mask artifact that records the decision.

Selection is CodeUnlearn's enrichment test: per-token code counts on the forget set against a
control set, a 2x2 chi-squared test per code, and the top S' codes that fire significantly more on
the forget set. The mask is a small, reversible, auditable artifact: safetensors for the ids, JSON
for the provenance, and the sha256 of the exact codebook it belongs to.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from scipy.stats import chi2 as chi2_distribution
from torch import nn
from tqdm.auto import tqdm

from codeunlearn.codebook import CodebookBottleneck, codebook_sha256
from codeunlearn.io import atomic_write_bytes
from codeunlearn.prompting import IGNORE_INDEX, encode_qa, pad_batch


@dataclass(frozen=True)
class CodeCounts:
    counts: torch.Tensor  # [num_codes] how many selected (token, slot) pairs used each code
    tokens: int  # number of tokens counted
    k: int

    @property
    def slots(self) -> int:
        return self.tokens * self.k


@torch.inference_mode()
def count_codes(
    model: nn.Module,
    bottleneck: CodebookBottleneck,
    tokenizer: Any,
    records: Sequence[Any],
    *,
    batch_size: int,
    max_length: int,
    positions: str,
    progress: bool = False,
) -> CodeCounts:
    """Count the codes selected on every real token of question+answer ("all") or on answer tokens only."""
    if positions not in ("all", "answer"):
        raise ValueError(f"positions must be 'all' or 'answer', got {positions!r}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    counts = torch.zeros(bottleneck.spec.num_codes, dtype=torch.long)
    tokens = 0
    encoded = [encode_qa(tokenizer, r.question, r.answer, max_length) for r in records]
    starts = range(0, len(encoded), batch_size)
    for start in tqdm(starts, desc="code counts", disable=not progress, leave=False):
        batch = pad_batch(encoded[start : start + batch_size], tokenizer.pad_token_id)
        model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        keep = batch["attention_mask"].bool()
        if positions == "answer":
            # The code at position t produces token t+1, so answer tokens are predicted from t-1 onwards.
            keep = torch.zeros_like(keep)
            keep[:, :-1] = batch["labels"][:, 1:] != IGNORE_INDEX
        ids = bottleneck.last_ids.cpu()[keep]
        counts += torch.bincount(ids.reshape(-1), minlength=bottleneck.spec.num_codes)
        tokens += int(keep.sum())
    model.train(was_training)
    return CodeCounts(counts=counts, tokens=tokens, k=bottleneck.spec.k)


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


@dataclass
class CodeMask:
    """Disabled code ids plus everything an auditor needs to know where they came from."""

    disabled_ids: list[int]
    scores: list[float]
    codebook_sha256: str
    num_codes: int
    provenance: dict[str, Any] = field(default_factory=dict)

    def merged_with(self, other: CodeMask) -> CodeMask:
        """Sequential requests accumulate: the union of both masks, the earlier request's scores first."""
        if other.codebook_sha256 != self.codebook_sha256:
            raise ValueError("cannot merge masks of different codebooks")
        ids = list(self.disabled_ids)
        scores = list(self.scores)
        for code, score in zip(other.disabled_ids, other.scores, strict=True):
            if code not in ids:
                ids.append(code)
                scores.append(score)
        history = [*self.provenance.get("requests", [self.provenance]), other.provenance]
        return CodeMask(ids, scores, self.codebook_sha256, self.num_codes, {"requests": history})


MASK_TENSORS = "mask.safetensors"
MASK_META = "mask.json"


def save_mask(mask: CodeMask, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {
        "disabled_ids": torch.tensor(mask.disabled_ids, dtype=torch.long),
        "scores": torch.tensor(mask.scores, dtype=torch.float64),
    }
    tmp = out_dir / f".{MASK_TENSORS}.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, out_dir / MASK_TENSORS)
    meta = {k: v for k, v in asdict(mask).items() if k not in ("disabled_ids", "scores")}
    meta["count"] = len(mask.disabled_ids)
    atomic_write_bytes(out_dir / MASK_META, json.dumps(meta, indent=2, sort_keys=True).encode())


def load_mask(directory: Path) -> CodeMask:
    for name in (MASK_TENSORS, MASK_META):
        if not (directory / name).exists():
            raise FileNotFoundError(f"{directory / name}: mask file missing")
    meta = json.loads((directory / MASK_META).read_text())
    tensors = load_file(str(directory / MASK_TENSORS))
    return CodeMask(
        disabled_ids=tensors["disabled_ids"].tolist(),
        scores=tensors["scores"].tolist(),
        codebook_sha256=meta["codebook_sha256"],
        num_codes=meta["num_codes"],
        provenance=meta.get("provenance", {}),
    )


class MaskMismatchError(ValueError):
    pass


def apply_mask(bottleneck: CodebookBottleneck, mask: CodeMask, source: str = "mask") -> None:
    """Disable the mask's codes; refuses a mask made for another codebook."""
    actual = codebook_sha256(bottleneck)
    if mask.codebook_sha256 != actual:
        raise MaskMismatchError(
            f"{source}: field 'codebook_sha256' is {mask.codebook_sha256[:12]}..., but the loaded codebook "
            f"is {actual[:12]}...; this mask belongs to another codebook and was not applied"
        )
    if mask.num_codes != bottleneck.spec.num_codes:
        raise MaskMismatchError(
            f"{source}: field 'num_codes' is {mask.num_codes}, the codebook has {bottleneck.spec.num_codes}"
        )
    bottleneck.disabled[torch.tensor(mask.disabled_ids, dtype=torch.long)] = True


def unmask(bottleneck: CodebookBottleneck) -> None:
    """Re-enable every code: the model is exactly the codebook model again."""
    bottleneck.disabled.zero_()


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


def _select_once(
    model: nn.Module,
    bottleneck: CodebookBottleneck,
    tokenizer: Any,
    forget: Sequence[Any],
    control: Sequence[Any],
    spec: SelectionSpec,
    provenance: dict[str, Any],
    progress: bool = False,
    retain: Sequence[Any] | None = None,
) -> tuple[CodeMask, Enrichment]:
    """One round: count (with the codebook's current mask), test, keep the top forget-enriched codes."""
    counting = {"batch_size": spec.batch_size, "max_length": spec.max_length, "positions": spec.positions}
    forget_counts = count_codes(model, bottleneck, tokenizer, forget, progress=progress, **counting)
    control_counts = count_codes(model, bottleneck, tokenizer, control, progress=progress, **counting)
    enrichment = chi2_enrichment(forget_counts, control_counts, spec.smoothing)
    protected = None
    if spec.protect_retain:
        if retain is None:
            raise ValueError("protect_retain needs the retain records")
        retain_counts = count_codes(model, bottleneck, tokenizer, retain, progress=progress, **counting)
        versus_retain = chi2_enrichment(forget_counts, retain_counts, spec.smoothing)
        protected = versus_retain.log_ratio <= spec.protect_log_ratio
    ranked = rank_enriched_codes(
        enrichment, alpha=spec.alpha, already_disabled=bottleneck.disabled, protected=protected
    )
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
        codebook_sha256=codebook_sha256(bottleneck),
        num_codes=bottleneck.spec.num_codes,
        provenance=details,
    )
    return mask, enrichment


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
) -> tuple[CodeMask, Enrichment]:
    """CodeUnlearn's zero-shot step: S' forget-enriched codes, found in ``spec.rounds`` rounds.

    The ids come out in the order they were chosen, so a prefix is the selection at a smaller S'.
    The bottleneck's mask is left exactly as it was found.
    """
    if spec.rounds < 1:
        raise ValueError(f"select.rounds must be >= 1, got {spec.rounds}")
    per_round = -(-spec.num_codes_to_disable // spec.rounds)
    found_with = bottleneck.disabled.clone()
    ids: list[int] = []
    scores: list[float] = []
    first: tuple[CodeMask, Enrichment] | None = None
    rounds_run = 0
    try:
        for _ in range(spec.rounds):
            wanted = min(per_round, spec.num_codes_to_disable - len(ids))
            if wanted <= 0:
                break
            mask, enrichment = _select_once(
                model,
                bottleneck,
                tokenizer,
                forget,
                control,
                replace(spec, num_codes_to_disable=wanted),
                provenance,
                progress,
                retain,
            )
            first = first or (mask, enrichment)
            if not mask.disabled_ids:
                break
            rounds_run += 1
            ids.extend(mask.disabled_ids)
            scores.extend(mask.scores)
            bottleneck.disabled[torch.tensor(mask.disabled_ids, dtype=torch.long)] = True
    finally:
        bottleneck.disabled.copy_(found_with)
    first_mask, first_enrichment = first
    details = {**first_mask.provenance, "selection": asdict(spec), "rounds_run": rounds_run}
    return CodeMask(ids, scores, first_mask.codebook_sha256, first_mask.num_codes, details), first_enrichment


def ranked_mask(mask: CodeMask, size: int) -> CodeMask:
    """The first ``size`` codes of a ranked mask: one selection serves a whole S' sweep."""
    return CodeMask(
        mask.disabled_ids[:size],
        mask.scores[:size],
        mask.codebook_sha256,
        mask.num_codes,
        {**mask.provenance, "num_codes_to_disable": size},
    )


def random_mask_like(mask: CodeMask, generator: np.random.Generator, exclude: Sequence[int] = ()) -> CodeMask:
    """The matched control: as many codes as ``mask``, drawn uniformly from the codes it did not pick."""
    pool = np.setdiff1d(np.arange(mask.num_codes), np.asarray([*mask.disabled_ids, *exclude], dtype=int))
    ids = np.sort(generator.choice(pool, size=min(len(mask.disabled_ids), len(pool)), replace=False))
    return CodeMask(
        disabled_ids=[int(i) for i in ids],
        scores=[0.0] * len(ids),
        codebook_sha256=mask.codebook_sha256,
        num_codes=mask.num_codes,
        provenance={"control": "random", "matched_to": len(mask.disabled_ids)},
    )
