"""One interface for every unlearning method, and the registry that names them.

A method takes a model, its tokenizer, the forget and retain QA records and its own params block
from params.yaml, and returns the unlearned model plus a flat dict of statistics. Adding a method
is one new file with a subclass and one ``@register_method`` line, as in locuslab/open-unlearning.
"""

from __future__ import annotations

import copy
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


class MethodParams:
    """Read-only view of a method's params block; a missing key names the method and the key."""

    def __init__(self, method: str, params: Mapping[str, Any]):
        self.method = method
        self._params = params

    def __getitem__(self, key: str) -> Any:
        if key not in self._params:
            raise KeyError(
                f"unlearning method {self.method!r}: params has no {key!r} "
                f"(set it under methods.{self.method} in params.yaml)"
            )
        return self._params[key]

    def __contains__(self, key: str) -> bool:
        return key in self._params

    def require(self, keys: Sequence[str]) -> None:
        """Fail before any work when a key is missing, not halfway through a run."""
        for key in keys:
            self[key]

    def int(self, key: str) -> int:
        return int(self[key])

    def float(self, key: str) -> float:
        return float(self[key])

    def bool(self, key: str) -> bool:
        value = self[key]
        if not isinstance(value, bool):
            raise ValueError(f"unlearning method {self.method!r}: params {key!r} must be true or false, got {value!r}")
        return value

    def str(self, key: str) -> str:
        return str(self[key])

    def choice(self, key: str, options: Sequence[str]) -> str:
        value = self.str(key)
        if value not in options:
            raise ValueError(
                f"unlearning method {self.method!r}: params {key!r} = {value!r}; expected one of {', '.join(options)}"
            )
        return value

    def int_list(self, key: str) -> list[int]:
        value = self[key]
        return [int(v) for v in (value if isinstance(value, list | tuple) else [value])]

    def in_place(self) -> bool:
        # The one optional key: base.UnlearningMethod defines "not in place" as the contract.
        return bool(self._params.get("in_place", False))


def working_copy(model: nn.Module, params: MethodParams) -> nn.Module:
    """The model the method may edit: a deep copy unless the caller opted into ``in_place``."""
    return model if params.in_place() else copy.deepcopy(model)
