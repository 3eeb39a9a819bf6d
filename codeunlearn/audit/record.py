"""Audit records of unlearning requests: what was forgotten, with which artifacts, and the evidence.

An audit record is a JSON-serialisable dict, built once at the end of a request and never rewritten:

* who and when: request id, UTC time, method, profile, params hash, git commit, ``dvc.lock`` hashes;
* what was forgotten: the forget file's path, its sha256, the records' sha256 and counts (never text);
* which models: the registered versions before and after the request, the mask and codebook sha256;
* the evidence: forget/retain ROUGE before and after, the re-quantization and relearning attacks,
  each checked against pass/fail thresholds from params.yaml (``audit.judge``);
* every artifact the record relies on (masks, codebook, model weights, the forget file), by sha256,
  which ``audit.verify`` re-hashes later.

Pure: hashing, JSON and arithmetic (and the write-once file). No MLflow, no Prefect, no torch.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from codeunlearn.audit.judge import NEIGHBOUR_PASSAGE_KEY, Thresholds, judge, judged_values
from codeunlearn.data.records import records_sha256
from codeunlearn.io import atomic_write_bytes, sha256_file

SCHEMA = "codeunlearn.audit/1"
AUDIT_FILE = "audit.json"  # a request's record, in its folder
NEIGHBOUR_KEYS = ("neighbour_rouge", "neighbour_prob", NEIGHBOUR_PASSAGE_KEY)  # a neighbour set's scores


# --------------------------------------------------------------------------- hashing


def json_safe(value: Any) -> Any:
    """Plain JSON: tuples become lists, paths strings, NaN and infinities ``None`` (JSON has none of them)."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, bool) or value is None or isinstance(value, int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item"):  # numpy / torch scalars
        return json_safe(value.item())
    raise TypeError(f"audit record: {type(value).__name__} is not JSON-serialisable: {value!r}")


def canonical_json(payload: Any) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def record_sha256(record: Mapping[str, Any]) -> str:
    """sha256 of the record's canonical JSON, without its own ``record_sha256`` field."""
    return hashlib.sha256(canonical_json({k: v for k, v in record.items() if k != "record_sha256"})).hexdigest()


def artifact_entry(name: str, path: str | Path, required: bool = True) -> dict[str, Any]:
    """One file the record relies on: name, absolute path, sha256 and size."""
    resolved = Path(path).resolve()
    if not resolved.is_file():
        raise FileNotFoundError(f"audit artifact {name!r}: {resolved} is not a file")
    return {
        "name": name,
        "path": str(resolved),
        "sha256": sha256_file(resolved),
        "bytes": resolved.stat().st_size,
        "required": required,
    }


