"""prefect.yaml end to end: a local Prefect server, the deployments it defines, two runs through a worker.

The server runs on 127.0.0.1 with its own PREFECT_HOME (its own SQLite) under tmp; the scheduler
service is off, so the nightly cron of ``reverify`` is registered but creates no run here. On the
tiny setup of ``tests/helpers.py`` (synthetic QAs, a tiny codebook model, SQLite MLflow under
tmp) the ``request`` deployment runs an unlearning request, then the ``reverify`` deployment
re-verifies the model version that request registered. Each run goes through
``prefect worker start --run-once`` (a process worker executing this checkout).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.helpers import build_tiny_setup, free_port, running_server

pytestmark = pytest.mark.integration

PREFECT = str(Path(sys.executable).with_name("prefect"))
POOL = "codeunlearn"
SERVER_START_TIMEOUT_S = 150
CLI_TIMEOUT_S = 120
RUN_TIMEOUT_S = 240


def api(url: str, path: str, payload: dict | None = None, method: str | None = None) -> dict | list:
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(
        f"{url}{path}",
        data=data,
        method=method or ("POST" if data is not None else "GET"),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"null")


def run_cli(args: list[str], env: dict, timeout: int = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
    done = subprocess.run([PREFECT, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """``prefect server start --host 127.0.0.1`` with a private home; stopped (whole process group) after."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",  # no cron runs created behind the test's back
        "PREFECT_CLI_PROMPT": "false",
        "DO_NOT_TRACK": "1",
    }
    env.pop("MLFLOW_TRACKING_URI", None)  # the runs take their store from the params file
    command = [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with running_server(command, home, env, f"{api_url}/health", SERVER_START_TIMEOUT_S):
        yield api_url, env


def run_deployment(api_url: str, env: dict, deployment_id: str, parameters: dict) -> dict:
    """Create a flow run of the deployment, let one worker poll execute it, return the finished run."""
    flow_run = api(api_url, f"/deployments/{deployment_id}/create_flow_run", {"parameters": parameters})
    run_cli(["worker", "start", "--pool", POOL, "--run-once", "--limit", "1"], env, timeout=RUN_TIMEOUT_S)
    deadline = time.monotonic() + 30
    while True:
        finished = api(api_url, f"/flow_runs/{flow_run['id']}")
        if finished["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") or time.monotonic() > deadline:
            return finished
        time.sleep(1)


def test_prefect_yaml_deploys_and_its_deployments_run(prefect_server, tmp_path):
    api_url, env = prefect_server
    params_file, forget_file = build_tiny_setup(tmp_path)

    run_cli(["work-pool", "create", POOL, "--type", "process"], env)
    run_cli(["--no-prompt", "deploy", "--all"], env)

    deployments = {d["name"]: d for d in api(api_url, "/deployments/filter", {})}
    assert set(deployments) == {"pipeline", "studies", "request", "reverify"}
    assert deployments["pipeline"]["entrypoint"] == "flows/pipeline.py:pipeline"
    assert deployments["studies"]["entrypoint"] == "flows/studies.py:studies"
    assert deployments["request"]["entrypoint"] == "flows/request.py:unlearn"
    assert deployments["request"]["parameters"]["method"] == "codeunlearn"
    assert deployments["request"]["global_concurrency_limit"]["limit"] == 1
    reverify = deployments["reverify"]
    assert reverify["entrypoint"] == "flows/reverify.py:reverify"
    [schedule] = reverify["schedules"]
    assert schedule["active"] and schedule["schedule"]["cron"] == "0 3 * * *"
    for deployment in deployments.values():
        assert deployment["work_pool_name"] == POOL
        [pull] = deployment["pull_steps"]
        assert pull["prefect.deployments.steps.set_working_directory"]["directory"] == str(REPO_ROOT)

    request = run_deployment(
        api_url,
        env,
        deployments["request"]["id"],
        {"forget_file": str(forget_file), "params_file": str(params_file)},
    )
    assert request["state"]["type"] == "COMPLETED", request["state"]
    [record_path] = (tmp_path / "outputs" / "smoke" / "requests").glob("*/audit.json")
    record = json.loads(record_path.read_text())
    assert record["verdict"]["passed"] and record["models"]["after"].endswith("-unlearned-codeunlearn/1")

    checked = run_deployment(api_url, env, reverify["id"], {"params_file": str(params_file)})
    assert checked["state"]["type"] == "COMPLETED", checked["state"]
    [result_path] = record_path.parent.glob("reverify/*.json")
    result = json.loads(result_path.read_text())
    assert result["verdict"]["passed"], result["verdict"]
    assert result["model_version"] == record["models"]["after"]
    assert result["audit_record_sha256"] == record["record_sha256"]
    assert re.fullmatch(r"[0-9a-f]{64}", result["record_sha256"])
