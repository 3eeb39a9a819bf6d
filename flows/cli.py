"""The `codeunlearn` command: run the pipeline, or make the model forget a file of QAs."""

from __future__ import annotations

import json

import typer

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


@app.command()
def forget(
    forget_file: str = typer.Option(..., "--forget-file", help="QAs to forget: TOFU .json or generic .jsonl"),
    method: str = typer.Option("codeunlearn", help="unlearning method (see codeunlearn.methods.METHODS)"),
    profile: str = typer.Option(None, help="profile in params.yaml (default: its `profile` field)"),
    params: str = typer.Option(None, help="params file (default: the repository's params.yaml)"),
) -> None:
    """Validate the forget file, unlearn it, evaluate, and register the new model version."""
    from codeunlearn.data.records import DataError
    from codeunlearn.data.validation_report import ForgetSetValidationError
    from flows.request import unlearn

    try:
        result = unlearn(forget_file=forget_file, method=method, profile=profile, params_file=params)
    except (DataError, ForgetSetValidationError, FileNotFoundError, KeyError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from err
    typer.echo(json.dumps({k: result[k] for k in ("request_id", "unlearn", "metrics", "registered")}, indent=2))


@app.command()
def audit(
    run_id: str = typer.Argument(
        ..., help="the request's MLflow run id (its flow run or its audit run), or the request id"
    ),
    profile: str = typer.Option(None, help="profile in params.yaml (default: its `profile` field)"),
    params: str = typer.Option(None, help="params file (default: the repository's params.yaml)"),
) -> None:
    """Re-hash every artifact a request's audit record names; exit 0 if the record still holds, 1 if not."""
    from pathlib import Path

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
