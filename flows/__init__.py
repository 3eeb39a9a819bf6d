"""Prefect flows: they only chain tasks."""

import tasks  # noqa: F401  (sets the environment defaults before Prefect reads its settings)
