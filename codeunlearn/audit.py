"""Audit records of unlearning requests: what was forgotten, with which artifacts, and whether it held.

An audit record is a JSON-serialisable dict, built once at the end of a request and never rewritten:

* who and when: request id, UTC time, method, profile, params hash, git commit, ``dvc.lock`` hashes;
* what was forgotten: the forget file's path, its sha256, the records' sha256 and counts (never text);
* which models: the registered versions before and after the request, the mask and codebook sha256;
* the evidence: forget/retain ROUGE before and after, the re-quantization and relearning attacks,
  each checked against pass/fail thresholds from params.yaml (``audit:``);
* every artifact the record relies on (masks, codebook, model weights, the forget file), by sha256.

``verify_record`` re-hashes those artifacts later: the record "holds" when it is unchanged (its own
``record_sha256``) and every artifact it names still has the recorded hash. The forget file may have
been deleted since (erasure): that is reported, not failed; a forget file that *changed* fails.

Pure: hashing, JSON and arithmetic only. No MLflow, no Prefect, no torch.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from codeunlearn.io import sha256_file

SCHEMA = "codeunlearn.audit/1"


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


# --------------------------------------------------------------------------- pass / fail


@dataclass(frozen=True)
class Thresholds:
    """Pass/fail bounds (``audit:`` in params.yaml); ``None`` turns a check off."""

    max_forget_rouge: float | None = 0.5  # forget ROUGE-L recall of the deployed model
    min_retain_ratio: float | None = 0.8  # retain ROUGE after / before the request
    max_quant_recovery: float | None = 0.2  # forget ROUGE gained by 4-bit re-quantization
    max_relearn_recovery: float | None = 0.3  # held-out forget ROUGE gained by the relearning attack
    min_utility_ratio: float | None = 0.9  # TOFU model utility (retain, real authors, world facts) after / before

    @classmethod
    def from_settings(cls, block: Mapping[str, Any] | None) -> Thresholds:
        block = block or {}
        return cls(**{name: block.get(name, default) for name, default in asdict(cls()).items()})


# check name -> (threshold field, comparison); "le": value <= threshold, "ge": value >= threshold
CHECKS: dict[str, tuple[str, str]] = {
    "forget_rouge": ("max_forget_rouge", "le"),
    "retain_ratio": ("min_retain_ratio", "ge"),
    "utility_ratio": ("min_utility_ratio", "ge"),
    "quant_recovery": ("max_quant_recovery", "le"),
    "relearn_recovery": ("max_relearn_recovery", "le"),
}


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def judged_values(metrics: Mapping[str, Any]) -> dict[str, float | None]:
    """The numbers the thresholds apply to, from a metrics block laid out as::

        {"before": {"forget_rouge", "retain_rouge", "model_utility"}, "after": {...},
         "quantization": {"rtn_w4_g64": {"recovery", ...}, ...}, "relearn": {"recovery", ...}}

    ``retain_ratio`` is retain after / before (1.0 when before is 0), ``utility_ratio`` the same for
    model utility; ``quant_recovery`` is the worst
    (largest) recovery over the quantized rows. A block that is absent gives ``None``.
    """
    after = metrics.get("after") or {}
    before = metrics.get("before") or {}

    def ratio(key: str) -> float | None:
        now, then = _number(after.get(key)), _number(before.get(key))
        if now is None or then is None:
            return None
        return now / then if then > 0 else 1.0

    recoveries = [
        _number(row.get("recovery"))
        for row in (metrics.get("quantization") or {}).values()
        if isinstance(row, Mapping) and not row.get("skipped")
    ]
    recoveries = [r for r in recoveries if r is not None]
    relearn = metrics.get("relearn") or {}
    return {
        "forget_rouge": _number(after.get("forget_rouge")),
        "retain_ratio": ratio("retain_rouge"),
        "utility_ratio": ratio("model_utility"),
        "quant_recovery": max(recoveries) if recoveries else None,
        "relearn_recovery": _number(relearn.get("recovery")) if isinstance(relearn, Mapping) else None,
    }


def judge(
    values: Mapping[str, float | None],
    thresholds: Thresholds,
    skipped: Mapping[str, str] | None = None,
    extra_checks: Iterable[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """Each value against its threshold. A value that was not measured fails, unless ``skipped`` names
    it with the reason it was deliberately not run (e.g. the relearning attack turned off).

    ``extra_checks`` (``{"check", "passed", "reason"}``, e.g. integrity checks) join the verdict as is.
    """
    skipped = dict(skipped or {})
    checks: list[dict[str, Any]] = []
    for name, (field_name, op) in CHECKS.items():
        threshold = getattr(thresholds, field_name)
        value = _number(values.get(name))
        check: dict[str, Any] = {"check": name, "value": value, "threshold": threshold, "op": op}
        if threshold is None:
            check.update(status="off", passed=None)
        elif value is None and name in skipped:
            check.update(status="skipped", passed=None, reason=skipped[name])
        elif value is None:
            check.update(status="fail", passed=False, reason="not measured")
        else:
            ok = value <= threshold if op == "le" else value >= threshold
            check.update(status="pass" if ok else "fail", passed=ok)
        checks.append(check)
    for extra in extra_checks:
        passed = bool(extra["passed"])
        checks.append({**extra, "passed": passed, "status": "pass" if passed else "fail"})
    failed = [c["check"] for c in checks if c["passed"] is False]
    return {"passed": not failed, "failed": failed, "checks": checks}


# --------------------------------------------------------------------------- the record


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
) -> dict[str, Any]:
    """The audit record of one request, sealed with its own ``record_sha256``.

    ``forget`` holds hashes and counts only (``file``, ``file_sha256``, ``records_sha256``, ``count``,
    ``subjects``); raw text has no field to go in. Artifact names must be unique.
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
        }
    )
    record["record_sha256"] = record_sha256(record)
    return record


