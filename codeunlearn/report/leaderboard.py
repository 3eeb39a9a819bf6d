"""The comparison leaderboard: one row per method, the same columns for every method."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from typing import Any

from codeunlearn.report.tables import markdown_table

# Column -> (metric path in an evaluation row, direction): "down" lower is better, "up" higher is better.
COLUMNS: dict[str, tuple[str, str]] = {
    "forget_rouge": ("forget_rouge", "down"),
    "retain_rouge": ("retain_rouge", "up"),
    "forget_quality": ("forget_quality", "up"),
    "model_utility": ("model_utility", "up"),
    "world_facts_rouge": ("world_facts_rouge", "up"),
    "real_authors_rouge": ("real_authors_rouge", "up"),
    "privleak": ("privleak", "zero"),
    "forget_rouge_q8": ("quant.rtn_w8_g64.forget_rouge", "down"),
    "forget_rouge_q4": ("quant.rtn_w4_g64.forget_rouge", "down"),
    "relearn_recovery": ("relearn.recovery", "down"),
    "wall_s": ("wall_s", "down"),
    "peak_mem_mb": ("peak_mem_mb", "down"),
}


def lookup(row: Mapping[str, Any], path: str) -> Any:
    value: Any = row
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def leaderboard_rows(results: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"method": method, **{col: lookup(row, path) for col, (path, _) in COLUMNS.items()}}
        for method, row in results.items()
    ]


def to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["method", *COLUMNS], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-3 and value != 0 else f"{value:.3f}"
    return str(value)


def to_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """One row per method; a column an older comparison did not measure reads n/a."""
    arrows = {"down": "↓", "up": "↑", "zero": "→0"}
    header = ["method", *(f"{col} {arrows[d]}" for col, (_, d) in COLUMNS.items())]
    return markdown_table(header, ([_cell(row.get(c)) for c in ["method", *COLUMNS]] for row in rows)) + "\n"
