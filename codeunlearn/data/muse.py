"""MUSE-News files (the layout of muse_bench's data/bbc/): JSON arrays of texts or of QA pairs.

A missing or malformed file raises DataError naming the file, row and field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from codeunlearn.data.records import DataError


def read_json_array(path: Path) -> list[Any]:
    if not path.exists():
        raise DataError(path, "MUSE file not found (see paths.muse_dir and its SOURCE.md)")
    try:
        items = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(path, f"not valid JSON: {err.msg}", line=err.lineno) from err
    if not isinstance(items, list):
        raise DataError(path, f"expected a JSON array, got {type(items).__name__}")
    return items


def read_pairs(path: Path, first: str, second: str) -> list[tuple[str, str]]:
    out = []
    for row, item in enumerate(read_json_array(path)):
        for name in (first, second):
            if not isinstance(item, dict) or not isinstance(item.get(name), str) or not item[name].strip():
                raise DataError(path, "missing or empty string", row=row, field=name)
        out.append((item[first], item[second]))
    return out


def read_texts(path: Path, limit: int | None = None) -> list[str]:
    """A JSON array of non-empty strings (MUSE's privleak and raw files), its first ``limit`` if given
    (only those are checked: raw/forget.json holds an empty string at row 821)."""
    items = read_json_array(path)[:limit]
    for row, item in enumerate(items):
        if not isinstance(item, str) or not item.strip():
            raise DataError(path, "expected a non-empty string", row=row)
    return items
