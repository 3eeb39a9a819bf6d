"""Which codes to disable for a forget request, and the mask artifact that records the decision.

Selection is CodeUnlearn's enrichment test: per-token code counts on the forget set against a
control set, a 2x2 chi-squared test per code, and the top S' codes that fire significantly more on
the forget set. The mask is a small, reversible, auditable artifact: safetensors for the ids, JSON
for the provenance, and the sha256 of the exact codebook it belongs to.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from scipy.stats import chi2 as chi2_distribution
from torch import nn
from tqdm.auto import tqdm

from codeunlearn.codebook import CodebookBottleneck, GateSpec, codebook_sha256, peak_fire_rate
from codeunlearn.io import atomic_write_bytes
from codeunlearn.lm.prompting import IGNORE_INDEX, encode_qa, pad_batch


@dataclass(frozen=True)
class CodeCounts:
    counts: torch.Tensor  # [num_codes] how many selected (token, slot) pairs used each code
    tokens: int  # number of tokens counted
    k: int

    @property
    def slots(self) -> int:
        return self.tokens * self.k


class _StopForward(Exception):
    """Raised once the codebook's input is known: the code ids at block L never depend on later blocks."""


@dataclass(frozen=True)
class CodeRanking:
    """Every counted token's ``depth`` most similar codes, best first, under the mask they were ranked with.

    The mask acts on the codebook's output, never on its input, so under any larger mask a token
    selects exactly the first k codes of its ranking that are not disabled (``depth`` >= k + the
    number of codes disabled since). One forward pass serves every round of an iterative selection.
    """

    ids: torch.Tensor  # [tokens, depth] int32
    k: int
    num_codes: int
    # Bottleneck mode: a disabled code's slot goes to the next code of the ranking. Residual mode: the
    # mask never changes which codes a token reads, so counts under any mask are the unmasked counts.
    substitutes: bool = True

    @property
    def tokens(self) -> int:
        return int(self.ids.shape[0])

    def counts(self, disabled: torch.Tensor | None = None) -> CodeCounts:
        """The counts a forward pass with ``disabled`` codes masked gives (it must include the ranking's mask)."""
        counts = torch.zeros(self.num_codes, dtype=torch.long)
        disabled = disabled.cpu() if disabled is not None else None
        for start in range(0, self.tokens, _RANKING_CHUNK):  # bounded memory on large sets
            ids = self.ids[start : start + _RANKING_CHUNK].long()
            if disabled is None or not self.substitutes:
                chosen = ids[:, : self.k]
            else:
                allowed = ~disabled[ids]
                taken = allowed & (allowed.cumsum(-1) <= self.k)
                if int(taken.sum(-1).min()) < self.k:
                    raise ValueError(
                        f"a ranking of depth {ids.shape[1]} has fewer than k={self.k} codes left enabled; "
                        "rank deeper (k + the number of codes disabled since ranking)"
                    )
                chosen = ids[taken]
            counts += torch.bincount(chosen.reshape(-1), minlength=self.num_codes)
        return CodeCounts(counts=counts, tokens=self.tokens, k=self.k)


_RANKING_CHUNK = 65536


