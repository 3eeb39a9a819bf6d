"""The gate (DSG, arXiv 2504.08192): a mask applied only to sequences on which the request's codes fire.

The threshold is calibrated on the set the mask should spare (the retain set): a quantile of how often
the watched codes fire there, measured with nothing masked. The running statistic itself lives with
the bottleneck's forward (``codebook.running_gate``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from codeunlearn.methods.codeunlearn.codebook import CodebookBottleneck, GateSpec, peak_fire_rate
from codeunlearn.methods.codeunlearn.control_stats import ControlStatistics
from codeunlearn.methods.codeunlearn.counting import ranked_code_batches
from codeunlearn.methods.codeunlearn.mask import CodeMask
from codeunlearn.methods.codeunlearn.select import SelectionSpec


@dataclass(frozen=True)
class GateCalibration:
    quantile: float  # of the calibration set's peak fire rates: the share of those sequences left ungated
    min_tokens: int
    batch_size: int
    max_length: int
    watch_codes: int  # how many of the mask's top-ranked codes the gate watches
    shared_prefix: bool = False  # forwarded as the selection's counting is (``counting``)


def gate_calibration(gate: Mapping[str, Any], spec: SelectionSpec) -> GateCalibration:
    """The calibration of ``select.gate``, batched as the selection is."""
    return GateCalibration(
        gate["quantile"], gate["min_tokens"], spec.batch_size, spec.max_length, gate["watch_codes"], spec.shared_prefix
    )


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
    gate = _unset_gate(watch_ids, calibration)
    watched = gate.watched(bottleneck.spec.num_codes)
    peaks = []
    batches = ranked_code_batches(
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
        shared_prefix=calibration.shared_prefix,
    )
    for ids, _, real in batches:
        peaks.append(peak_fire_rate(watched[ids].any(-1), real, calibration.min_tokens))
    return replace(gate, threshold=_quantile(torch.cat(peaks), calibration.quantile))


def calibrate_gate_from_statistics(
    statistics: ControlStatistics, watch_ids: Sequence[int], calibration: GateCalibration
) -> GateSpec:
    """``calibrate_gate`` on the cached control statistics of its records: the same threshold, no forward pass."""
    if statistics.counting.batch_size != calibration.batch_size or statistics.counting.max_length != (
        calibration.max_length
    ):
        raise ValueError(
            f"control statistics batched as {statistics.counting}, the gate calibrates with batch_size "
            f"{calibration.batch_size} and max_length {calibration.max_length}"
        )
    gate = _unset_gate(watch_ids, calibration)
    peaks = statistics.peak_fire_rates(gate.watched(statistics.num_codes), calibration.min_tokens)
    return replace(gate, threshold=_quantile(peaks, calibration.quantile))


def _unset_gate(watch_ids: Sequence[int], calibration: GateCalibration) -> GateSpec:
    if not watch_ids:
        raise ValueError("the gate needs at least one code to watch")
    return GateSpec(threshold=0.0, min_tokens=calibration.min_tokens, watch_ids=tuple(int(i) for i in watch_ids))


def _quantile(peaks: torch.Tensor, quantile: float) -> float:
    if len(peaks) == 0:
        raise ValueError("the gate needs calibration records (the retain set): none were given")
    return float(np.quantile(peaks.double().numpy(), quantile))


def gate_mask(
    model: nn.Module,
    bottleneck: CodebookBottleneck,
    tokenizer: Any,
    mask: CodeMask,
    records: Sequence[Any],
    calibration: GateCalibration,
    progress: bool = False,
    statistics: ControlStatistics | None = None,
) -> CodeMask:
    """``mask`` behind a gate calibrated on ``records`` (the set it should spare), or on their cached
    ``statistics``. The gate watches the codes of the gate already on the bottleneck (earlier requests),
    then this mask's top-ranked ones."""
    earlier = bottleneck.gate.watch_ids if bottleneck.gate is not None else ()
    watched = watch_list(mask.disabled_ids, calibration, earlier)
    if statistics is not None:
        return replace(mask, gate=calibrate_gate_from_statistics(statistics, watched, calibration))
    return replace(mask, gate=calibrate_gate(model, bottleneck, tokenizer, records, watched, calibration, progress))
