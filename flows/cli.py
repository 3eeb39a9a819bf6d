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
    from codeunlearn.data import DataError
    from codeunlearn.validation import ForgetSetValidationError
    from flows.request import unlearn

    try:
        result = unlearn(forget_file=forget_file, method=method, profile=profile, params_file=params)
    except (DataError, ForgetSetValidationError, FileNotFoundError, KeyError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from err
    typer.echo(json.dumps({k: result[k] for k in ("request_id", "unlearn", "metrics", "registered")}, indent=2))


if __name__ == "__main__":
    app()
