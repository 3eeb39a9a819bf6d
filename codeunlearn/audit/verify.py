"""Re-verify an audit record later: does it still hold?

The record holds when it is unchanged (its own ``record_sha256``) and every artifact it names still has
the recorded hash. The forget file may have been deleted since (erasure): that is reported, not failed;
a forget file that *changed* fails. Pure: hashing and JSON only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from codeunlearn.audit.judge import NOT_KNOWN
from codeunlearn.audit.record import SCHEMA, canonical_json, json_safe, record_sha256
from codeunlearn.io import sha256_file


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


def _verdict_word(verdict: Mapping[str, Any]) -> str:
    if verdict.get("outcome") == NOT_KNOWN:
        return NOT_KNOWN.upper()
    return "PASSED" if verdict.get("passed") else "FAILED"


def format_verification(record: Mapping[str, Any], result: Verification) -> str:
    """Human-readable report of a verification (hashes and paths only)."""
    verdict = record.get("verdict") or {}
    lines = [
        f"audit record {record.get('request_id')} ({record.get('method')}, {record.get('created_at')})",
        f"  record_sha256 {record.get('record_sha256')}",
        f"  thresholds at request time: {_verdict_word(verdict)}"
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
