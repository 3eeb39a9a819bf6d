"""One record schema (QARecord) for every benchmark, the generic JSONL format, and content hashing.

The generic JSON-lines format (``load_jsonl``): one object per line with ``question`` and ``answer``
(or their aliases ``prompt`` and ``response``, as in TOFU's forget files), optional ``id`` and
``subject``. ``write_jsonl`` writes the same format, so split files written by the pipeline read back
with ``read_jsonl_records``. TOFU's own files are read by ``data.tofu``; a request's files of any
record kind by ``data.forget_files``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codeunlearn.io import atomic_write_text


@dataclass(frozen=True)
class QARecord:
    id: str
    question: str
    answer: str
    subject: str = ""
    paraphrased_answer: str | None = None
    perturbed_answers: tuple[str, ...] = ()


class DataError(ValueError):
    """Bad input data. The message names the file, the row and the field.

    ``row`` is the 0-based record index; ``line`` (when known) the 1-based line in the file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        message: str,
        row: int | None = None,
        field: str | None = None,
        line: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.row = row
        self.field = field
        self.line = line
        self.message = message
        super().__init__(f"{self._location()}: {message}")

    def _location(self) -> str:
        where = str(self.path)
        if self.line is not None:
            where += f" line {self.line}"
        if self.row is not None:
            where += f" (row {self.row}, 0-based)" if self.line is not None else f" row {self.row} (0-based)"
        if self.field is not None:
            where += f", field '{self.field}'"
        return where


def malformed_json(path: Path, exc: json.JSONDecodeError, **where: Any) -> DataError:
    return DataError(path, f"malformed JSON at column {exc.colno}: {exc.msg}", **where)


def wrong_type(path: Path, expected: str, value: Any, **where: Any) -> DataError:
    # Names the type only: the value itself may be the sensitive text being forgotten.
    return DataError(path, f"expected {expected}, got {type(value).__name__}", **where)


# --------------------------------------------------------------------------- reading raw JSON


def read_text(path: Path) -> str:
    if not path.exists():
        raise DataError(path, "file not found")
    if not path.is_file():
        raise DataError(path, "not a regular file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not UTF-8 text (byte offset {exc.start})") from exc


def normalize_text(text: str) -> str:
    """The key two texts are the same question (or passage) by: casefolded, whitespace collapsed."""
    return " ".join(text.casefold().split())


# --------------------------------------------------------------------------- field checks

# A field and its accepted aliases, the first being the name reported when none is present.
QUESTION_FIELDS = ("question", "prompt")
ANSWER_FIELDS = ("answer", "response")


def text_field(path: Path, raw: Mapping, names: Sequence[str], row: int, line: int | None) -> str:
    """The first present field of ``names`` as a non-empty string (synonyms, e.g. question/prompt)."""
    name = next((n for n in names if n in raw), None)
    shown = names[0] if name is None else name
    if name is None:
        alias = f" (nor '{names[1]}')" if len(names) > 1 else ""
        raise DataError(path, f"missing{alias}", row=row, field=shown, line=line)
    value = raw[name]
    if value is None:
        raise DataError(path, "is null", row=row, field=shown, line=line)
    if not isinstance(value, str):
        raise wrong_type(path, "a string", value, row=row, field=shown, line=line)
    if not value.strip():
        raise DataError(path, "is empty", row=row, field=shown, line=line)
    return value


def optional_text_field(path: Path, raw: Mapping, name: str, row: int, line: int | None) -> str | None:
    value = raw.get(name)
    if value is None or isinstance(value, str):
        return value
    raise wrong_type(path, "a string", value, row=row, field=name, line=line)


def perturbed_field(path: Path, raw: Mapping, row: int, line: int | None) -> tuple[str, ...]:
    # TOFU's files say perturbed_answer (a list); our own JSONL says perturbed_answers.
    name = "perturbed_answers" if "perturbed_answers" in raw else "perturbed_answer"
    value = raw.get(name)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(path, "expected a list of strings", row=row, field=name, line=line)
    return tuple(value)


