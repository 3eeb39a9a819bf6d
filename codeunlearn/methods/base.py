"""One interface for every unlearning method, and the registry that names them.

A method takes a model, its tokenizer, the forget and retain QA records and its own params block
from params.yaml, and returns the unlearned model plus a flat dict of statistics. Adding a method
is one new file with a subclass and one ``@register_method`` line, as in locuslab/open-unlearning.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass
class UnlearnResult:
    model: nn.Module
    stats: dict[str, float | int | str] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)  # method-specific outputs to persist (e.g. a mask)


class UnlearningMethod(ABC):
    """Subclasses set ``name`` and implement ``unlearn``; they must not mutate the caller's model
    unless ``params`` says ``in_place: true`` (callers compare before and after)."""

    name: str = ""

    @abstractmethod
    def unlearn(
        self,
        model: nn.Module,
        tokenizer: Any,
        forget: Sequence[Any],
        retain: Sequence[Any],
        params: Mapping[str, Any],
    ) -> UnlearnResult: ...


METHODS: dict[str, type[UnlearningMethod]] = {}


def register_method(cls: type[UnlearningMethod]) -> type[UnlearningMethod]:
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} registered twice")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> UnlearningMethod:
    if name not in METHODS:
        known = ", ".join(sorted(METHODS)) or "none"
        raise KeyError(f"unknown unlearning method {name!r}; known methods: {known}")
    return METHODS[name]()
