"""The forget/utility frontier: one ranked selection per control, evaluated at every S', each point
beside a random-code control of the same size.

Selections: ``one_shot`` (one chi-squared round), ``iterative`` (re-counted with the mask applied), and
``gated_one_shot`` / ``gated_iterative``: the same codes behind a DSG gate calibrated on the retain set
for each S'."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from torch import nn

from codeunlearn.methods.codeunlearn.codebook import CodebookBottleneck
from codeunlearn.methods.codeunlearn.controls import build_control
from codeunlearn.methods.codeunlearn.gate import GateCalibration, gate_mask
from codeunlearn.methods.codeunlearn.mask import CodeMask, apply_mask, random_mask_like, ranked_mask, unmask
from codeunlearn.methods.codeunlearn.select import SelectionSpec, select_mask

SELECTIONS = ("one_shot", "iterative", "gated_one_shot", "gated_iterative")
GATED = "gated_"

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
    selections: Sequence[str] = ("one_shot", "iterative"),
    gate: GateCalibration | None = None,
    codes_per_round: int | None = None,
) -> list[dict[str, Any]]:
    """Rows of {selection, control, size, disabled, gate_threshold, <metrics>}; the bottleneck is left unmasked."""
    unknown = sorted(set(selections) - set(SELECTIONS))
    if unknown:
        raise ValueError(f"select.sweep_selections: unknown {unknown}; choose from {list(SELECTIONS)}")
    if any(s.startswith(GATED) for s in selections) and gate is None:
        raise ValueError("the gated selection needs a gate calibration (select.gate)")
    unmask(bottleneck)
    rows = [{"selection": "none", "control": "-", "size": 0, "disabled": 0, "gate_threshold": None, **score()}]
    # Iterative selection keeps its codes-per-round (by default the pipeline's S'/rounds), so every
    # prefix is what that S' would select.
    per_round = codes_per_round or -(-spec.num_codes_to_disable // spec.rounds)
    variants = {
        "one_shot": replace(spec, num_codes_to_disable=max(sizes), rounds=1),
        "iterative": replace(spec, num_codes_to_disable=max(sizes), rounds=-(-max(sizes) // per_round)),
    }
    selected: dict[tuple[str, str], CodeMask] = {}
    for control_kind in controls:
        control = build_control(control_kind, forget, retain, name_min_mentions)
        for selection in selections:
            variant = selection.removeprefix(GATED)
            if (variant, control_kind) not in selected:
                selected[(variant, control_kind)], _ = select_mask(
                    model, bottleneck, tokenizer, forget, control, variants[variant], {}, retain=retain
                )
            full = selected[(variant, control_kind)]
            for size in sizes:
                mask = ranked_mask(full, size)
                if selection.startswith(GATED):
                    mask = gate_mask(model, bottleneck, tokenizer, mask, retain, gate)
                rows.append(_point(bottleneck, mask, selection, control_kind, size, score))
    # The random control is matched in size to the first selection and disjoint from it; it is never gated,
    # so it is the harshest version of "as many codes, chosen blindly".
    rng = np.random.default_rng(seed)
    reference = selected.get(("iterative", controls[0])) or next(iter(selected.values()))
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
    threshold = mask.gate.threshold if mask.gate is not None else None
    return {
        "selection": selection,
        "control": control,
        "size": size,
        "disabled": len(mask.disabled_ids),
        "gate_threshold": threshold,
        **metrics,
    }