def record_id(path: Path, raw: Mapping, row: int, line: int | None, required: bool = False) -> str:
    """The row's own ``id`` (a string or an int), else ``{stem}-{row:04d}``."""
    value = raw.get("id")
    if value is None:
        if required:
            raise DataError(path, "missing", row=row, field="id", line=line)
        return f"{path.stem}-{row:04d}"
    # Integer ids are common in hand-made JSONL; bool is an int subclass but never an id.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise wrong_type(path, "a string", value, row=row, field="id", line=line)
    if not value.strip():
        raise DataError(path, "is empty", row=row, field="id", line=line)
    return value


def qa_record(
    path: Path, raw: Mapping, row: int, line: int | None, subject: str = "", require_id: bool = False
) -> QARecord:
    """One QA row of any file: ``question``/``answer`` (or ``prompt``/``response``); the row's own
    ``subject`` wins over ``subject`` (a default, e.g. TOFU's author by row)."""
    own_subject = optional_text_field(path, raw, "subject", row, line)
    return QARecord(
        id=record_id(path, raw, row, line, required=require_id),
        question=text_field(path, raw, QUESTION_FIELDS, row, line),
        answer=text_field(path, raw, ANSWER_FIELDS, row, line),
        subject=own_subject if own_subject is not None else subject,
        paraphrased_answer=optional_text_field(path, raw, "paraphrased_answer", row, line),
        perturbed_answers=perturbed_field(path, raw, row, line),
    )


# --------------------------------------------------------------------------- generic JSONL


def read_jsonl_rows(path: Path, text: str) -> list[tuple[dict, int]]:
    """(object, 1-based line) of each non-blank line of a JSON-lines text; each line must be one object."""
    rows: list[tuple[dict, int]] = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise malformed_json(path, exc, row=len(rows), line=line_number) from exc
        if not isinstance(raw, dict):
            raise wrong_type(path, "a JSON object", raw, row=len(rows), line=line_number)
        rows.append((raw, line_number))
    return rows


def _parse_jsonl(path: str | os.PathLike[str], require_id: bool) -> list[QARecord]:
    path = Path(path)
    rows = read_jsonl_rows(path, read_text(path))
    return [qa_record(path, raw, row, line, require_id=require_id) for row, (raw, line) in enumerate(rows)]


def load_jsonl(path: str | os.PathLike[str]) -> list[QARecord]:
    """Generic QA JSONL: ``question``/``answer`` (or ``prompt``/``response``) non-empty strings; optional ``id`` (else
    ``{stem}-{row:04d}``), ``subject``, ``paraphrased_answer``, ``perturbed_answers``.

    Duplicate ids are not a load error: the validation suite reports them with their rows.
    """
    return _parse_jsonl(path, require_id=False)


def read_jsonl_records(path: str | os.PathLike[str]) -> list[QARecord]:
    """Read what ``write_jsonl`` wrote; exact round trip. Every line must carry its ``id``."""
    return _parse_jsonl(path, require_id=True)


# --------------------------------------------------------------------------- hashing and files


def records_sha256(records: Iterable[QARecord]) -> str:
    """sha256 of a canonical JSON of (id, question, answer, subject) in order: the split's identity
    (a passage, which has no question, contributes (id, text, subject))."""
    payload = [
        [r.id, r.question, r.answer, r.subject] if hasattr(r, "question") else [r.id, r.text, r.subject]
        for r in records
    ]
    canonical = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _record_json(record: QARecord) -> str:
    return json.dumps(
        {
            "id": record.id,
            "question": record.question,
            "answer": record.answer,
            "subject": record.subject,
            "paraphrased_answer": record.paraphrased_answer,
            "perturbed_answers": list(record.perturbed_answers),
        },
        ensure_ascii=False,
    )


def write_jsonl(records: Iterable[QARecord], path: str | os.PathLike[str]) -> None:
    """Write records as JSONL atomically: serialise first, then a temp file in the same dir + os.replace,
    so a failure leaves no partial file behind."""
    text = "".join(_record_json(r) + "\n" for r in records)
    atomic_write_text(Path(path), text)