def _batches(
    tokenizer: Any, records: Sequence[Any], batch_size: int, max_length: int, positions: str
) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Padded batches and, per batch, the positions whose codes count ("all" tokens or "answer" ones).

    The first token never counts: it is the attention sink (its norm ~100x the median), whose codes
    say nothing about the text and, counted, win the chi-squared test on any split of unequal sizes.
    Records are batched by length, which cuts padding; the sort is stable, so the batches are the same
    on every platform.
    """
    if positions not in ("all", "answer"):
        raise ValueError(f"positions must be 'all' or 'answer', got {positions!r}")
    encoded = sorted((encode_qa(tokenizer, r.question, r.answer, max_length) for r in records), key=_length)
    batches = []
    for start in range(0, len(encoded), batch_size):
        batch = pad_batch(encoded[start : start + batch_size], tokenizer.pad_token_id)
        keep = batch["attention_mask"].bool()
        if positions == "answer":
            # The code at position t produces token t+1, so answer tokens are predicted from t-1 onwards.
            keep = torch.zeros_like(keep)
            keep[:, :-1] = batch["labels"][:, 1:] != IGNORE_INDEX
        keep[:, 0] = False
        batches.append((batch, keep))
    return batches


def _length(encoded: Any) -> int:
    return len(encoded.input_ids)


def _forward(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> None:
    model(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        use_cache=False,
    )


def _codebook_inputs(
    model: nn.Module,
    bottleneck: CodebookBottleneck,
    tokenizer: Any,
    records: Sequence[Any],
    *,
    depth: int,
    masked: bool,
    batch_size: int,
    max_length: int,
    positions: str,
    progress: bool,
    desc: str,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per batch: every token's ``depth`` most similar codes [batch, tokens, depth], the counted
    positions and the real (non-padding) tokens. The forward pass stops at the codebook's input: the
    blocks after it and the LM head never run."""
    captured: list[torch.Tensor] = []

    def rank(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        # The very expression CodebookBottleneck.forward takes its top k from (residual mode reads the
        # unmasked codes: its mask edits the output, never the choice).
        similarities = bottleneck.similarities(bottleneck.norm(args[0]), masked=masked and not bottleneck.residual)
        captured.append(similarities.topk(depth, dim=-1).indices)
        raise _StopForward

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    handle = bottleneck.register_forward_pre_hook(rank)
    try:
        batches = _batches(tokenizer, records, batch_size, max_length, positions)
        for batch, keep in tqdm(batches, desc=desc, disable=not progress, leave=False):
            captured.clear()
            try:
                _forward(model, batch, device)
            except _StopForward:
                pass
            if len(captured) != 1:
                raise ValueError("the codebook did not run in this model's forward: is it attached to this model?")
            yield captured[0].cpu(), keep, batch["attention_mask"].bool()
    finally:
        handle.remove()
        bottleneck.token_mask = None
        model.train(was_training)


@torch.inference_mode()
def rank_codes(
    model: nn.Module,
    bottleneck: CodebookBottleneck,
    tokenizer: Any,
    records: Sequence[Any],
    *,
    depth: int,
    batch_size: int,
    max_length: int,
    positions: str,
    progress: bool = False,
) -> CodeRanking:
    """Each counted token's ``depth`` most similar codes under the bottleneck's current mask."""
    depth = min(max(depth, bottleneck.spec.k), bottleneck.spec.num_codes)
    counting = {"batch_size": batch_size, "max_length": max_length, "positions": positions}
    batches = _codebook_inputs(
        model,
        bottleneck,
        tokenizer,
        records,
        depth=depth,
        masked=True,
        progress=progress,
        desc="code ranks",
        **counting,
    )
    rows = [ids[keep].to(torch.int32) for ids, keep, _ in batches]
    ids = torch.cat(rows) if rows else torch.zeros((0, depth), dtype=torch.int32)
    return CodeRanking(
        ids=ids, k=bottleneck.spec.k, num_codes=bottleneck.spec.num_codes, substitutes=not bottleneck.residual
    )


@dataclass(frozen=True)
class GateCalibration:
    quantile: float  # of the calibration set's peak fire rates: the share of those sequences left ungated
    min_tokens: int
    batch_size: int
    max_length: int
    watch_codes: int  # how many of the mask's top-ranked codes the gate watches


def gate_calibration(gate: Mapping[str, Any], spec: SelectionSpec) -> GateCalibration:
    """The calibration of ``select.gate``, batched as the selection is."""
    return GateCalibration(gate["quantile"], gate["min_tokens"], spec.batch_size, spec.max_length, gate["watch_codes"])


def watch_list(ranked_ids: Sequence[int], calibration: GateCalibration, earlier: Sequence[int] = ()) -> list[int]:
    """The codes a gate watches: an earlier request's, then the top ``watch_codes`` of this ranked mask."""
    watched = list(dict.fromkeys(earlier))
    watched += [code for code in ranked_ids[: calibration.watch_codes] if code not in watched]
    return watched


@torch.inference_mode()
def calibrate_gate(
    model: nn.Module,
    bottleneck: CodebookBottleneck,
    tokenizer: Any,
    records: Sequence[Any],
    watch_ids: Sequence[int],
    calibration: GateCalibration,
    progress: bool = False,
) -> GateSpec:
    """DSG's threshold: a quantile, over sequences the mask should spare, of how often its codes fire.

    Each sequence's peak running fire rate of the watched codes (the gate's own statistic, on every
    real token, answers included) is measured with nothing masked: the gate decides on the codes the
    model would have used.
    """
    if not records:
        raise ValueError("the gate needs calibration records (the retain set): none were given")
    if not watch_ids:
        raise ValueError("the gate needs at least one code to watch")
    gate = GateSpec(threshold=0.0, min_tokens=calibration.min_tokens, watch_ids=tuple(int(i) for i in watch_ids))
    watched = gate.watched(bottleneck.spec.num_codes)
    peaks = []
    batches = _codebook_inputs(
        model,
        bottleneck,
        tokenizer,
        records,
        depth=bottleneck.spec.k,
        masked=False,
        batch_size=calibration.batch_size,
        max_length=calibration.max_length,
        positions="all",
        progress=progress,
        desc="gate calibration",
    )
    for ids, _, real in batches:
        peaks.append(peak_fire_rate(watched[ids].any(-1), real, calibration.min_tokens))
    threshold = float(np.quantile(torch.cat(peaks).double().numpy(), calibration.quantile))
    return replace(gate, threshold=threshold)


def gate_mask(
    model: nn.Module,
    bottleneck: CodebookBottleneck,
    tokenizer: Any,
    mask: CodeMask,
    records: Sequence[Any],
    calibration: GateCalibration,
    progress: bool = False,
) -> CodeMask:
    """``mask`` behind a gate calibrated on ``records`` (the set it should spare). The gate watches the
    codes of the gate already on the bottleneck (earlier requests), then this mask's top-ranked ones."""
    earlier = bottleneck.gate.watch_ids if bottleneck.gate is not None else ()
    watched = watch_list(mask.disabled_ids, calibration, earlier)
    return replace(mask, gate=calibrate_gate(model, bottleneck, tokenizer, records, watched, calibration, progress))


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
    stop_early: bool = True,
) -> CodeCounts:
    """Count the codes selected on every real token of question+answer ("all") or on answer tokens only.

    With ``stop_early`` (the default) the forward pass stops at the codebook, which gives exactly the
    counts of a full forward (the code ids at block L do not depend on later blocks) at about half the cost.
    """
    if stop_early:
        counting = {"batch_size": batch_size, "max_length": max_length, "positions": positions}
        ranking = rank_codes(
            model, bottleneck, tokenizer, records, depth=bottleneck.spec.k, progress=progress, **counting
        )
        return ranking.counts()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    counts = torch.zeros(bottleneck.spec.num_codes, dtype=torch.long)
    tokens = 0
    try:
        batches = _batches(tokenizer, records, batch_size, max_length, positions)
        for batch, keep in tqdm(batches, desc="code counts", disable=not progress, leave=False):
            _forward(model, batch, device)
            ids = bottleneck.last_ids.cpu()[keep]
            counts += torch.bincount(ids.reshape(-1), minlength=bottleneck.spec.num_codes)
            tokens += int(keep.sum())
    finally:
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
    gate: GateSpec | None = None  # None: the mask applies to every input
    strength: float = 1.0  # residual mode: times a disabled code's contribution is subtracted (DSG clamps negative)

    def merged_with(self, other: CodeMask) -> CodeMask:
        """Sequential requests accumulate: the union of both masks, the earlier request's scores first.

        The gate is the later request's, which also watches the earlier request's codes (``gate_mask``).
        """
        if other.codebook_sha256 != self.codebook_sha256:
            raise ValueError("cannot merge masks of different codebooks")
        ids = list(self.disabled_ids)
        scores = list(self.scores)
        for code, score in zip(other.disabled_ids, other.scores, strict=True):
            if code not in ids:
                ids.append(code)
                scores.append(score)
        history = [*self.provenance.get("requests", [self.provenance]), other.provenance]
        return CodeMask(
            ids, scores, self.codebook_sha256, self.num_codes, {"requests": history}, other.gate, other.strength
        )


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
    meta = {k: v for k, v in asdict(mask).items() if k not in ("disabled_ids", "scores", "gate")}
    if mask.gate is not None:
        meta["gate"] = asdict(mask.gate)
    meta["count"] = len(mask.disabled_ids)
    atomic_write_bytes(out_dir / MASK_META, json.dumps(meta, indent=2, sort_keys=True).encode())


