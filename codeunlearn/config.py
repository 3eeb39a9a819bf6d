"""params.yaml is the single place for knobs: a shared ``defaults`` block, deep-merged with one profile."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    pass


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read_params(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"{path}: params file not found")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    for key in ("profile", "defaults", "profiles"):
        if key not in params:
            raise ConfigError(f"{path}: missing top-level field {key!r}")
    return params


def resolve_profile(params: Mapping[str, Any], profile: str | None, source: Path) -> dict[str, Any]:
    """The effective settings of one profile: ``defaults`` overridden by ``profiles.<name>``."""
    name = profile or params["profile"]
    if name not in params["profiles"]:
        known = ", ".join(params["profiles"])
        raise ConfigError(f"{source}: field 'profiles' has no profile {name!r} (known: {known})")
    settings = deep_merge(params["defaults"], params["profiles"][name])
    settings["profile"] = name
    return settings


def load_settings(path: Path, profile: str | None = None, overrides: Mapping[str, Any] | None = None) -> dict:
    settings = resolve_profile(read_params(path), profile, path)
    return deep_merge(settings, overrides or {})


def settings_hash(settings: Mapping[str, Any]) -> str:
    """Stable identity of a configuration, recorded with every artifact it produced."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


RETAIN_SPLIT = Path("splits") / "retain.jsonl"  # under a profile's outputs: the pipeline's retain split


def profile_outputs(settings: Mapping[str, Any], root: Path) -> Path:
    """``<paths.outputs>/<profile>``, a relative ``paths.outputs`` taken from ``root`` (the repository)."""
    outputs = Path(settings["paths"]["outputs"])
    return (outputs if outputs.is_absolute() else (root / outputs).resolve()) / settings["profile"]
