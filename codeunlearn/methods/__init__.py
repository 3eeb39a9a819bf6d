"""Unlearning methods: importing this package registers every method in METHODS."""

from codeunlearn.methods import ga as _ga  # noqa: F401  (each module registers itself)
from codeunlearn.methods import graddiff as _graddiff  # noqa: F401
from codeunlearn.methods import grin as _grin  # noqa: F401
from codeunlearn.methods import npo as _npo  # noqa: F401
from codeunlearn.methods import rmu as _rmu  # noqa: F401
from codeunlearn.methods.base import METHODS, UnlearningMethod, UnlearnResult, get_method, register_method
from codeunlearn.methods.codeunlearn import method as _codeunlearn  # noqa: F401
from codeunlearn.methods.zerounlearn import method as _zerounlearn  # noqa: F401

__all__ = ["METHODS", "UnlearningMethod", "UnlearnResult", "get_method", "register_method"]