def load_mask(directory: Path) -> CodeMask:
    for name in (MASK_TENSORS, MASK_META):
        if not (directory / name).exists():
            raise FileNotFoundError(f"{directory / name}: mask file missing")
    meta = json.loads((directory / MASK_META).read_text())
    tensors = load_file(str(directory / MASK_TENSORS))
    gate = meta.get("gate")
    if gate is not None and set(gate) != set(GateSpec.__dataclass_fields__):
        raise ValueError(f"{directory / MASK_META}: field 'gate' must have {sorted(GateSpec.__dataclass_fields__)}")
    return CodeMask(
        disabled_ids=tensors["disabled_ids"].tolist(),
        scores=tensors["scores"].tolist(),
        codebook_sha256=meta["codebook_sha256"],
        num_codes=meta["num_codes"],
        provenance=meta.get("provenance", {}),
        gate=GateSpec(**{**gate, "watch_ids": tuple(gate["watch_ids"])}) if gate is not None else None,
        strength=float(meta.get("strength", 1.0)),
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
    bottleneck.gate = mask.gate
    bottleneck.strength = mask.strength


def unmask(bottleneck: CodebookBottleneck) -> None:
    """Re-enable every code and drop the gate: the model is exactly the codebook model again."""
    bottleneck.disabled.zero_()
    bottleneck.gate = None
    bottleneck.strength = 1.0


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

    Each round counts codes with the codes chosen so far disabled, so the substitutes that take their
    place can be chosen next. The mask changes only what the codebook outputs, never its input, so
    the forget, control (and retain) sets are each run through the model once, up to the codebook,
    and every round re-counts them exactly from the tokens' code rankings (see ``CodeRanking``).

    The ids come out in the order they were chosen, so a prefix is the selection at a smaller S'.
    The bottleneck's mask is never touched.
    """
    if spec.rounds < 1:
        raise ValueError(f"select.rounds must be >= 1, got {spec.rounds}")
    if spec.protect_retain and retain is None:
        raise ValueError("protect_retain needs the retain records")
    counting = {"batch_size": spec.batch_size, "max_length": spec.max_length, "positions": spec.positions}
    per_round = -(-spec.num_codes_to_disable // spec.rounds)
    # Deep enough for every round: at most per_round x (rounds - 1) codes are disabled before the last.
    depth = bottleneck.spec.k + per_round * (spec.rounds - 1)

    def rank(records: Sequence[Any]) -> CodeRanking:
        return rank_codes(model, bottleneck, tokenizer, records, depth=depth, progress=progress, **counting)

    forget_ranking = rank(forget)
    control_ranking = rank(control)
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


def ranked_mask(mask: CodeMask, size: int) -> CodeMask:
    """The first ``size`` codes of a ranked mask: one selection serves a whole S' sweep.

    Ungated: a gate is calibrated for one set of codes, so a prefix needs its own.
    """
    return CodeMask(
        mask.disabled_ids[:size],
        mask.scores[:size],
        mask.codebook_sha256,
        mask.num_codes,
        {**mask.provenance, "num_codes_to_disable": size},
        strength=mask.strength,
    )


def random_mask_like(mask: CodeMask, generator: np.random.Generator, exclude: Sequence[int] = ()) -> CodeMask:
    """The matched control: as many codes as ``mask``, drawn uniformly from the codes it did not pick,
    behind the same gate (the same watched codes and threshold, so it acts on the same sequences): the
    control isolates which codes are removed from when they are."""
    pool = np.setdiff1d(np.arange(mask.num_codes), np.asarray([*mask.disabled_ids, *exclude], dtype=int))
    ids = np.sort(generator.choice(pool, size=min(len(mask.disabled_ids), len(pool)), replace=False))
    return CodeMask(
        disabled_ids=[int(i) for i in ids],
        scores=[0.0] * len(ids),
        codebook_sha256=mask.codebook_sha256,
        num_codes=mask.num_codes,
        provenance={"control": "random", "matched_to": len(mask.disabled_ids)},
        gate=mask.gate,
        strength=mask.strength,
    )
