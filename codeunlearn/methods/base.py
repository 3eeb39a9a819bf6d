"""One interface for every unlearning method, and the registry that names them.

A method takes a model, its tokenizer, the forget and retain QA records and its own params block
from params.yaml, and returns the unlearned model plus a flat dict of statistics. Adding a method
is one new file with a subclass and one ``@register_method`` line, as in locuslab/open-unlearning.

A method also owns its deployment, so the pipeline, requests, the comparison and the audits run every
method alike and never branch on its name (``docs/architecture.md``): which pipeline model it starts
from (``base_role``, trained by ``base_stage``), where its params live (``params``), how its result is
saved (``save``, under ``saved_as``) and served (``deploy``), and whether requests add up on one
deployed state (``cumulative``: CodeUnlearn's active mask) or each start from the base model again.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from codeunlearn.data.records import DataError
from codeunlearn.models.load import Checkpoint, load_model_dir, save_model

MODEL_FILES = ("*.safetensors", "*.json")  # what a saved model directory's audit entries hash


@dataclass
class UnlearnResult:
    model: nn.Module
    stats: dict[str, float | int | str] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)  # method-specific outputs to persist (e.g. a mask)


@dataclass(frozen=True)
class UnlearnJob:
    """One call's inputs: the model to unlearn from, its tokenizer, the records and the method's params."""

    model: nn.Module
    tokenizer: Any
    forget: Sequence[Any]
    retain: Sequence[Any]
    params: MethodParams


class UnlearningMethod(ABC):
    """Subclasses set ``name`` and implement ``run``; they must not mutate the caller's model unless
    ``params`` says ``in_place: true`` (callers compare before and after). The defaults below deploy an
    edited model: saved as a model directory, served as it is, every request starting from the target."""

    name: str = ""
    base_role: str = "target"  # the pipeline model the method starts from and is deployed onto
    base_stage: str = "finetune_target"  # the stage that trains it (a comparison's starting identity)
    params_block: str | None = None  # params.yaml block of the method's params; None: methods.<name>
    saved_as: str = "model"  # the folder ``save`` writes the result to
    cumulative: bool = False  # requests add up on one deployed state instead of each starting afresh
    # Record kinds a request may hold (``data.forget_files.RecordKind``): a multiple-choice question is
    # unlearned as the QA of its right option, a passage as windows of its text, both by ``encode_qas``.
    record_kinds: tuple[str, ...] = ("qa", "choice", "passage")

    def unlearn(
        self,
        model: nn.Module,
        tokenizer: Any,
        forget: Sequence[Any],
        retain: Sequence[Any],
        params: Mapping[str, Any],
    ) -> UnlearnResult:
        where = ".".join(self.params_path())
        return self.run(UnlearnJob(model, tokenizer, forget, retain, MethodParams(self.name, params, where)))

    @abstractmethod
    def run(self, job: UnlearnJob) -> UnlearnResult: ...

    def check_record_kind(self, kind: str, source: str) -> None:
        """Refuse, naming the file, a request of a record kind this method cannot unlearn."""
        if kind not in self.record_kinds:
            able = sorted(name for name, method in METHODS.items() if kind in method.record_kinds)
            raise DataError(
                Path(source),
                f"a {kind} request, but {self.name} unlearns {', '.join(self.record_kinds)} records only "
                f"(methods that take {kind} records: {', '.join(able)})",
            )

    # -- deployment ---------------------------------------------------------------------------------

    def params_path(self) -> tuple[str, ...]:
        """Where the method's params block sits in the settings (``methods.<name>`` unless ``params_block``)."""
        return (self.params_block,) if self.params_block else ("methods", self.name)

    def params_override(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """A settings override that sets ``values`` in the method's params block (a tuning grid's point)."""
        override: dict[str, Any] = dict(values)
        for key in reversed(self.params_path()):
            override = {key: override}
        return override

    def params(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        """The method's params block in the run's settings."""
        block = settings[self.params_block] if self.params_block else settings["methods"].get(self.name)
        if block is None:
            raise KeyError(f"params.yaml: no block 'methods.{self.name}'")
        return block

    def blocks_needed(self, base_dir: Path) -> int | None:
        """How many leading decoder blocks of the base model (saved in ``base_dir``) ``run`` reads; a request
        loads only those. None: the whole model (every method that edits or trains weights)."""
        return None

    def save(self, result: UnlearnResult, tokenizer: Any, out: Path, deployed: Path | None = None) -> dict[str, Any]:
        """Write the result to ``out / saved_as``; a request passes its ``deployed_state``, which a cumulative
        method folds the result into. Returns what to report about the deployed state."""
        save_model(result.model, tokenizer, out / self.saved_as, overwrite=True)
        return {}

    def deploy(self, load_base: Callable[[], Checkpoint], saved: Path, device: str | torch.device) -> Checkpoint:
        """The model as served from a saved result or deployed state (``saved``); ``load_base`` loads the
        ``base_role`` model for methods that deploy onto it."""
        return load_model_dir(saved, device)

    def deployed_state(self, requests: Path, request: Path) -> Path:
        """Where the model a request leaves deployed is kept: its own result, or (cumulative) the state
        every request adds to, under the requests folder."""
        return request / self.saved_as

    def resume(self, base: Checkpoint, deployed: Path) -> None:
        """Before a request unlearns: put the deployed state on ``base`` (cumulative methods only)."""
        return None

    def before(self, load_base: Callable[[], Checkpoint], deployed: Path, request: Path) -> Checkpoint:
        """The model as deployed before ``request``: the base model, unless requests add up."""
        return load_base()

    def state_sha256(self, deployed: Path) -> str | None:
        """A cumulative method's deployed state, hashed (the request's tag and the audit check it)."""
        return None

    def state_changed(self, snapshot: Path, summary: Mapping[str, Any]) -> bool:
        """Whether a cumulative deployed state (as ``snapshot``) differs from what the request's ``save``
        reported: another request ran in between."""
        return False

    def version_tags(self, base_dir: Path, deployed: Path, summary: Mapping[str, Any]) -> dict[str, str]:
        """Tags of the registered model version beyond the request's own."""
        return {}

    def audit_facts(self, base_dir: Path, request: Path, snapshot: Path) -> dict[str, Any] | None:
        """What the audit record says about the deployed state (``snapshot``: a copy of it, as audited)."""
        return None

    def audit_files(self, base_dir: Path, request: Path, snapshot: Path) -> list[tuple[str, Path, Sequence[str]]]:
        """The folders an audit record hashes: (name, folder, file patterns)."""
        return [("unlearned_model", request / self.saved_as, MODEL_FILES)]

    def integrity_checks(self, base_dir: Path, deployed: Path, tags: Mapping[str, str]) -> list[dict[str, Any]]:
        """Re-verification: is the deployed state the registered one (beyond the audit record's hashes)?"""
        return []


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

    def __init__(self, method: str, params: Mapping[str, Any], where: str | None = None):
        self.method = method
        self._params = params
        self.where = where or f"methods.{method}"

    def __getitem__(self, key: str) -> Any:
        if key not in self._params:
            raise KeyError(
                f"unlearning method {self.method!r}: params has no {key!r} (set it under {self.where} in params.yaml)"
            )
        return self._params[key]

    def __contains__(self, key: str) -> bool:
        return key in self._params

    def get(self, key: str, default: Any = None) -> Any:
        return self._params.get(key, default)

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
