"""The `codeunlearn` command: run the pipeline, or make the model forget a file of records.

Heavy libraries are imported inside the commands, after their inputs are checked: ``forget`` refuses a
bad file before torch, transformers, Prefect or MLflow is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from codeunlearn.data.forget_files import RecordFile

PARAMS_FILE = Path(__file__).resolve().parents[1] / "params.yaml"

app = typer.Typer(add_completion=False, help="Auditable machine unlearning for language models.")


@app.command()
def pipeline(
    profile: str = typer.Option(None, help="profile in params.yaml (default: its `profile` field)"),
    params: str = typer.Option(None, help="params file (default: the repository's params.yaml)"),
) -> None:
    """Prepare data, train target/oracle/codebook, unlearn, evaluate and report."""
    from flows.pipeline import pipeline as run_pipeline

    results = run_pipeline(profile=profile, params_file=params)
    typer.echo(f"report: {results['report']}")


def _read_request_files(
    forget_file: str, retain_file: str | None, kind: str, profile: str | None, params: str | None
) -> RecordFile:
    """Read and check the request's files with nothing heavier than the data library: no torch, no
    transformers, no Prefect, no MLflow, so a bad file is refused in about a second and writes nothing.
    Returns the forget file; a bad file, kind or params exit with code 2."""
    from codeunlearn.config import ConfigError, load_settings
    from codeunlearn.data.forget_files import RecordKind, check_neighbour_kind, read_request_files
    from codeunlearn.data.records import DataError

    kinds = ["auto", *RecordKind]
    if kind not in kinds:
        typer.echo(f"error: --kind {kind!r} is not one of {', '.join(kinds)}", err=True)
        raise typer.Exit(code=2)
    try:
        settings = load_settings(Path(params) if params else PARAMS_FILE, profile)
        forget, retain = read_request_files(
            forget_file, retain_file, settings["forget_set"]["max_bytes"], None if kind == "auto" else kind
        )
        if retain is not None:
            check_neighbour_kind(retain)
    except (DataError, ConfigError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from err
    return forget


def _check_against_profile(forget: RecordFile, profile: str | None, params: str | None) -> None:
    """The forget set against the profile's retain split (the request's Great Expectations suite), still
    before Prefect, MLflow or torch: a rejected request exits with code 2 and writes nothing anywhere."""
    from codeunlearn.config import RETAIN_SPLIT, load_settings, profile_outputs
    from codeunlearn.data.forget_files import unlearning_records
    from codeunlearn.data.records import DataError, read_jsonl_records
    from codeunlearn.data.validation import check_request
    from codeunlearn.data.validation_report import ForgetSetValidationError

    settings = load_settings(Path(params) if params else PARAMS_FILE, profile)
    split = profile_outputs(settings, PARAMS_FILE.parent) / RETAIN_SPLIT
    if not split.is_file():
        typer.echo(f"error: {split}: no retain split; run the pipeline for this profile first", err=True)
        raise typer.Exit(code=2)
    try:
        retain = read_jsonl_records(split)
        check_request(unlearning_records(forget), retain, settings["validation"], str(forget.path))
    except (DataError, ForgetSetValidationError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from err


def _check_method(method: str, forget: RecordFile) -> None:
    """A known method that unlearns the file's record kind, still before Prefect or MLflow (the method
    registry brings torch, so this runs only once the files are known to be good)."""
    from codeunlearn.data.records import DataError
    from codeunlearn.methods import get_method

    try:
        get_method(method).check_record_kind(str(forget.kind), str(forget.path))
    except (DataError, KeyError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from err


@app.command()
def forget(
    forget_file: str = typer.Option(
        ..., "--forget-file", help="records to forget: .json, .jsonl, .csv or .parquet (docs/usage.md)"
    ),
    retain_file: str = typer.Option(
        None, "--retain-file", help="neighbour records to keep, checked like the forget file and against it"
    ),
    kind: str = typer.Option("auto", help="record kind: auto (from the fields), qa, passage or choice"),
    method: str = typer.Option("codeunlearn", help="unlearning method (see codeunlearn.methods.METHODS)"),
    profile: str = typer.Option(None, help="profile in params.yaml (default: its `profile` field)"),
    params: str = typer.Option(None, help="params file (default: the repository's params.yaml)"),
    evaluate: bool = typer.Option(
        True, help="score the model before and after and write the audit record (--no-evaluate: stop once registered)"
    ),
) -> None:
    """Validate the forget (and retain) file, unlearn it, register the new model version, evaluate it."""
    forget = _read_request_files(forget_file, retain_file, kind, profile, params)
    _check_against_profile(forget, profile, params)
    _check_method(method, forget)
    # Only now the heavy imports: Prefect, torch, transformers and MLflow come with the flow.
    from codeunlearn.data.records import DataError
    from codeunlearn.data.validation_report import ForgetSetValidationError
    from flows.request import unlearn

    try:
        result = unlearn(
            forget_file=forget_file,
            method=method,
            profile=profile,
            params_file=params,
            retain_file=retain_file,
            kind=str(forget.kind),
            evaluate=evaluate,
        )
    except (DataError, ForgetSetValidationError, FileNotFoundError, KeyError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from err
    shown = ("request_id", "unlearn", "metrics", "registered", "timing_s")
    typer.echo(json.dumps({k: result[k] for k in shown}, indent=2))


@app.command()
def audit(
    run_id: str = typer.Argument(
        ..., help="the request's MLflow run id (its flow run or its audit run), or the request id"
    ),
    profile: str = typer.Option(None, help="profile in params.yaml (default: its `profile` field)"),
    params: str = typer.Option(None, help="params file (default: the repository's params.yaml)"),
) -> None:
    """Re-hash every artifact a request's audit record names; exit 0 if the record still holds, 1 if not."""
    from codeunlearn.audit.verify import format_verification, verify_record
    from tasks.audit import find_record
    from tasks.context import make_context
    from tasks.tracking import TrackingUnavailableError

    ctx = make_context(profile, Path(params) if params else None)
    try:
        record, local_copy, source = find_record(ctx, run_id)
    except (LookupError, TrackingUnavailableError, FileNotFoundError, json.JSONDecodeError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from err
    result = verify_record(record, local_copy)
    typer.echo(f"source: {source}")
    typer.echo(format_verification(record, result))
    raise typer.Exit(code=0 if result.holds else 1)


if __name__ == "__main__":
    app()
