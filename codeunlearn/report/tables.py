"""Markdown tables: the one renderer every report, leaderboard and benchmark table is drawn with."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric_from: int | None = None) -> str:
    """A markdown table of already formatted cells; columns from ``numeric_from`` on are right-aligned."""
    aligned = range(len(header)) if numeric_from is None else range(numeric_from)
    rule = "|" + "".join("---|" if column in aligned else "---:|" for column in range(len(header)))
    lines = ["| " + " | ".join(header) + " |", rule]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def metric_table(
    rows: Mapping[str, Mapping[str, Any]],
    columns: Sequence[str] | Mapping[str, str],
    digits: int = 3,
    label: str = "model",
) -> str:
    """One row per key of ``rows``, numbers right-aligned; ``columns`` maps keys to headers (or lists keys)."""
    headers = dict(columns) if isinstance(columns, Mapping) else {c: c for c in columns}
    body = [[name, *(_fmt(values.get(col), digits) for col in headers)] for name, values in rows.items()]
    return markdown_table([label, *headers.values()], body, numeric_from=1)


def _fmt(value: Any, digits: int) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if value != 0 and abs(value) < 0.5 * 10 ** (-digits):
            return f"{value:.1e}"  # KS p-values of a clearly different model are tiny, not zero
        return f"{value:.{digits}f}"
    return str(value)
