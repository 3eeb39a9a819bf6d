"""Resumable stages: a stage whose outputs were completed under the same settings and inputs is skipped.

Each finished stage writes a marker (atomically, after all its outputs) holding its fingerprint and
its result. A run killed mid-stage leaves no marker for that stage, so a restart redoes exactly the
unfinished work and reuses the rest.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from codeunlearn.config import settings_hash
from codeunlearn.io import read_json, write_json
from tasks.context import RunContext
from tasks.stages import STAGES

R = TypeVar("R")
SPLITS_SUMMARY = Path("splits") / "summary.json"

# Settings blocks and the first pipeline stage that reads each one. A stage's fingerprint covers every
# block except those first read by a later stage, so tuning the codebook never retrains the target and
# oracle, and tuning evaluation never retrains anything. Blocks read by no pipeline stage (baselines,
# comparison, bench, audit) affect no marker; every other block counts for every stage.
FIRST_READER = {
    "codebook": "train_codebook",
    "codebook_train": "train_codebook",
    "select": "select_codes",
    "evaluate": "evaluate",
    "methods": None,
    "compare": None,
    "bench": None,
    "audit": None,
}
# Switches that change how a run is shown or resumed, never what it computes.
NOT_RESULTS = ("progress", "resume")


def marker_path(ctx: RunContext, stage: str) -> Path:
    return ctx.out_dir / ".stages" / f"{stage}.json"


def stage_settings(settings: dict[str, Any], stage: str) -> dict[str, Any]:
    """The part of the settings that can change a stage's outputs (see ``FIRST_READER``)."""
    order = list(STAGES)
    position = order.index(stage) if stage in order else len(order)

    def read_by_now(block: str) -> bool:
        if block in NOT_RESULTS:
            return False
        if block not in FIRST_READER:
            return True
        reader = FIRST_READER[block]
        return reader is not None and order.index(reader) <= position

    return {block: value for block, value in settings.items() if read_by_now(block)}


def fingerprint(ctx: RunContext, stage: str) -> str:
    """Relevant settings, stage and data identity: a change to one of them redoes the stage."""
    digest = hashlib.sha256(f"{settings_hash(stage_settings(ctx.settings, stage))}:{stage}".encode())
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
            started = time.perf_counter()
            result = run(ctx)
            wall_s = time.perf_counter() - started
            write_json(
                marker_path(ctx, stage), {"fingerprint": fingerprint(ctx, stage), "result": result, "wall_s": wall_s}
            )
            return result

        return wrapper

    return decorate
