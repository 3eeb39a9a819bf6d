"""Re-quantization attack (Zhang et al. 2024, arXiv 2410.16454): does 4-bit rounding revive forgotten facts?

Small-learning-rate unlearning can move weights by less than half a quantization step, so the
unlearned and the target weights round to the same grid point. Quantize a copy of the unlearned model
(``quantized_copy``), rerun the forget and retain metrics (``quantization_attack``), and report
``recovery`` = forget ROUGE quantized - full precision (``metrics.recovery``). The evaluated model is
never changed; numbers only, never text.

Two quantizers behind one ``QuantizationSpec``:

* ``rtn``: in-place *fake* quantization (quantize, then dequantize back to the weight's dtype) of
  every ``nn.Linear`` weight, round-to-nearest with per-group absmax scales along the input dim. The
  model keeps its architecture and dtype, so every metric, hook and generation path runs unchanged.
* ``torchao``: torchao 0.18's ``IntxWeightOnlyConfig(weight_dtype=int<bits>, granularity=PerGroup(g))``,
  which runs on CPU at 4 and 8 bits (``Int4WeightOnlyConfig`` does not: it needs CUDA or mslk). The
  same config is used for 8 bits (rather than ``Int8WeightOnlyConfig``, which is per-row) so that the
  group size means the same thing for both bit widths.

The two grids differ slightly: RTN here uses the restricted symmetric range +-(2^(bits-1) - 1) with
scale = absmax / (2^(bits-1) - 1), so +-absmax are exact; torchao's symmetric mapping uses the full
range [-2^(bits-1), 2^(bits-1) - 1] with scale = absmax / (2^(bits-1) - 0.5) (seen at 4 bits:
absmax 0.75 -> scale 0.1, +0.75 -> 0.7, -0.75 -> -0.8).

Deviation from the paper's code: FailureLLMUnlearning's only 4-bit path is bitsandbytes FP4 with
blocks of 64 (and LLM.int8 for 8 bits), which needs CUDA; integer RTN and torchao's integer grid
are different quantizers, so record which one produced a number (``QuantizationRecord``).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from codeunlearn.metrics.recovery import recovery
from codeunlearn.metrics.scoring import ModelScores, score_model, summarize
from codeunlearn.metrics.sets import EvalSets, EvalSpec

log = logging.getLogger(__name__)

QUANTIZERS: tuple[str, ...] = ("rtn", "torchao")
# Output heads and embeddings stay in full precision, as in GPTQ/AWQ/RTN baselines; matched as
# substrings of a module's qualified name.
DEFAULT_SKIP: tuple[str, ...] = ("lm_head", "embed")
# The integer widths both quantizers support (torchao's IntxWeightOnlyConfig covers int1..int8;
# symmetric RTN needs at least one magnitude level besides zero).
MIN_BITS, MAX_BITS = 2, 8


@dataclass(frozen=True)
class QuantizationSpec:
    quantizer: Literal["rtn", "torchao"]
    bits: int
    group_size: int

    def __post_init__(self) -> None:
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {self.bits}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")


@dataclass(frozen=True)
class QuantizationRecord:
    """What was done to a model, for the audit trail: quantizer, grid, how many layers, how lossy."""

    quantizer: str
    bits: int
    group_size: int
    symmetric: bool
    n_layers: int
    mean_relative_error: float  # mean over layers of ||W - Q(W)||_F / ||W||_F
    skip: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["skip"] = ",".join(self.skip)
        return record


def fake_quantize_weight(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool = True) -> torch.Tensor:
    """Round-to-nearest quantize then dequantize a 2-D (out, in) weight, one scale per ``group_size``
    consecutive input columns of each row; returns a new tensor of the weight's dtype.

    Symmetric: scale = absmax / (2^(bits-1) - 1), levels -(2^(bits-1) - 1) .. 2^(bits-1) - 1 (the
    restricted range, so zero and +-absmax are exact). Asymmetric: the group's [min, max] widened to
    include 0, scale = (max - min) / (2^bits - 1), integer zero point. Rounding is torch.round (half
    to even). A last group narrower than ``group_size`` (in_features not a multiple) gets its own scale.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    w = weight.detach().float()
    out_features, in_features = w.shape
    n_groups = math.ceil(in_features / group_size)
    pad = n_groups * group_size - in_features
    if pad:
        # Repeating the row's last value leaves the ragged group's min, max and absmax unchanged.
        w = torch.cat([w, w[:, -1:].expand(out_features, pad)], dim=1)
    groups = w.reshape(out_features, n_groups, group_size)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = groups.abs().amax(dim=-1, keepdim=True) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group stays zero
        dequantized = torch.clamp(torch.round(groups / scale), -qmax, qmax) * scale
    else:
        qmax = 2**bits - 1
        low = groups.amin(dim=-1, keepdim=True).clamp(max=0.0)
        high = groups.amax(dim=-1, keepdim=True).clamp(min=0.0)
        scale = (high - low) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-low / scale)
        quantized = torch.clamp(torch.round(groups / scale) + zero, 0, qmax)
        dequantized = (quantized - zero) * scale
    return dequantized.reshape(out_features, -1)[:, :in_features].to(weight.dtype)


