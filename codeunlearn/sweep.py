"""The forget/utility frontier: one ranked selection per control, evaluated at every S', each point
beside a random-code control of the same size."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from torch import nn

from codeunlearn.codebook import CodebookBottleneck
from codeunlearn.controls import build_control
from codeunlearn.masking import CodeMask, SelectionSpec, apply_mask, random_mask_like, ranked_mask, select_mask, unmask

Scorer = Callable[[], dict[str, float]]


def frontier(
    model: nn.Module,
    bottleneck: CodebookBottleneck,
    tokenizer: Any,
    forget: Sequence[Any],
    retain: Sequence[Any],
    spec: SelectionSpec,
    controls: Sequence[str],
    sizes: Sequence[int],
    name_min_mentions: int,
    score: Scorer,
    seed: int,
) -> list[dict[str, Any]]:
    """Rows of {selection, control, size, disabled, <metrics>}; the bottleneck is left unmasked."""
    unmask(bottleneck)
    rows = [{"selection": "none", "control": "-", "size": 0, "disabled": 0, **score()}]
    largest = replace(spec, num_codes_to_disable=max(sizes))
    selections: dict[str, CodeMask] = {}
    for control_kind in controls:
        control = build_control(control_kind, forget, retain, name_min_mentions)
        selections[control_kind], _ = select_mask(
            model, bottleneck, tokenizer, forget, control, largest, {}, retain=retain
        )
        for size in sizes:
            mask = ranked_mask(selections[control_kind], size)
            rows.append(_point(bottleneck, mask, "codeunlearn", control_kind, size, score))
    # The random control is matched in size to the first control's selection and disjoint from it.
    rng = np.random.default_rng(seed)
    reference = selections[controls[0]]
    for size in sizes:
        control_mask = random_mask_like(ranked_mask(reference, size), rng)
        rows.append(_point(bottleneck, control_mask, "random", "-", size, score))
    return rows


def _point(
    bottleneck: CodebookBottleneck, mask: CodeMask, selection: str, control: str, size: int, score: Scorer
) -> dict[str, Any]:
    apply_mask(bottleneck, mask)
    try:
        metrics = score()
    finally:
        unmask(bottleneck)
    return {"selection": selection, "control": control, "size": size, "disabled": len(mask.disabled_ids), **metrics}
