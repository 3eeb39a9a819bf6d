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
    # Iterative selection keeps its codes-per-round, so every prefix is what that S' would select.
    per_round = -(-spec.num_codes_to_disable // spec.rounds)
    variants = {
        "one_shot": replace(spec, num_codes_to_disable=max(sizes), rounds=1),
        "iterative": replace(spec, num_codes_to_disable=max(sizes), rounds=-(-max(sizes) // per_round)),
    }
    selections: dict[tuple[str, str], CodeMask] = {}
    for control_kind in controls:
        control = build_control(control_kind, forget, retain, name_min_mentions)
        for selection, variant in variants.items():
            full, _ = select_mask(model, bottleneck, tokenizer, forget, control, variant, {}, retain=retain)
            selections[(selection, control_kind)] = full
            for size in sizes:
                rows.append(_point(bottleneck, ranked_mask(full, size), selection, control_kind, size, score))
    # The random control is matched in size to the first selection and disjoint from it.
    rng = np.random.default_rng(seed)
    reference = selections[("iterative", controls[0])]
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