def _relative_error(original: torch.Tensor, quantized: torch.Tensor) -> float:
    norm = original.float().norm()
    if norm == 0:
        return 0.0
    return float((original.float() - quantized.float()).norm() / norm)


def _target_linears(model: nn.Module, skip: Sequence[str]) -> list[tuple[str, nn.Linear]]:
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not any(part in name for part in skip)
    ]


@torch.no_grad()
def quantize_rtn_(
    model: nn.Module,
    bits: int,
    group_size: int,
    symmetric: bool = True,
    skip: Sequence[str] = DEFAULT_SKIP,
) -> QuantizationRecord:
    """Fake-quantize every ``nn.Linear`` weight of ``model`` in place (biases stay full precision).

    A weight shared by two linears (tied heads, when not skipped) is quantized once.
    """
    targets = _target_linears(model, skip)
    if not targets:
        raise ValueError(f"no nn.Linear left to quantize in {type(model).__name__} after skip={tuple(skip)}")
    errors, seen = [], set()
    for _name, module in targets:
        if id(module.weight) in seen:
            continue
        seen.add(id(module.weight))
        dequantized = fake_quantize_weight(module.weight, bits, group_size, symmetric)
        errors.append(_relative_error(module.weight, dequantized))
        module.weight.copy_(dequantized)
    return QuantizationRecord(
        quantizer="rtn",
        bits=bits,
        group_size=group_size,
        symmetric=symmetric,
        n_layers=len(errors),
        mean_relative_error=float(sum(errors) / len(errors)),
        skip=tuple(skip),
    )


def _import_torchao():
    try:
        from torchao.quantization import IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerGroup
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the 'torchao' quantizer needs torchao (pinned torchao==0.18.0 in pyproject.toml); "
            "install it or use QuantizationSpec(quantizer='rtn', ...)"
        ) from error
    return IntxWeightOnlyConfig, quantize_, PerGroup


@torch.no_grad()
def quantize_torchao(
    model: nn.Module,
    bits: int,
    group_size: int,
    skip: Sequence[str] = DEFAULT_SKIP,
) -> QuantizationRecord:
    """Quantize every ``nn.Linear`` weight in place with torchao (symmetric int<bits>, per-group scales).

    Weights become torchao tensor subclasses (real integer storage, dequantized in the matmul), so
    the model no longer deep-copies or saves like a plain one; quantize a copy (``quantized_copy``).
    torchao requires ``in_features`` to be a multiple of ``group_size``.
    """
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
    targets = _target_linears(model, skip)
    if not targets:
        raise ValueError(f"no nn.Linear left to quantize in {type(model).__name__} after skip={tuple(skip)}")
    for name, module in targets:
        if module.in_features % group_size:
            raise ValueError(
                f"torchao needs in_features divisible by group_size: layer {name!r} has "
                f"{module.in_features}, group_size={group_size} (the 'rtn' quantizer handles ragged groups)"
            )
    config_cls, torchao_quantize, per_group = _import_torchao()
    config = config_cls(weight_dtype=getattr(torch, f"int{bits}"), granularity=per_group(group_size))
    errors = []
    for _name, module in targets:
        original = module.weight.detach().clone()
        # One layer at a time, so only one full-precision copy is alive for the error measurement.
        # (torchao replaces the Parameter, so linears that shared a weight are quantized separately.)
        torchao_quantize(module, config)
        errors.append(_relative_error(original, module.weight.dequantize()))
    return QuantizationRecord(
        quantizer="torchao",
        bits=bits,
        group_size=group_size,
        symmetric=True,
        n_layers=len(errors),
        mean_relative_error=float(sum(errors) / len(errors)),
        skip=tuple(skip),
    )


