"""What a forget-set validation found: the report, the error that stops a request, and the HTML data docs.

Never raw question/answer text: only expectation names, columns, row numbers, counts and type names.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

ROWS_SHOWN = 10  # rows listed per failure in the error message; the report keeps them all


@dataclass
class ExpectationFailure:
    expectation: str
    # "forget" or "retain": the cross-split (leakage) checks report once per side, with that side's rows.
    split: str
    column: str | None
    rows: list[int]
    detail: str


@dataclass
class ValidationReport:
    success: bool
    statistics: dict
    failures: list[ExpectationFailure]
    # Every evaluated expectation (name, split, column, success, unexpected count): the data docs table.
    checks: list[dict] = field(default_factory=list)
    source: str = ""

    def to_dict(self) -> dict:
        """JSON-serialisable; no raw question/answer text (only names, row numbers, counts)."""
        return {
            "source": self.source,
            "success": self.success,
            "statistics": dict(self.statistics),
            "failures": [asdict(f) for f in self.failures],
            "checks": [dict(c) for c in self.checks],
        }

    def to_html(self) -> str:
        """A small self-contained HTML page of the results (our data docs); no raw text."""
        return _render_html(self)


class ForgetSetValidationError(ValueError):
    """The forget/retain sets failed validation; ``report`` holds the full ValidationReport."""

    def __init__(self, report: ValidationReport, source: str) -> None:
        self.report = report
        self.source = source
        super().__init__(describe_failures(report, source))


def _rows_text(rows: Sequence[int]) -> str:
    if not rows:
        return "n/a"
    shown = ", ".join(str(r) for r in rows[:ROWS_SHOWN])
    extra = len(rows) - ROWS_SHOWN
    return f"[{shown}{f', ... and {extra} more' if extra > 0 else ''}]"


def describe_failures(report: ValidationReport, source: str) -> str:
    """One line per failed expectation: split, expectation, column, rows (0-based), detail."""
    stats = report.statistics
    lines = [
        f"{source} failed validation ({stats.get('unsuccessful_expectations', len(report.failures))} of "
        f"{stats.get('evaluated_expectations', '?')} expectations failed):"
    ]
    for f in report.failures:
        column = f" column '{f.column}'" if f.column else ""
        lines.append(f"  - {f.split}: {f.expectation}{column} rows {_rows_text(f.rows)}: {f.detail}")
    return "\n".join(lines)


def require_valid(report: ValidationReport, source: str) -> None:
    """Raise ForgetSetValidationError (naming every failed expectation) unless the report passed."""
    if not report.success:
        raise ForgetSetValidationError(report, source)


_STYLE = (
    "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1.5em}"
    "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}.pass{color:#176317}.fail{color:#a11}"
)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _render_html(report: ValidationReport) -> str:
    verdict = "passed" if report.success else "failed"
    css = "pass" if report.success else "fail"
    stats = _table(("statistic", "value"), sorted(report.statistics.items()))
    checks = _table(
        ("split", "expectation", "column", "result", "unexpected"),
        [
            (
                c["split"],
                c["expectation"],
                c["column"] or "",
                "pass" if c["success"] else "FAIL",
                c["unexpected_count"],
            )
            for c in report.checks
        ],
    )
    failures = _table(
        ("split", "expectation", "column", "rows (0-based)", "detail"),
        [(f.split, f.expectation, f.column or "", _rows_text(f.rows), f.detail) for f in report.failures],
    )
    title = html.escape(f"Validation of {report.source}")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
        f"<style>{_STYLE}</style></head>"
        f"<body><h1>{title}</h1><p class='{css}'><b>{verdict}</b></p><h2>Statistics</h2>{stats}"
        f"<h2>Failures</h2>{failures}<h2>Expectations</h2>{checks}</body></html>"
    )
