"""CodeUnlearn (Wu, Dossou, Liu 2024): disable the codes that fire significantly more on the forget set.

Zero-shot: forward passes and a chi-squared test, no gradient step. The model must already carry a
trained codebook (``attach_codebook``); the edit is a mask on that codebook, so it is reversible
with ``mask.unmask`` and cumulative across requests: the deployed model is the codebook model plus the
*active* mask, the union of every request's codes so far.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from codeunlearn.data.records import records_sha256
from codeunlearn.io import read_json
from codeunlearn.methods.base import UnlearningMethod, UnlearnJob, UnlearnResult, register_method
from codeunlearn.methods.codeunlearn.codebook import CodebookBottleneck, attached_codebook, codebook_sha256
from codeunlearn.methods.codeunlearn.control_stats import (
    ControlStatistics,
    CountingSettings,
    StaleControlStatisticsError,
    compute_control_statistics,
    load_control_statistics,
    save_control_statistics,
)
from codeunlearn.methods.codeunlearn.controls import build_control
from codeunlearn.methods.codeunlearn.gate import gate_calibration, gate_mask
from codeunlearn.methods.codeunlearn.mask import (
    MASK_META,
    MASK_TENSORS,
    CodeMask,
    apply_mask,
    load_mask,
    mask_sha256,
    mask_without,
    save_mask,
)
from codeunlearn.methods.codeunlearn.select import SelectionSpec, ranking_depth, select_mask
from codeunlearn.models.load import Checkpoint

ACTIVE_MASK = "active_mask"  # under a profile's requests folder: the union of every request's codes
MASK_FILES = (MASK_TENSORS, MASK_META)
CODEBOOK_META = "codebook.json"
WEIGHT_PATTERNS = ("*.safetensors", "*.json")
# A control that does not depend on the forget set, whose statistics can be cached across requests.
CACHEABLE_CONTROL = "retain"

log = logging.getLogger(__name__)


def codebook_sha256_of(base_dir: Path) -> str:
    """The sha256 the codebook stage recorded for the codebook saved in ``base_dir``."""
    return read_json(base_dir / CODEBOOK_META)["sha256"]


def codebook_layer(base_dir: Path) -> int:
    """The block whose output the codebook saved in ``base_dir`` reads."""
    return int(read_json(base_dir / CODEBOOK_META)["spec"]["layer"])


@register_method
class CodeUnlearn(UnlearningMethod):
    name = "codeunlearn"
    base_role = "codebook"
    base_stage = "train_codebook"
    params_block = "select"  # CodeUnlearn's params are the pipeline's selection block
    saved_as = "mask"
    cumulative = True

    def blocks_needed(self, base_dir: Path) -> int | None:
        """The blocks up to the codebook's: selection and gate calibration stop their forward pass there."""
        return codebook_layer(base_dir) + 1

    def run(self, job: UnlearnJob) -> UnlearnResult:
        model, params, forget, retain = job.model, job.params, job.forget, job.retain
        bottleneck = attached_codebook(model)
        if bottleneck is None:
            raise ValueError("codeunlearn needs a model with an attached codebook; run train_codebook first")
        started = time.perf_counter()
        spec = SelectionSpec(**{name: params[name] for name in SelectionSpec.__dataclass_fields__})
        control = build_control(params["control"], forget, retain, params["name_min_mentions"])
        provenance = {
            **params.get("provenance", {}),
            "forget_sha256": records_sha256(forget),
            "forget_count": len(forget),
            "control": params["control"],
            "control_sha256": records_sha256(control),
        }
        statistics, cache_state = None, "off"
        cache_root = params.get("statistics_dir")
        if cache_root is not None and params["control"] == CACHEABLE_CONTROL:
            statistics, cache_state = cached_control_statistics(
                Path(cache_root), model, bottleneck, job.tokenizer, control, spec, provenance["control_sha256"]
            )
        mask, _ = select_mask(
            model,
            bottleneck,
            job.tokenizer,
            forget,
            control,
            spec,
            provenance,
            retain=retain,
            control_ranking=statistics.ranking() if statistics is not None else None,
        )
        if params["gate"]["enabled"]:
            # Calibrated on the retain set (the control itself when its statistics are cached); it also
            # watches an earlier request's codes.
            calibration = gate_calibration(params["gate"], spec)
            mask = gate_mask(model, bottleneck, job.tokenizer, mask, retain, calibration, statistics=statistics)
        apply_mask(bottleneck, mask)
        gate_stats = {"gate_threshold": mask.gate.threshold} if mask.gate is not None else {}
        return UnlearnResult(
            model=model,
            stats={
                **gate_stats,
                "control_statistics": cache_state,
                "disabled_codes": len(mask.disabled_ids),
                "total_disabled_codes": int(bottleneck.disabled.sum()),
                "enriched_codes": mask.provenance["enriched_codes"],
                "protected_codes": mask.provenance["protected_codes"],
                "select_s": time.perf_counter() - started,
            },
            artifacts={"code_mask": mask},
        )

    # -- deployment: the codebook model plus a mask -------------------------------------------------

    def save(self, result: UnlearnResult, tokenizer: Any, out: Path, deployed: Path | None = None) -> dict[str, Any]:
        mask: CodeMask = result.artifacts["code_mask"]
        save_mask(mask, out / self.saved_as)
        if deployed is None:
            return {}
        previous = load_mask(deployed) if (deployed / MASK_META).exists() else None
        merged = previous.merged_with(mask) if previous is not None else mask
        save_mask(merged, deployed)
        return {"active_disabled_codes": len(merged.disabled_ids), "mask_sha256": mask_sha256(deployed)}

    def deploy(self, load_base: Callable[[], Checkpoint], saved: Path, device: str | torch.device) -> Checkpoint:
        checkpoint = load_base()
        apply_mask(checkpoint.bottleneck, load_mask(saved), source=str(saved))
        return checkpoint

    def deployed_state(self, requests: Path, request: Path) -> Path:
        return requests / ACTIVE_MASK

    def resume(self, base: Checkpoint, deployed: Path) -> None:
        if (deployed / MASK_META).exists() and base.bottleneck is not None:
            apply_mask(base.bottleneck, load_mask(deployed), source=str(deployed))

    def before(self, load_base: Callable[[], Checkpoint], deployed: Path, request: Path) -> Checkpoint:
        checkpoint = load_base()
        added = load_mask(request / self.saved_as).disabled_ids
        apply_mask(checkpoint.bottleneck, mask_without(load_mask(deployed), added))
        return checkpoint

    def state_sha256(self, deployed: Path) -> str | None:
        return mask_sha256(deployed)

    def state_changed(self, snapshot: Path, summary: Mapping[str, Any]) -> bool:
        return bool(summary.get("mask_sha256")) and mask_sha256(snapshot) != summary["mask_sha256"]

    def version_tags(self, base_dir: Path, deployed: Path, summary: Mapping[str, Any]) -> dict[str, str]:
        return {
            "codeunlearn.codebook_sha256": codebook_sha256_of(base_dir),
            "codeunlearn.mask_sha256": summary["mask_sha256"],
        }

    def audit_facts(self, base_dir: Path, request: Path, snapshot: Path) -> dict[str, Any] | None:
        return {
            "request_sha256": mask_sha256(request / self.saved_as),
            "deployed_sha256": mask_sha256(snapshot),
            "codebook_sha256": codebook_sha256_of(base_dir),
            "disabled_codes": len(load_mask(request / self.saved_as).disabled_ids),
            "active_disabled_codes": len(load_mask(snapshot).disabled_ids),
        }

    def audit_files(self, base_dir: Path, request: Path, snapshot: Path) -> list[tuple[str, Path, Sequence[str]]]:
        return [
            ("request_mask", request / self.saved_as, MASK_FILES),
            ("deployed_mask", snapshot, MASK_FILES),
            ("codebook_model", base_dir, WEIGHT_PATTERNS),
        ]

    def integrity_checks(self, base_dir: Path, deployed: Path, tags: Mapping[str, str]) -> list[dict[str, Any]]:
        actual = mask_sha256(deployed) if (deployed / MASK_META).exists() else None
        expected = tags.get("codeunlearn.mask_sha256")
        codebook = codebook_sha256_of(base_dir)
        registered = tags.get("codeunlearn.codebook_sha256")
        return [
            {
                "check": "active_mask_is_registered",
                "passed": actual is not None and actual == expected,
                "reason": f"{deployed}: sha256 {str(actual)[:12]}..., registered {str(expected)[:12]}...",
            },
            {
                "check": "codebook_is_registered",
                "passed": codebook == registered,
                "reason": f"codebook.json sha256 {codebook[:12]}..., registered {str(registered)[:12]}...",
            },
        ]


