"""codeunlearn: make a causal language model forget a named piece of knowledge, and prove it.

The library is pure: torch modules and plain functions. Orchestration (Prefect) and tracking
(MLflow) live in ``tasks/`` and ``flows/``.
"""

__version__ = "0.1.0"
