"""Prefect tasks: one module per pipeline stage. The only place that talks to MLflow.

Each stage is a plain function ``run(ctx) -> dict`` wrapped as a Prefect task; ``python -m tasks
<stage>`` runs the same function without Prefect, which is what ``dvc repro`` calls.
"""
