"""CodeUnlearn (Wu, Dossou, Liu 2024): disable the codes that fire significantly more on the forget set.

Zero-shot: forward passes and a chi-squared test, no gradient step. The model must already carry a
trained codebook (``attach_codebook``); the edit is a mask on that codebook, so it is reversible
with ``mask.unmask`` and cumulative across requests.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from codeunlearn.data.records import records_sha256
from codeunlearn.methods.base import UnlearningMethod, UnlearnResult, register_method
from codeunlearn.methods.codeunlearn.codebook import attached_codebook
from codeunlearn.methods.codeunlearn.controls import build_control
from codeunlearn.methods.codeunlearn.gate import gate_calibration, gate_mask
from codeunlearn.methods.codeunlearn.mask import apply_mask
from codeunlearn.methods.codeunlearn.select import SelectionSpec, select_mask


@register_method
class CodeUnlearn(UnlearningMethod):
    name = "codeunlearn"

    def unlearn(
        self,
        model: nn.Module,
        tokenizer: Any,
        forget: Sequence[Any],
        retain: Sequence[Any],
        params: Mapping[str, Any],
    ) -> UnlearnResult:
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
        mask, _ = select_mask(model, bottleneck, tokenizer, forget, control, spec, provenance, retain=retain)
        if params["gate"]["enabled"]:
            # Calibrated on the retain set; it also watches an earlier request's codes.
            calibration = gate_calibration(params["gate"], spec)
            mask = gate_mask(model, bottleneck, tokenizer, mask, retain, calibration)
        apply_mask(bottleneck, mask)
        gate_stats = {"gate_threshold": mask.gate.threshold} if mask.gate is not None else {}
        return UnlearnResult(
            model=model,
            stats={
                **gate_stats,
                "disabled_codes": len(mask.disabled_ids),
                "total_disabled_codes": int(bottleneck.disabled.sum()),
                "enriched_codes": mask.provenance["enriched_codes"],
                "protected_codes": mask.provenance["protected_codes"],
                "select_s": time.perf_counter() - started,
            },
            artifacts={"code_mask": mask},
        )
