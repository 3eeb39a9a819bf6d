"""What several task modules share: the pipeline's models by role, running and deploying a method, the
evaluation suite, forget-set validation. Imports no stage module (only context, tracking and the library).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from codeunlearn.attacks.quantize import quantization_specs
from codeunlearn.audit.attacks import AuditSettings, attack_metrics
from codeunlearn.audit.record import split_version
from codeunlearn.checkpoints import load_checkpoint
from codeunlearn.data.forget_files import (
    RecordFile,
    RecordKind,
    check_neighbour_kind,
    load_record_file,
    read_request_files,
    unlearning_records,
)
from codeunlearn.data.neighbours import NeighbourSplit, split_neighbours
from codeunlearn.data.records import QARecord
from codeunlearn.data.validation import ValidationBounds, validate_forget_retain
from codeunlearn.data.validation_report import ValidationReport, require_valid
from codeunlearn.eval.muse import KnowMemSet, MuseSpec, knowmem_score, load_knowmem_set, muse_spec
from codeunlearn.eval.suite import Suite, muse_run, relearn_spec
from codeunlearn.io import atomic_write_text, read_json, write_json
from codeunlearn.methods import UnlearnResult, get_method
from codeunlearn.metrics.scoring import ExtraScore
from codeunlearn.metrics.sets import evenly_spaced
from codeunlearn.models.device import resolve_device
from codeunlearn.models.load import Checkpoint
from codeunlearn.profiling import ResourceMeter
from tasks import tracking
from tasks.context import RunContext

# --------------------------------------------------------------------------------- models by role


def model_dir(ctx: RunContext, role: str) -> Path:
    return ctx.stage_dir("models") / role


def base_pointer(ctx: RunContext) -> Path:
    return ctx.stage_dir("models") / "base.json"


def statistics_dir(ctx: RunContext, role: str) -> Path:
    """Where a method keeps what it computes once per model of ``role`` and reuses across requests (beside
    the model: CodeUnlearn's control statistics, one folder per control data, each naming its codebook)."""
    return model_dir(ctx, role).with_name(f"{role}_statistics")


def method_params(ctx: RunContext, method: str, provenance: dict[str, Any]) -> dict[str, Any]:
    """``ctx.method_params`` plus the method's ``statistics_dir`` (``statistics_dir`` of its base role)."""
    base_role = get_method(method).base_role
    return {**ctx.method_params(method, provenance), "statistics_dir": str(statistics_dir(ctx, base_role))}


def load_role(ctx: RunContext, role: str, num_layers: int | None = None) -> Checkpoint:
    """Load a stage's checkpoint (its first ``num_layers`` blocks only, when given); the base model may live
    in the shared cache (see ``base_model``)."""
    directory = model_dir(ctx, role)
    if role == "base":
        directory = Path(read_json(base_pointer(ctx))["checkpoint"])
    return load_checkpoint(directory, resolve_device(ctx.settings["device"]), num_layers)


# ------------------------------------------------------------------------------------ methods


@dataclass
class MethodRun:
    """One method's unlearning step: its result, the model it started from, and what it cost."""

    result: UnlearnResult
    checkpoint: Checkpoint  # only the blocks the method reads (``UnlearningMethod.blocks_needed``)
    wall_s: float
    peak_mem_mb: float
    deployed: dict[str, Any]  # what ``save`` reported about a request's deployed state


def run_method(
    ctx: RunContext,
    method: str,
    forget: Sequence[Any],
    retain: Sequence[Any],
    out: Path,
    provenance: dict[str, Any],
    deployed: Path | None = None,
) -> MethodRun:
    """Unlearn ``forget`` with ``method`` from its base model and save the result under ``out``: the
    pipeline's select_codes, every request and every comparison row. A request passes its ``deployed``
    state, which a cumulative method starts from and adds to. Wall time and peak memory cover the
    unlearning step only."""
    unlearning = get_method(method)
    role = unlearning.base_role
    checkpoint = load_role(ctx, role, unlearning.blocks_needed(model_dir(ctx, role)))
    if deployed is not None:
        unlearning.resume(checkpoint, deployed)
    params = method_params(ctx, method, provenance)
    with ResourceMeter() as meter:
        result = unlearning.unlearn(checkpoint.model, checkpoint.tokenizer, forget, retain, params)
    saved = unlearning.save(result, checkpoint.tokenizer, out, deployed)
    return MethodRun(result, checkpoint, meter.wall_s, meter.peak_mem_mb, saved)


def deploy(ctx: RunContext, method: str, saved: Path) -> Checkpoint:
    """The model ``method`` serves from a saved result or deployed state."""
    unlearning = get_method(method)
    device = resolve_device(ctx.settings["device"])
    return unlearning.deploy(lambda: load_role(ctx, unlearning.base_role), saved, device)


def requests_dir(ctx: RunContext) -> Path:
    return ctx.stage_dir("requests")


TIMING_FILE = "timing.json"  # a request's request_s (unlearn + register) and evaluate_s, written as each ends


def record_timing(out: Path, **seconds: float) -> None:
    """Add ``seconds`` to the request's timing file (``TIMING_FILE``)."""
    path = out / TIMING_FILE
    write_json(path, {**(read_json(path) if path.exists() else {}), **seconds})


def request_timing(ctx: RunContext, request_id: str) -> dict[str, float]:
    """The request's recorded ``request_s`` and ``evaluate_s`` (those measured so far)."""
    path = requests_dir(ctx) / request_id / TIMING_FILE
    return read_json(path) if path.exists() else {}


def registered_name(ctx: RunContext, method: str) -> str:
    """The registry name of a method's unlearned model (``register_request``)."""
    return f"codeunlearn-{ctx.profile}-unlearned-{method}"


def tag_version(version: str | None, tags: dict[str, str]) -> None:
    """Tag a registered model version (``name/number``); nothing when the model was not registered."""
    parts = split_version(version)
    if parts is None:
        return
    name, number = parts
    client = MlflowClient()
    for key, value in tags.items():
        tracking.with_retries(
            lambda key=key, value=value: client.set_model_version_tag(name, number, key, value),
            "tag a model version",
        )


# ------------------------------------------------------------------------------ evaluation


def build_suite(ctx: RunContext, with_muse: bool = False) -> Suite:
    """The evaluation suite of ``evaluate``'s params; MUSE-News only where asked (the pipeline's evaluate)."""
    cfg = ctx.settings["evaluate"]
    quant_cfg = cfg["quantization"]
    return Suite(
        sets=ctx.eval_sets(),
        spec=ctx.eval_spec(),
        quantization=quantization_specs(quant_cfg) if quant_cfg["enabled"] else [],
        relearn=relearn_spec(cfg, ctx.settings["seed"]) if cfg["relearn"]["enabled"] else None,
        progress=ctx.progress,
        muse=muse_run(cfg, ctx.resolve(ctx.settings["paths"]["muse_dir"])) if with_muse else None,
    )


def retain_eval(ctx: RunContext) -> list:
    """The retain QAs a request's audit scores (the scored authors, evenly spaced as ``evaluate`` sizes them)."""
    return evenly_spaced(ctx.retain_split()[1], ctx.settings["evaluate"]["retain_eval_size"])


def read_forget_file(ctx: RunContext, forget_file: str, kind: str | None = None) -> RecordFile:
    """A request's forget file, of ``kind`` or of the kind its first row shows, checked for repeats."""
    return read_request_files(forget_file, None, ctx.settings["forget_set"]["max_bytes"], kind)[0]


def forget_records(ctx: RunContext, forget_file: str, kind: str | None = None) -> list[Any]:
    """What a method unlearns and the validation checks from a forget file (``unlearning_records``)."""
    return unlearning_records(read_forget_file(ctx, forget_file, kind))


def neighbour_sets(ctx: RunContext, retain_file: str | None) -> tuple[list[Any], list[Any]] | None:
    """(control, held_out) of the request's neighbour file (QAs or passages), split as
    ``request.neighbour_split`` says; ``None`` without a neighbour file (the profile's retain split is the
    control then)."""
    if retain_file is None:
        return None
    neighbours = load_record_file(retain_file, None, ctx.settings["forget_set"]["max_bytes"])
    check_neighbour_kind(neighbours)
    split = NeighbourSplit(**ctx.settings["request"]["neighbour_split"])
    return split_neighbours(neighbours.records, split, retain_file)


def request_knowmem(ctx: RunContext, forget_kind: str) -> tuple[KnowMemSet, MuseSpec] | None:
    """MUSE's KnowMem QAs on other news that a passage request also scores before and after
    (``request.passage_knowmem``, decoded as ``evaluate.muse``); ``None`` for another kind of request."""
    cfg = ctx.settings["request"]["passage_knowmem"]
    if forget_kind != RecordKind.PASSAGE or cfg["size"] < 0:
        return None
    muse_dir = ctx.resolve(ctx.settings["paths"]["muse_dir"])
    icl_examples = ctx.settings["evaluate"]["muse"]["icl_examples"]
    knowmem = load_knowmem_set(muse_dir, cfg["file"], cfg["icl_file"], cfg["size"], icl_examples)
    return knowmem, muse_spec(ctx.settings["evaluate"])


def request_extra_scores(ctx: RunContext, forget_kind: str) -> dict[str, ExtraScore]:
    """The scores a request of ``forget_kind`` adds to ``request_scores``' own, by name: a passage
    request's ``knowmem_retain`` (``request_knowmem``); none for another kind."""
    knowmem = request_knowmem(ctx, forget_kind)
    if knowmem is None:
        return {}
    qas, spec = knowmem
    return {"knowmem_retain": lambda model, tokenizer, progress: knowmem_score(model, tokenizer, qas, spec, progress)}


def request_control(ctx: RunContext, retain_file: str | None) -> list[Any]:
    """What a request's method contrasts the forget set with and calibrates on: the neighbour file's
    control part, else the profile's control retain authors."""
    neighbours = neighbour_sets(ctx, retain_file)
    return neighbours[0] if neighbours is not None else ctx.retain_split()[0]


def audit_attacks(
    ctx: RunContext, checkpoint: Checkpoint, forget: Sequence[Any], retain: Sequence[Any], full: dict[str, float]
) -> tuple[dict[str, Any], dict[str, str]]:
    """``codeunlearn.audit.attacks.attack_metrics`` on the deployed model, as ``audit:`` and ``evaluate:`` say."""
    return attack_metrics(
        checkpoint.model,
        checkpoint.tokenizer,
        forget,
        retain,
        full,
        AuditSettings.from_settings(ctx.settings.get("audit")),
        relearn_spec(ctx.settings["evaluate"], ctx.settings["seed"]),
        ctx.eval_spec().generation,
        ctx.progress,
        ctx.eval_spec().passage,
    )


# ------------------------------------------------------------------------------ validation


def check_forget_retain(
    ctx: RunContext,
    forget: list[QARecord],
    retain: list[QARecord],
    source: str,
    out_dir: Path,
    report: ValidationReport | None = None,
) -> dict:
    """Validate (unless ``report`` already holds the outcome), log the outcome (ids and expectation names
    only), write the report only when it passes."""
    if report is None:
        bounds = ValidationBounds(**ctx.settings["validation"])
        report = validate_forget_retain(forget, retain, bounds, source=source)
    with tracking.stage_run(ctx, "validate_forget_set"):
        tracking.log_metrics({f"validation.{k}": v for k, v in report.statistics.items()})
        tracking.log_metrics({"validation.success": float(report.success)})
        tracking.log_json(report.to_dict(), "validation/report.json")
        tracking.log_text(report.to_html(), "validation/report.html")
        require_valid(report, source)
    write_json(out_dir / "report.json", report.to_dict())
    atomic_write_text(out_dir / "report.html", report.to_html())
    return report.to_dict()
