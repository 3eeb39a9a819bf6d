"""Unlearning methods: importing this package registers every method in METHODS."""

from codeunlearn.methods import codeunlearn as _codeunlearn  # noqa: F401  (registers itself)
from codeunlearn.methods.base import METHODS, UnlearningMethod, UnlearnResult, get_method, register_method

__all__ = ["METHODS", "UnlearningMethod", "UnlearnResult", "get_method", "register_method"]
