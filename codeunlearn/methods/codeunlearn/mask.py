"""The mask: the small, reversible, auditable artifact that records which codes a request disabled.

Safetensors for the ids and scores, JSON for the provenance, the gate and the sha256 of the exact
codebook it belongs to; applying it to another codebook is refused. Sequential requests merge masks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save

from codeunlearn.io import atomic_write_bytes
from codeunlearn.methods.codeunlearn.codebook import CodebookBottleneck, GateSpec, codebook_sha256


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
    atomic_write_bytes(out_dir / MASK_TENSORS, save(tensors))
    meta = {k: v for k, v in asdict(mask).items() if k not in ("disabled_ids", "scores", "gate")}
    if mask.gate is not None:
        meta["gate"] = asdict(mask.gate)
    meta["count"] = len(mask.disabled_ids)
    atomic_write_bytes(out_dir / MASK_META, json.dumps(meta, indent=2, sort_keys=True).encode())


def mask_sha256(directory: Path) -> str:
    """The saved mask's identity: sha256 over its tensors, then its JSON."""
    digest = hashlib.sha256()
    for name in (MASK_TENSORS, MASK_META):
        digest.update((directory / name).read_bytes())
    return digest.hexdigest()


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


def mask_without(mask: CodeMask, removed: Sequence[int]) -> CodeMask:
    """``mask`` less the codes ``removed`` (scores dropped): the deployed mask before a request added them."""
    gone = set(removed)
    kept = [i for i in mask.disabled_ids if i not in gone]
    return CodeMask(
        kept, [0.0] * len(kept), mask.codebook_sha256, mask.num_codes, gate=mask.gate, strength=mask.strength
    )


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