def quantize_model_(model: nn.Module, spec: QuantizationSpec, skip: Sequence[str] = DEFAULT_SKIP) -> QuantizationRecord:
    """Quantize ``model`` in place as ``spec`` says (RTN is symmetric, as torchao's is)."""
    if spec.quantizer == "rtn":
        return quantize_rtn_(model, spec.bits, spec.group_size, symmetric=True, skip=skip)
    return quantize_torchao(model, spec.bits, spec.group_size, skip=skip)


def quantized_copy(
    model: nn.Module, spec: QuantizationSpec, skip: Sequence[str] = DEFAULT_SKIP
) -> tuple[nn.Module, QuantizationRecord]:
    """A quantized deep copy; the original model is untouched.

    ``copy.deepcopy`` keeps forward hooks. A hook that closes over a module *outside* the model (as
    ``codebook.attach_codebook``'s bottleneck does) still calls that same module from the copy, so a
    CodeUnlearn mask applied to the bottleneck applies to both; the bottleneck's codes are not
    ``nn.Linear`` weights and are not quantized.
    """
    clone = copy.deepcopy(model)
    record = quantize_model_(clone, spec, skip)
    return clone, record


# The quantized model's numbers kept per spec (forget quality needs the oracle's truth ratios).
QUANT_METRICS = ("forget_rouge", "retain_rouge", "forget_prob", "forget_truth_ratio", "forget_quality", "retain_prob")


def quant_name(spec: QuantizationSpec) -> str:
    """``rtn_w4_g64``: the key a quantized row is stored under."""
    return f"{spec.quantizer}_w{spec.bits}_g{spec.group_size}"


def quantization_specs(config: dict[str, Any]) -> list[QuantizationSpec]:
    """Specs from params: ``{rtn: {bits: [8, 4], group_sizes: [64, 128]}, torchao: {...}}``, 8-bit first."""
    specs = []
    for quantizer in ("rtn", "torchao"):
        block = config.get(quantizer) or {}
        for bits in block.get("bits", []):
            for group_size in block.get("group_sizes", []):
                specs.append(QuantizationSpec(quantizer, int(bits), int(group_size)))
    return specs


def quantization_attack(
    model: nn.Module,
    tokenizer: Any,
    sets: EvalSets,
    spec: EvalSpec,
    specs: Sequence[QuantizationSpec],
    full_precision: dict[str, float],
    oracle: ModelScores | None,
    progress: bool = False,
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, Any]]]:
    """Score a quantized copy per spec on the forget and retain sets.

    Returns ``(metrics, records)``: per spec name the numbers (bits, group_size, forget/retain ROUGE,
    forget Prob / truth ratio / forget quality, ``recovery``, ``retain_change``, weight error) and the
    audit record (quantizer, bits, group size, symmetric, layers, skipped modules), or ``skipped``
    with the reason when a quantizer cannot handle this model (torchao needs in_features divisible
    by the group size, and torchao itself).
    """
    attack_sets = EvalSets(forget=sets.forget, retain=sets.retain)
    metrics: dict[str, dict[str, float]] = {}
    records: dict[str, dict[str, Any]] = {}
    for qspec in specs:
        name = quant_name(qspec)
        try:
            clone, record = quantized_copy(model, qspec)
        except (ValueError, ImportError, RuntimeError, NotImplementedError) as error:
            log.warning("quantization %s skipped: %s", name, error)
            records[name] = {**asdict(qspec), "skipped": str(error)}
            continue
        try:
            values = summarize(score_model(clone, tokenizer, attack_sets, spec, progress), oracle)
        finally:
            del clone
        row = {key: values[key] for key in QUANT_METRICS if key in values}
        row["bits"] = float(qspec.bits)
        row["group_size"] = float(qspec.group_size)
        row["recovery"] = recovery(values["forget_rouge"], full_precision["forget_rouge"])
        row["retain_change"] = values["retain_rouge"] - full_precision["retain_rouge"]
        row["weight_error"] = record.mean_relative_error
        metrics[name] = row
        records[name] = record.as_dict()
    return metrics, records
