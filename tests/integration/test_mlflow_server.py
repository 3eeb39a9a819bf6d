"""MLflow in server mode: a team's tracking server instead of the embedded SQLite file.

Starts ``mlflow server`` on 127.0.0.1 (SQLite backend and artifact folder under tmp, one worker, no
job-execution processes), points MLFLOW_TRACKING_URI at it, logs a stage run through
``tasks.tracking`` (a CodeUnlearn mask artifact and metrics), reads it back over REST, and takes a
screenshot of the run page in headless Chromium. An unreachable server must fail fast and clearly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import write_params
from tests.helpers import free_port, running_server

pytestmark = pytest.mark.integration

MLFLOW = str(Path(sys.executable).with_name("mlflow"))
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
SERVER_START_TIMEOUT_S = 120
MIN_SCREENSHOT_BYTES = 40_000  # a blank 1280x900 page is ~6 KB; the rendered run page ~160 KB


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    command = [
        MLFLOW, "server",
        "--backend-store-uri", f"sqlite:///{tmp / 'db'}",
        "--artifacts-destination", str(tmp / "art"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    with running_server(command, tmp, env, f"{url}/health", SERVER_START_TIMEOUT_S):
        yield url, tmp


@pytest.fixture(scope="module")
def logged_run(mlflow_server):
    """A select_codes stage run with a mask artifact and metrics, logged through tasks.tracking."""
    from codeunlearn.methods.codeunlearn.mask import CodeMask, save_mask
    from tasks import tracking
    from tasks.context import make_context

    url, tmp = mlflow_server
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = url
    try:
        (tmp / "work").mkdir(exist_ok=True)
        ctx = make_context("smoke", write_params(tmp / "work"))
        assert tracking.tracking_uri(ctx) == url, "MLFLOW_TRACKING_URI overrides params.yaml's store"
        mask = CodeMask([7, 3, 11], [9.5, 4.25, 2.0], "c" * 64, 16, {"request_id": "server-test"})
        save_mask(mask, tmp / "mask")
        with tracking.stage_run(ctx, "select_codes") as run:
            tracking.log_artifacts(tmp / "mask", "mask")
            tracking.log_metrics({"select.disabled_codes": 3, "select.enriched_codes": 5.0})
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous
    return url, tmp, run.info.run_id, run.info.experiment_id, mask


def test_stage_run_reaches_the_server_and_reads_back_over_rest(logged_run):
    from mlflow import MlflowClient

    from codeunlearn.methods.codeunlearn.mask import load_mask

    url, tmp, run_id, experiment_id, mask = logged_run
    client = MlflowClient(tracking_uri=url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["codeunlearn.stage"] == "select_codes"
    assert run.data.tags["codeunlearn.profile"] == "smoke"
    assert run.data.metrics == {"select.disabled_codes": 3.0, "select.enriched_codes": 5.0}
    assert client.get_experiment(experiment_id).name == "codeunlearn"
    assert {a.path for a in client.list_artifacts(run_id, "mask")} == {"mask/mask.json", "mask/mask.safetensors"}
    local = Path(client.download_artifacts(run_id, "mask", str(tmp / "download")))
    reloaded = load_mask(local)
    assert reloaded.disabled_ids == mask.disabled_ids and reloaded.codebook_sha256 == mask.codebook_sha256

    # The plain REST API (what any other client or the UI uses), no MLflow client code involved.
    rest = get_json(f"{url}/api/2.0/mlflow/runs/get?run_id={run_id}")["run"]
    assert {m["key"]: m["value"] for m in rest["data"]["metrics"]}["select.disabled_codes"] == 3.0
    listed = get_json(f"{url}/api/2.0/mlflow/artifacts/list?run_id={run_id}&path=mask")
    assert {f["path"] for f in listed["files"]} == {"mask/mask.json", "mask/mask.safetensors"}


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium not installed (apt-get install -y --no-install-recommends chromium; .ci/run does it)",
)
def test_run_page_screenshot_in_headless_chromium(logged_run, tmp_path):
    url, _, run_id, experiment_id, _ = logged_run
    png = tmp_path / "run.png"
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium'}", f"--screenshot={png}", "--window-size=1280,900",
        "--virtual-time-budget=15000",  # let the single-page app fetch the run and render before the shot
        f"{url}/#/experiments/{experiment_id}/runs/{run_id}",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert png.exists(), f"no screenshot (exit {done.returncode}):\n{done.stderr[-2000:]}"
    size = png.stat().st_size
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert size > MIN_SCREENSHOT_BYTES, f"{png}: {size} bytes, the run page did not render"


def test_unreachable_tracking_server_fails_fast_with_a_clear_error(monkeypatch, tmp_path):
    from tasks import tracking
    from tasks.context import make_context

    closed = free_port()  # bound and released: nothing listens there
    uri = f"http://127.0.0.1:{closed}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    ctx = make_context("smoke", write_params(tmp_path))
    started = time.monotonic()
    with pytest.raises(tracking.TrackingUnavailableError) as error:
        tracking.configure(ctx)
    elapsed = time.monotonic() - started
    assert elapsed < 20, f"took {elapsed:.1f} s to give up"
    message = str(error.value)
    assert uri in message and "open the experiment" in message
