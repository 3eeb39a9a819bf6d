"""Prefect tasks: one module per pipeline stage. The only place that talks to MLflow.

Each stage is a Prefect task taking a ``RunContext``; ``python -m flows.stage <stage>`` runs
the same function without Prefect (``task.fn``), which is what ``dvc repro`` calls.
"""

import os

# Ephemeral mode starts a local API server whose first database migration outlasts Prefect's
# default 20 s timeout on a two-core machine; telemetry stays off unless a user turns it on.
for _name, _value in {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
}.items():
    os.environ.setdefault(_name, _value)
