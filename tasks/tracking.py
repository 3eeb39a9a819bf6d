"""MLflow bookkeeping: one parent run per flow run, one child run per stage, models in the registry.

The embedded default is a SQLite database and a local artifact folder; MLFLOW_TRACKING_URI points a
team at its server instead. Nothing here ever logs the forget set's raw text.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tasks.context import RunContext

T = TypeVar("T")
RETRIES = 3
RETRY_BASE_DELAY_S = 1.0


class TrackingUnavailableError(RuntimeError):
    pass


def with_retries(call: Callable[[], T], what: str) -> T:
    """Transient tracking-server errors are retried with backoff; the last one becomes a clear error."""
    for attempt in range(RETRIES):
        try:
            return call()
        except (MlflowException, OSError, ConnectionError) as err:
            if attempt == RETRIES - 1:
                uri = mlflow.get_tracking_uri()
                raise TrackingUnavailableError(
                    f"MLflow at {uri} failed to {what} after {RETRIES} tries: {err}"
                ) from err
            time.sleep(RETRY_BASE_DELAY_S * 2**attempt)
    raise AssertionError("unreachable")


def tracking_uri(ctx: RunContext) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or ctx.settings["tracking"]["uri"]
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(ctx.resolve(uri.removeprefix("sqlite:///")))
    return uri


@functools.cache
def _experiment_id(uri: str, name: str, artifact_root: str) -> str:
    mlflow.set_tracking_uri(uri)
    existing = mlflow.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    if uri.startswith(("http://", "https://")):
        # A tracking server stores artifacts where it was told to (--artifacts-destination), not on our disk.
        return mlflow.create_experiment(name)
    return mlflow.create_experiment(name, artifact_location=Path(artifact_root).as_uri())


def configure(ctx: RunContext) -> str:
    uri = tracking_uri(ctx)
    mlflow.set_tracking_uri(uri)
    tracking = ctx.settings["tracking"]
    artifact_root = str(ctx.resolve(tracking["artifact_root"]))
    experiment_id = with_retries(
        lambda: _experiment_id(uri, tracking["experiment"], artifact_root), "open the experiment"
    )
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def base_tags(ctx: RunContext) -> dict[str, str]:
    return {
        "codeunlearn.profile": ctx.profile,
        "codeunlearn.params_hash": ctx.params_hash,
        "codeunlearn.git_commit": ctx.git_commit,
        **ctx.extra_tags,
    }


@contextlib.contextmanager
def flow_run(ctx: RunContext, name: str) -> Iterator[RunContext]:
    """The parent run of a flow; stages started inside it become its children."""
    configure(ctx)
    run = with_retries(lambda: mlflow.start_run(run_name=name, tags=base_tags(ctx)), "start a run")
    try:
        log_flat_params(flatten(ctx.settings))
        yield ctx.with_parent(run.info.run_id)
        mlflow.end_run("FINISHED")
    except BaseException:
        mlflow.end_run("FAILED")
        raise


@contextlib.contextmanager
def stage_run(ctx: RunContext, stage: str) -> Iterator[mlflow.ActiveRun]:
    """A child run of the flow's parent run, or a standalone run when a stage runs on its own (DVC)."""
    configure(ctx)
    tags = {**base_tags(ctx), "codeunlearn.stage": stage}
    if ctx.parent_run_id:
        tags["mlflow.parentRunId"] = ctx.parent_run_id
    # Prefect may run a task in another thread, where the flow's run is not the active one: the parent
    # is named by tag, and the child is nested only when this thread already has an active run.
    nested = mlflow.active_run() is not None
    run = with_retries(lambda: mlflow.start_run(run_name=stage, tags=tags, nested=nested), "start a run")
    try:
        yield run
        mlflow.end_run("FINISHED")
    except BaseException:
        mlflow.end_run("FAILED")
        raise


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def log_flat_params(params: Mapping[str, Any]) -> None:
    items = {k: (str(v)[:500] if v is not None else "null") for k, v in params.items()}
    keys = sorted(items)
    for start in range(0, len(keys), 100):
        chunk = {k: items[k] for k in keys[start : start + 100]}
        with_retries(lambda chunk=chunk: mlflow.log_params(chunk), "log params")


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    if numeric:
        with_retries(lambda: mlflow.log_metrics(numeric, step=step), "log metrics")


def log_history(history: list[Mapping[str, float]], prefix: str) -> None:
    for row in history:
        step = int(row["step"])
        log_metrics({f"{prefix}.{k}": v for k, v in row.items() if k != "step"}, step=step)


def log_artifacts(path: Path, artifact_path: str | None = None) -> None:
    if path.is_dir():
        with_retries(lambda: mlflow.log_artifacts(str(path), artifact_path), "log artifacts")
    else:
        with_retries(lambda: mlflow.log_artifact(str(path), artifact_path), "log an artifact")


def log_json(payload: Any, artifact_file: str) -> None:
    with_retries(lambda: mlflow.log_dict(payload, artifact_file), "log a JSON artifact")


def log_text(text: str, artifact_file: str) -> None:
    with_retries(lambda: mlflow.log_text(text, artifact_file), "log a text artifact")


def register_model_dir(ctx: RunContext, model_dir: Path, name: str, tags: Mapping[str, str]) -> str | None:
    """Log a saved model directory (safetensors) to the active run and register it as a new version."""
    if not ctx.settings["tracking"]["register_models"]:
        return None
    run = mlflow.active_run()
    log_artifacts(model_dir, "model")
    client = MlflowClient()
    registered = f"codeunlearn-{ctx.profile}-{name}"
    with contextlib.suppress(MlflowException):
        client.create_registered_model(registered)
    source = f"{run.info.artifact_uri}/model"
    all_tags = {**base_tags(ctx), **tags}
    version = with_retries(
        lambda: client.create_model_version(registered, source, run_id=run.info.run_id, tags=all_tags),
        "register a model version",
    )
    return f"{registered}/{version.version}"
