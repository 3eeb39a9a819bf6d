"""Pass or fail: a request's evidence judged against the thresholds in params.yaml (``audit:``).

Pure arithmetic: no MLflow, no Prefect, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Thresholds:
    """Pass/fail bounds (``audit:`` in params.yaml); ``None`` turns a check off."""

    max_forget_rouge: float | None = 0.5  # forget ROUGE-L recall of the deployed model
    min_retain_ratio: float | None = 0.8  # retain ROUGE after / before the request
    max_quant_recovery: float | None = 0.2  # forget ROUGE gained by 4-bit re-quantization
    max_relearn_recovery: float | None = 0.3  # held-out forget ROUGE gained by the relearning attack
    min_utility_ratio: float | None = 0.9  # TOFU model utility (retain, real authors, world facts) after / before
    # held-out neighbour ROUGE after / before (``--retain-file``); None (older records) leaves it out
    min_neighbour_ratio: float | None = None
    # forget ROUGE before the request below which there was nothing to forget; None (records and callers
    # that predate it) leaves the check out of the verdict
    min_known: float | None = None

    @classmethod
    def from_settings(cls, block: Mapping[str, Any] | None) -> Thresholds:
        block = block or {}
        return cls(**{name: block.get(name, default) for name, default in asdict(cls()).items()})


# Passage neighbours are scored by VerbMem (``metrics.scoring.request_scores``), QA neighbours by ROUGE.
NEIGHBOUR_PASSAGE_KEY = "neighbour_verbmem"

NOT_KNOWN = "not known before: nothing to prove"  # the outcome when the forget set was not known before
KNOWN_CHECK = "known_before"

# check name -> (threshold field, comparison); "le": value <= threshold, "ge": value >= threshold
CHECKS: dict[str, tuple[str, str]] = {
    "forget_rouge": ("max_forget_rouge", "le"),
    "retain_ratio": ("min_retain_ratio", "ge"),
    "utility_ratio": ("min_utility_ratio", "ge"),
    "neighbour_ratio": ("min_neighbour_ratio", "ge"),
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

    ``forget_rouge_before`` is what the knowledge-present check reads; ``retain_ratio`` is retain after /
    before (1.0 when before is 0), ``utility_ratio`` the same for model utility and ``neighbour_ratio`` for
    the held-out neighbours' ROUGE, or their VerbMem when they are passages (absent without a neighbour
    set); ``quant_recovery`` is the worst (largest) recovery over the quantized rows. A block that is
    absent gives ``None``.
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
        "forget_rouge_before": _number(before.get("forget_rouge")),
        "forget_rouge": _number(after.get("forget_rouge")),
        "retain_ratio": ratio("retain_rouge"),
        "utility_ratio": ratio("model_utility"),
        "neighbour_ratio": ratio(NEIGHBOUR_PASSAGE_KEY if NEIGHBOUR_PASSAGE_KEY in before else "neighbour_rouge"),
        "quant_recovery": max(recoveries) if recoveries else None,
        "relearn_recovery": _number(relearn.get("recovery")) if isinstance(relearn, Mapping) else None,
    }


def known_check(values: Mapping[str, float | None], thresholds: Thresholds) -> dict[str, Any] | None:
    """Was the forget set known before the request (forget ROUGE before >= ``min_known``)? A request that
    erased nothing the model knew proves nothing: its outcome is ``NOT_KNOWN``, not a pass. ``None`` when
    ``min_known`` is off."""
    threshold = thresholds.min_known
    if threshold is None:
        return None
    value = _number(values.get("forget_rouge_before"))
    check: dict[str, Any] = {"check": KNOWN_CHECK, "value": value, "threshold": threshold, "op": "ge"}
    if value is None:
        return {**check, "status": "fail", "passed": False, "reason": "not measured"}
    if value < threshold:
        return {**check, "status": "not_known", "passed": False, "reason": NOT_KNOWN}
    return {**check, "status": "pass", "passed": True}


def outcome(checks: Iterable[Mapping[str, Any]]) -> str:
    """ "pass", "fail", or ``NOT_KNOWN`` when the knowledge-present check says so (whatever else failed)."""
    checks = list(checks)
    if any(c.get("status") == "not_known" for c in checks):
        return NOT_KNOWN
    return "fail" if any(c["passed"] is False for c in checks) else "pass"


def judge(
    values: Mapping[str, float | None],
    thresholds: Thresholds,
    skipped: Mapping[str, str] | None = None,
    extra_checks: Iterable[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """Each value against its threshold. A value that was not measured fails, unless ``skipped`` names
    it with the reason it was deliberately not run (e.g. the relearning attack turned off).

    ``extra_checks`` (``{"check", "passed", "reason"}``, e.g. integrity checks) join the verdict as is.
    With ``min_known`` set, the knowledge-present check (``known_check``) comes first; the verdict's
    ``outcome`` is "pass", "fail" or ``NOT_KNOWN``.
    """
    skipped = dict(skipped or {})
    known = known_check(values, thresholds)
    checks: list[dict[str, Any]] = [known] if known is not None else []
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
    return {"passed": not failed, "failed": failed, "outcome": outcome(checks), "checks": checks}
