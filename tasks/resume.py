"""Resumable stages: a stage whose outputs were completed under the same settings, inputs and code is skipped.

Each finished stage writes a marker (atomically, after all its outputs) holding its fingerprint and
its result. A run killed mid-stage leaves no marker for that stage, so a restart redoes exactly the
unfinished work and reuses the rest. The fingerprint covers the source of the stage's task module and
of every project module it imports (``codeunlearn.codehash``), and that of every stage it reads from, so
changed code redoes its stage and every later one; ``python -m tasks.resume --dvc-deps`` writes the
same files into dvc.yaml's deps.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from codeunlearn.codehash import REPO_ROOT, files_hash, module_closure
from codeunlearn.config import settings_hash
from codeunlearn.io import read_json, write_json
from tasks.context import RunContext
from tasks.stages import STAGE_MODULES, STAGES, upstream

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
    "request": None,  # a request's neighbour split: requests only
    "forget_set": None,  # a request's files (size limit, how passages are scored): requests only
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


def stage_code_files(stage: str) -> tuple[Path, ...]:
    """The project source files ``stage`` runs: its task module and what that imports, transitively."""
    return module_closure(STAGE_MODULES[stage])


def code_hash(stage: str) -> str:
    """The source of ``stage`` and of every stage it reads from: changed code there redoes ``stage``."""
    files = sorted({path for name in (*upstream(stage), stage) for path in stage_code_files(name)})
    return files_hash(tuple(files))


def fingerprint(ctx: RunContext, stage: str) -> str:
    """Relevant settings, stage, code and data identity: a change to one of them redoes the stage."""
    identity = f"{settings_hash(stage_settings(ctx.settings, stage))}:{stage}:{code_hash(stage)}"
    digest = hashlib.sha256(identity.encode())
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


# ------------------------------------------------------------------------------- dvc.yaml's code deps

CODE_DEP = re.compile(r"^\s+- (codeunlearn|tasks)/\S*$")


def dvc_code_deps(stage: str) -> list[str]:
    return [path.relative_to(REPO_ROOT).as_posix() for path in stage_code_files(stage)]


def with_code_deps(dvc_text: str) -> str:
    """dvc.yaml with each stage's project-code deps replaced by ``dvc_code_deps`` (comments and every other
    line kept as they are): the files DVC watches are the files the flow's fingerprints hash."""
    lines: list[str] = []
    stage = None
    for line in dvc_text.splitlines():
        header = re.match(r"^  (\w+):\s*$", line)
        if header:
            stage = header.group(1)
        if CODE_DEP.match(line):
            continue
        lines.append(line)
        if stage in STAGES and line.strip() == "deps:":
            indent = line[: len(line) - len(line.lstrip())] + "  "
            lines.extend(f"{indent}- {path}" for path in dvc_code_deps(stage))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tasks.resume", description="Stage fingerprints.")
    parser.add_argument("--dvc-deps", action="store_true", help="rewrite dvc.yaml's code deps from the imports")
    args = parser.parse_args(argv)
    if args.dvc_deps:
        dvc = REPO_ROOT / "dvc.yaml"
        dvc.write_text(with_code_deps(dvc.read_text()))
        print(f"wrote {dvc}")


if __name__ == "__main__":
    main()
