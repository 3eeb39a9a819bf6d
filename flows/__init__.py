"""Prefect flows: they only chain tasks."""