def cached_control_statistics(
    root: Path,
    model: torch.nn.Module,
    bottleneck: CodebookBottleneck,
    tokenizer: Any,
    control: Sequence[Any],
    spec: SelectionSpec,
    control_sha256: str,
) -> tuple[ControlStatistics, str]:
    """The control's statistics from ``root`` (one folder per control data hash), computed and saved there
    when missing, stale (another codebook, control or batching: refused with both hashes, logged) or too
    shallow for the codes already disabled. Returns them and which of "cached", "computed",
    "recomputed: stale", "recomputed: too shallow" happened."""
    directory = root / control_sha256[:16]
    counting = CountingSettings(spec.batch_size, spec.max_length, spec.positions, spec.shared_prefix)
    codebook = codebook_sha256(bottleneck)
    depth = ranking_depth(spec, bottleneck.spec.k)
    disabled = int(bottleneck.disabled.sum())
    state = "computed"
    try:
        statistics = load_control_statistics(
            directory, codebook_sha256=codebook, control_sha256=control_sha256, counting=counting
        )
        if statistics.covers(depth, disabled):
            return statistics, "cached"
        state = "recomputed: too shallow"
    except FileNotFoundError:
        pass
    except StaleControlStatisticsError as err:
        log.warning("%s; recomputing them", err)
        state = "recomputed: stale"
    # Room for one more request's codes, so the next request on a bottleneck codebook reuses the cache.
    headroom = spec.num_codes_to_disable if not bottleneck.residual else 0
    statistics = compute_control_statistics(
        model,
        bottleneck,
        tokenizer,
        control,
        depth=depth + disabled + headroom,
        counting=counting,
        codebook_sha256=codebook,
        control_sha256=control_sha256,
    )
    save_control_statistics(statistics, directory)
    return statistics, state
