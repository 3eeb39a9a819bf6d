"""TOFU's JSON files as QARecords, their authors, and their perturbed answers.

TOFU's own JSON files (``load_tofu_file``) come in three layouts (one JSON array, JSON lines, several
JSON arrays one per line). ``forget*.json`` say ``prompt``/``response`` where the rest say
``question``/``answer``; both become ``question``/``answer`` here.

Authors in TOFU: full.json is 200 fictitious authors x 20 consecutive QAs, so the author of row r of
full.json is ``tofu-author-{r // 20:03d}``. forgetXX are the last XX% of full.json and retainXX the
first records, in order, so their rows map to full.json rows by an offset known from the file name.

Which authors have perturbed (truth-ratio) data, checked by joining on question text to full.json:

* ``retain_perturbed.json``: full.json rows 0-399, i.e. authors tofu-author-000 .. tofu-author-019.
* ``forget10_perturbed.json``: rows 3600-3999, authors 180-199 (forget05: 190-199, forget01: 198-199).

So a retain split that should carry truth-ratio data must use (a subset of) the first 20 authors;
``splits.split_by_author`` takes retain from the first authors, so ``n_retain <= 20`` is fully covered.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from codeunlearn.data.records import (
    DataError,
    QARecord,
    load_jsonl,
    malformed_json,
    qa_record,
    read_text,
    wrong_type,
)

# TOFU's construction: 200 fictitious authors x 20 QAs in full.json. Dataset facts, not tunables.
TOFU_FULL_RECORDS = 4000
TOFU_QA_PER_AUTHOR = 20
TOFU_AUTHOR_PREFIX = "tofu-author"
_PERCENT = 100
_FULL_SUBSET = re.compile(r"^(?P<kind>forget|retain)(?P<percent>\d{2})(?:_perturbed)?$")
_HOLDOUT = re.compile(r"^holdout\d{2}(?:_perturbed)?$")

# retain_perturbed.json holds full.json rows 0-399 in order (checked), so its offset is 0.
_FULL_PREFIX_FILES = {"full", "retain_perturbed"}


def _as_object_list(path: Path, value: Any, first_row: int, line: int | None) -> list[dict]:
    items = value if isinstance(value, list) else [value]
    for offset, item in enumerate(items):
        if not isinstance(item, dict):
            raise wrong_type(path, "a JSON object", item, row=first_row + offset, line=line)
    return items


def _parse_lines(path: Path, text: str) -> list[tuple[dict, int]]:
    rows: list[tuple[dict, int]] = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise malformed_json(path, exc, line=line_number) from exc
        rows.extend((item, line_number) for item in _as_object_list(path, value, len(rows), line_number))
    return rows


def read_json_rows(path: Path, text: str) -> list[tuple[dict, int | None]]:
    """(object, 1-based line or None) of a TOFU-style JSON text: one array, JSON lines, or one array per line.

    A single document gives no line per object (None); a multi-document text gives each object its line.
    """
    try:
        return [(item, None) for item in _as_object_list(path, json.loads(text), 0, None)]
    except json.JSONDecodeError as exc:
        # "Extra data" means the first document parsed: a multi-document file, so read it line by line
        # (that error then points at the right line). Any other error is inside a single document.
        if exc.msg != "Extra data":
            raise malformed_json(path, exc, line=exc.lineno) from exc
    return list(_parse_lines(path, text))


def read_json_records(path: str | os.PathLike[str]) -> list[dict]:
    """All objects of a TOFU-style JSON file: one array, JSON lines, or one array per line (concatenated)."""
    path = Path(path)
    return [raw for raw, _ in read_json_rows(path, read_text(path))]


def _tofu_author(row_in_full: int, prefix: str = TOFU_AUTHOR_PREFIX) -> str:
    return f"{prefix}-{row_in_full // TOFU_QA_PER_AUTHOR:03d}"


def _full_offset(path: Path, n_records: int) -> int | None:
    """Row in full.json of this file's first record, or None when the file is not cut from full.json."""
    stem = path.stem
    if stem in _FULL_PREFIX_FILES:
        return 0
    match = _FULL_SUBSET.match(stem)
    if match is None:
        return None
    percent = int(match["percent"])
    expected, remainder = divmod(TOFU_FULL_RECORDS * percent, _PERCENT)
    if remainder or n_records != expected:
        raise DataError(
            path,
            f"expected {expected} records ({percent}% of TOFU's {TOFU_FULL_RECORDS}), found {n_records}; "
            "author subjects are derived from the file name and would be wrong",
        )
    return TOFU_FULL_RECORDS - expected if match["kind"] == "forget" else 0


def subject_rule(path: Path, n_records: int) -> Callable[[int], str]:
    """A function row -> subject for this TOFU file, chosen by its name."""
    offset = _full_offset(path, n_records)
    if offset is not None:
        return lambda row: _tofu_author(offset + row)
    if _HOLDOUT.match(path.stem):
        return lambda row: _tofu_author(row, prefix=f"{path.stem}-author")
    # real_authors / world_facts and unknown files: no fictitious author to name.
    return lambda row: ""


def load_tofu_file(path: str | os.PathLike[str]) -> list[QARecord]:
    """One TOFU JSON file as QARecords (ids ``{stem}-{row:04d}``, subjects in full.json author order).

    A record's own ``subject`` field, if it has one, wins over the file-name rule (and its own ``id``
    over the row-numbered one; TOFU's files carry none).
    """
    path = Path(path)
    rows = read_json_rows(path, read_text(path))
    subject_of = subject_rule(path, len(rows))
    return [qa_record(path, raw, row, line, subject=subject_of(row)) for row, (raw, line) in enumerate(rows)]


def load_qa_file(path: str | os.PathLike[str]) -> list[QARecord]:
    """Dispatch on the suffix: ``.jsonl`` -> load_jsonl, ``.json`` -> load_tofu_file.

    Anything else (e.g. TOFU's idontknow.txt, plain refusal strings) is not a QA file: DataError.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "file not found")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return load_jsonl(path)
    if suffix == ".json":
        return load_tofu_file(path)
    raise DataError(path, f"not a QA file: unsupported suffix '{suffix}' (expected .json or .jsonl)")


def attach_perturbations(records: Iterable[QARecord], perturbed: Iterable[QARecord]) -> list[QARecord]:
    """Fill ``paraphrased_answer``/``perturbed_answers`` from ``*_perturbed`` records, joined by question.

    A question match only counts when the answers agree too: full.json asks "What is the full name of
    the author?" of two authors (rows 100 and 440), and only row 100's pair is in retain_perturbed.json.
    Records with no match are returned unchanged. See the module docstring for which authors have
    perturbed data (retain: tofu-author-000..019; forget10: 180..199).
    """
    by_question: dict[str, list[QARecord]] = {}
    for candidate in perturbed:
        by_question.setdefault(candidate.question, []).append(candidate)
    out = []
    for record in records:
        answer = record.answer.strip()
        match = next((c for c in by_question.get(record.question, ()) if c.answer.strip() == answer), None)
        if match is not None:
            record = replace(
                record, paraphrased_answer=match.paraphrased_answer, perturbed_answers=match.perturbed_answers
            )
        out.append(record)
    return out
