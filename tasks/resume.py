"""Resumable stages: a stage whose outputs were completed under the same settings and inputs is skipped.

Each finished stage writes a marker (atomically, after all its outputs) holding its fingerprint and
its result. A run killed mid-stage leaves no marker for that stage, so a restart redoes exactly the
unfinished work and reuses the rest.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from codeunlearn.io import read_json, write_json
from tasks.context import RunContext

R = TypeVar("R")
SPLITS_SUMMARY = Path("splits") / "summary.json"


def marker_path(ctx: RunContext, stage: str) -> Path:
    return ctx.out_dir / ".stages" / f"{stage}.json"


def fingerprint(ctx: RunContext, stage: str) -> str:
    """Settings, stage and data identity: any change to one of them redoes the stage."""
    digest = hashlib.sha256(f"{ctx.params_hash}:{stage}".encode())
    summary = ctx.out_dir / SPLITS_SUMMARY
    if stage != "prepare_data" and summary.exists():
        digest.update(summary.read_bytes())
    return digest.hexdigest()


def completed_result(ctx: RunContext, stage: str) -> Any | None:
    marker = marker_path(ctx, stage)
    if not ctx.settings.get("resume", True) or not marker.exists():
        return None
    record = read_json(marker)
    return record["result"] if record.get("fingerprint") == fingerprint(ctx, stage) else None


def resumable(stage: str) -> Callable[[Callable[[RunContext], R]], Callable[[RunContext], R]]:
    def decorate(run: Callable[[RunContext], R]) -> Callable[[RunContext], R]:
        @functools.wraps(run)
        def wrapper(ctx: RunContext) -> R:
            cached = completed_result(ctx, stage)
            if cached is not None:
                return cached
            result = run(ctx)
            write_json(marker_path(ctx, stage), {"fingerprint": fingerprint(ctx, stage), "result": result})
            return result

        return wrapper

    return decorate