@dataclass
class ArtifactCheck:
    name: str
    path: str
    status: str  # "ok", "changed", "missing", "absent" (an optional file gone: not a failure)
    expected: str
    actual: str | None = None

    @property
    def failed(self) -> bool:
        return self.status in ("changed", "missing")


@dataclass
class Verification:
    holds: bool
    problems: list[str] = field(default_factory=list)
    artifacts: list[ArtifactCheck] = field(default_factory=list)

    def failed_artifacts(self) -> list[str]:
        return [a.name for a in self.artifacts if a.failed]


def verify_record(record: Mapping[str, Any], local_copy: Mapping[str, Any] | None = None) -> Verification:
    """Re-hash every artifact the record names; the record holds when nothing it names has changed.

    ``local_copy``: the record as found on disk, when ``record`` came from elsewhere (MLflow); the two
    must be identical.
    """
    problems: list[str] = []
    if record.get("schema") != SCHEMA:
        problems.append(f"record: schema is {record.get('schema')!r}, expected {SCHEMA!r}")
    recorded = record.get("record_sha256")
    actual = record_sha256(record)
    if recorded != actual:
        problems.append(
            f"record: contents changed since it was sealed (record_sha256 {str(recorded)[:12]}..., "
            f"now {actual[:12]}...)"
        )
    if local_copy is not None and canonical_json(json_safe(local_copy)) != canonical_json(json_safe(record)):
        where = record.get("record_path") or "the local audit.json"
        problems.append(f"record: {where} differs from the tracked copy")
    checks: list[ArtifactCheck] = []
    for entry in record.get("artifacts", []):
        path = Path(entry["path"])
        check = ArtifactCheck(name=entry["name"], path=str(path), status="ok", expected=entry["sha256"])
        if not path.is_file():
            if entry.get("required", True):
                check.status = "missing"
                problems.append(f"{entry['name']}: missing ({path})")
            else:
                check.status = "absent"
        else:
            check.actual = sha256_file(path)
            if check.actual != entry["sha256"]:
                check.status = "changed"
                problems.append(
                    f"{entry['name']}: sha256 changed, recorded {entry['sha256'][:12]}..., now "
                    f"{check.actual[:12]}... ({path})"
                )
        checks.append(check)
    return Verification(holds=not problems, problems=problems, artifacts=checks)


def format_verification(record: Mapping[str, Any], result: Verification) -> str:
    """Human-readable report of a verification (hashes and paths only)."""
    verdict = record.get("verdict") or {}
    lines = [
        f"audit record {record.get('request_id')} ({record.get('method')}, {record.get('created_at')})",
        f"  record_sha256 {record.get('record_sha256')}",
        f"  thresholds at request time: {'PASSED' if verdict.get('passed') else 'FAILED'}"
        + (f" ({', '.join(verdict.get('failed', []))})" if verdict.get("failed") else ""),
    ]
    for check in result.artifacts:
        note = {
            "ok": "ok",
            "changed": f"CHANGED (now {check.actual[:12] if check.actual else '?'}...)",
            "missing": "MISSING",
            "absent": "absent (optional, not checked)",
        }[check.status]
        lines.append(f"  {check.name:<40} {check.expected[:12]}...  {note}")
    if result.holds:
        lines.append("the record holds: every artifact it names is unchanged")
    else:
        lines.append("the record does NOT hold:")
        lines.extend(f"  - {problem}" for problem in result.problems)
    return "\n".join(lines)