def directory_artifacts(prefix: str, directory: str | Path, patterns: Sequence[str] = ("*",)) -> list[dict[str, Any]]:
    """Every file of ``directory`` matching ``patterns`` (sorted, not recursive), named ``prefix/<file>``."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"audit artifacts {prefix!r}: {root} is not a directory")
    files = sorted(
        {p for pattern in patterns for p in root.glob(pattern) if p.is_file() and not p.name.startswith(".")}
    )
    return [artifact_entry(f"{prefix}/{p.name}", p) for p in files]


def dvc_lock_summary(path: str | Path) -> dict[str, Any] | None:
    """sha256 of ``dvc.lock`` and the md5 DVC recorded for every stage output; ``None`` without a lock file."""
    lock = Path(path)
    if not lock.is_file():
        return None
    parsed = yaml.safe_load(lock.read_text()) or {}
    outs: dict[str, str] = {}
    for stage, body in (parsed.get("stages") or {}).items():
        for out in (body or {}).get("outs") or []:
            md5 = out.get("md5") or out.get("hash")
            if md5 and md5 != "md5":
                outs[f"{stage}:{out['path']}"] = md5
    return {"path": str(lock.resolve()), "sha256": sha256_file(lock), "outs": outs}


# --------------------------------------------------------------------------- the record


class AuditRecordExistsError(FileExistsError):
    pass


def write_once(path: Path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` as JSON at ``path`` unless something is there already (then raise).

    Atomic and exclusive: a temporary file is hard-linked into place, which fails if ``path`` exists,
    so neither a crash nor a race leaves a half-written or replaced record. The file is read-only.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        raise AuditRecordExistsError(f"{path}: audit records are write-once and this one exists; not overwritten")
    data = (json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()
    try:
        atomic_write_bytes(path, data, exclusive=True, read_only=True)
    except FileExistsError as err:
        raise AuditRecordExistsError(
            f"{path}: audit records are write-once and this one exists; not overwritten"
        ) from err


def forget_summary(forget_file: str | Path, records: Sequence[Any]) -> dict[str, Any]:
    """The forget set as a record names it: the file, its hashes and counts (never text)."""
    path = Path(forget_file).resolve()
    return {
        "file": str(path),
        "file_sha256": sha256_file(path),
        "records_sha256": records_sha256(records),
        "count": len(records),
        "subjects": len({r.subject for r in records if getattr(r, "subject", "")}),
    }


def neighbour_summary(
    retain_file: str | Path, control: Sequence[Any], held_out: Sequence[Any], metrics: Mapping[str, Any]
) -> dict[str, Any]:
    """The neighbour set as a record names it (hashes and counts of its control and held-out parts, never
    text) with the held-out part's scores before and after the request: ROUGE and probability of QA
    neighbours, VerbMem of passage neighbours (each key present where measured)."""
    path = Path(retain_file).resolve()
    summary: dict[str, Any] = {
        "file": str(path),
        "file_sha256": sha256_file(path),
        "control_sha256": records_sha256(control),
        "control_count": len(control),
        "held_out_sha256": records_sha256(held_out),
        "held_out_count": len(held_out),
    }
    for key in NEIGHBOUR_KEYS:
        if any(key in (metrics.get(when) or {}) for when in ("before", "after")):
            for when in ("before", "after"):
                summary[f"{key}_{when}"] = (metrics.get(when) or {}).get(key)
    return summary


def split_version(version: str | None) -> tuple[str, str] | None:
    """A registered version ``name/number`` as (name, number); ``None`` when there is none."""
    if not version or "/" not in version:
        return None
    name, number = version.rsplit("/", 1)
    return name, number


def build_record(
    *,
    request_id: str,
    created_at: str,
    method: str,
    profile: str,
    params_hash: str,
    git_commit: str,
    forget: Mapping[str, Any],
    models: Mapping[str, Any],
    metrics: Mapping[str, Any],
    thresholds: Thresholds,
    artifacts: Sequence[Mapping[str, Any]],
    mask: Mapping[str, Any] | None = None,
    dvc: Mapping[str, Any] | None = None,
    skipped: Mapping[str, str] | None = None,
    record_path: str | Path | None = None,
    neighbour: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The audit record of one request, sealed with its own ``record_sha256``.

    ``forget`` holds hashes and counts only (``file``, ``file_sha256``, ``records_sha256``, ``count``,
    ``subjects``); raw text has no field to go in. Artifact names must be unique. ``neighbour``
    (``neighbour_summary``), given only when the request had a neighbour file, joins the record as is.
    """
    names = [a["name"] for a in artifacts]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"audit record: artifact names must be unique, repeated: {duplicates}")
    record = json_safe(
        {
            "schema": SCHEMA,
            "request_id": request_id,
            "created_at": created_at,
            "method": method,
            "profile": profile,
            "params_hash": params_hash,
            "git_commit": git_commit,
            "dvc": dvc,
            "forget": forget,
            "models": models,
            "mask": mask,
            "metrics": metrics,
            "thresholds": asdict(thresholds),
            "verdict": judge(judged_values(metrics), thresholds, skipped),
            "artifacts": list(artifacts),
            "record_path": str(record_path) if record_path else None,
            **({"neighbour": neighbour} if neighbour is not None else {}),
        }
    )
    record["record_sha256"] = record_sha256(record)
    return record
