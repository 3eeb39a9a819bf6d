"""One loader for the files a request is made of (a forget set, a retain set): three record kinds.

A file holds one kind of record, detected from its first row's fields or declared by the caller:

* **qa**: ``question`` and ``answer`` (aliases ``prompt`` and ``response``), optional ``id``,
  ``subject``, ``paraphrased_answer``, ``perturbed_answers`` (``QARecord``);
* **passage**: ``text``, a document to forget, optional ``id`` and ``subject`` (``PassageRecord``);
* **choice**: ``question``, ``choices`` (a list of at least two distinct strings) and ``answer``, the
  0-based index of the right choice, optional ``id`` and ``subject`` (``ChoiceRecord``).

Formats, by suffix: ``.json`` (one array, JSON lines, or one array per line: TOFU's layouts; a QA
file named as a TOFU file gets TOFU's author subjects), ``.jsonl`` (one object per line), ``.csv``
and ``.parquet`` (read by ``datasets``; a CSV cell holds no list, so a choice file is JSON or Parquet).
JSON is parsed here, not by ``datasets``: pyarrow's JSON reader names no line for a malformed row,
coerces types across rows and writes an Arrow cache.

Every problem is a ``DataError`` naming the file, the row (and line) and the field: a missing path,
a file over the size limit, non-UTF-8 text, an empty file, a malformed line, a missing field or a
wrong type, a row of another kind, a repeated question (or passage, or id) inside one file, and a
forget record that is also in the retain file (both rows named). Messages never quote the data.
Nothing here imports torch: a request's files are refused before any model library loads.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from codeunlearn.data.records import (
    ANSWER_FIELDS,
    QUESTION_FIELDS,
    DataError,
    QARecord,
    normalize_text,
    optional_text_field,
    qa_record,
    read_jsonl_rows,
    read_text,
    record_id,
    text_field,
    wrong_type,
)
from codeunlearn.data.tofu import read_json_rows, subject_rule

MIN_CHOICES = 2  # a multiple-choice question needs a right option and at least one wrong one
TABLE_SUFFIXES = (".csv", ".parquet")
SUFFIXES = (".json", ".jsonl", *TABLE_SUFFIXES)


class RecordKind(StrEnum):
    QA = "qa"
    PASSAGE = "passage"
    CHOICE = "choice"


@dataclass(frozen=True)
class PassageRecord:
    id: str
    text: str
    subject: str = ""


@dataclass(frozen=True)
class ChoiceRecord:
    id: str
    question: str
    choices: tuple[str, ...]
    answer: int  # index of the right choice
    subject: str = ""

    def as_qa(self) -> QARecord:
        """The question with its right choice as the answer and the wrong ones as perturbed answers."""
        wrong = tuple(choice for index, choice in enumerate(self.choices) if index != self.answer)
        return QARecord(self.id, self.question, self.choices[self.answer], self.subject, perturbed_answers=wrong)


Record = QARecord | PassageRecord | ChoiceRecord


@dataclass(frozen=True)
class RecordFile:
    """A loaded file: its kind, its records and each record's 1-based line (None where unknown)."""

    path: Path
    kind: RecordKind
    records: tuple[Record, ...]
    lines: tuple[int | None, ...]


# --------------------------------------------------------------------------- reading rows


def _check_size(path: Path, max_bytes: int | None) -> None:
    if not path.exists():
        raise DataError(path, "file not found")
    if not path.is_file():
        raise DataError(path, "not a regular file")
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise DataError(path, f"file is {size} bytes, over the limit of {max_bytes} (forget_set.max_bytes)")


def _read_table_rows(path: Path) -> list[tuple[dict, int | None]]:
    """CSV or Parquet rows through ``datasets``, its Arrow cache in a temporary folder removed after."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    reader = datasets.Dataset.from_csv if path.suffix.lower() == ".csv" else datasets.Dataset.from_parquet
    with tempfile.TemporaryDirectory(prefix="codeunlearn-table-") as cache:
        try:
            table = reader(str(path), cache_dir=cache, keep_in_memory=True)
        except Exception as exc:  # datasets wraps pyarrow's many parse errors in its own
            raise DataError(path, f"not a readable {path.suffix[1:]} table ({type(exc).__name__})") from exc
        return [(row, None) for row in table.to_list()]


def read_rows(path: str | os.PathLike[str], max_bytes: int | None = None) -> list[tuple[dict, int | None]]:
    """(object, 1-based line or None) of every row of a JSON, JSONL, CSV or Parquet file; never empty."""
    path = Path(path)
    _check_size(path, max_bytes)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(path, f"unsupported suffix '{suffix}' (expected one of {', '.join(SUFFIXES)})")
    if suffix == ".parquet":
        rows = _read_table_rows(path)
    else:
        text = read_text(path)
        if not text.strip():
            raise DataError(path, "empty file: no records")
        if suffix == ".csv":
            rows = _read_table_rows(path)
        elif suffix == ".jsonl":
            rows = list(read_jsonl_rows(path, text))
        else:
            rows = read_json_rows(path, text)
    if not rows:
        raise DataError(path, "empty file: no records")
    return rows


# --------------------------------------------------------------------------- one row of each kind


def row_kind(raw: Mapping) -> RecordKind | None:
    """The kind a row's fields say it is: ``choices`` -> choice, a question -> qa, ``text`` -> passage."""
    if "choices" in raw:
        return RecordKind.CHOICE
    if any(name in raw for name in QUESTION_FIELDS + ANSWER_FIELDS):
        return RecordKind.QA
    if "text" in raw:
        return RecordKind.PASSAGE
    return None


def _kind_field(kind: RecordKind) -> str:
    return {RecordKind.CHOICE: "choices", RecordKind.QA: "question", RecordKind.PASSAGE: "text"}[kind]


def _passage_record(path: Path, raw: Mapping, row: int, line: int | None) -> PassageRecord:
    subject = optional_text_field(path, raw, "subject", row, line)
    return PassageRecord(
        id=record_id(path, raw, row, line),
        text=text_field(path, raw, ("text",), row, line),
        subject=subject or "",
    )


def _choices(path: Path, raw: Mapping, row: int, line: int | None) -> tuple[str, ...]:
    value = raw.get("choices")
    if not isinstance(value, list):
        raise wrong_type(path, "a list of strings", value, row=row, field="choices", line=line)
    if len(value) < MIN_CHOICES:
        raise DataError(path, f"needs at least {MIN_CHOICES} choices, got {len(value)}", row, "choices", line)
    for index, choice in enumerate(value):
        if not isinstance(choice, str):
            raise wrong_type(path, f"a string at index {index}", choice, row=row, field="choices", line=line)
        if not choice.strip():
            raise DataError(path, f"choice {index} is empty", row=row, field="choices", line=line)
    if len({normalize_text(choice) for choice in value}) < len(value):
        raise DataError(path, "two choices are the same text", row=row, field="choices", line=line)
    return tuple(value)


def _choice_record(path: Path, raw: Mapping, row: int, line: int | None) -> ChoiceRecord:
    subject = optional_text_field(path, raw, "subject", row, line)
    question = text_field(path, raw, QUESTION_FIELDS, row, line)
    choices = _choices(path, raw, row, line)
    answer = raw.get("answer")
    if answer is None:
        raise DataError(path, "missing", row=row, field="answer", line=line)
    # bool is an int subclass but never an index.
    if not isinstance(answer, int) or isinstance(answer, bool):
        raise wrong_type(path, "an integer index into choices", answer, row=row, field="answer", line=line)
    if not 0 <= answer < len(choices):
        raise DataError(path, f"index {answer} outside 0..{len(choices) - 1}", row=row, field="answer", line=line)
    return ChoiceRecord(record_id(path, raw, row, line), question, choices, answer, subject or "")


def _record(path: Path, kind: RecordKind, raw: Mapping, row: int, line: int | None, subject: str) -> Record:
    if kind is RecordKind.QA:
        return qa_record(path, raw, row, line, subject=subject)
    if kind is RecordKind.PASSAGE:
        return _passage_record(path, raw, row, line)
    return _choice_record(path, raw, row, line)


def load_record_file(
    path: str | os.PathLike[str], kind: RecordKind | str | None = None, max_bytes: int | None = None
) -> RecordFile:
    """Read one file of one record kind (``kind`` None: detected from the first row)."""
    path = Path(path)
    rows = read_rows(path, max_bytes)
    declared = RecordKind(kind) if kind is not None else None
    file_kind = declared or row_kind(rows[0][0])
    if file_kind is None:
        raise DataError(
            path,
            "no 'question', 'text' or 'choices' field: not a qa, passage or choice record",
            row=0,
            line=rows[0][1],
        )
    # TOFU's file names say which fictitious author each QA row is about.
    subject_of = subject_rule(path, len(rows)) if file_kind is RecordKind.QA and path.suffix == ".json" else None
    records = []
    for row, (raw, line) in enumerate(rows):
        found = row_kind(raw)
        if found is not None and found is not file_kind:
            raise DataError(
                path,
                f"a {found} record in a {file_kind} file (a file holds one kind)",
                row=row,
                field=_kind_field(found),
                line=line,
            )
        records.append(_record(path, file_kind, raw, row, line, subject_of(row) if subject_of else ""))
    return RecordFile(path, file_kind, tuple(records), tuple(line for _, line in rows))


# --------------------------------------------------------------------------- duplicates and overlap


def content_key(record: Record) -> tuple[str, str]:
    """(field, normalised text) that makes two records the same: the question, or a passage's text."""
    if isinstance(record, PassageRecord):
        return "text", normalize_text(record.text)
    return "question", normalize_text(record.question)


def check_unique(records: RecordFile) -> None:
    """A repeated id, question or passage inside one file is an error naming both rows."""
    seen: dict[tuple[str, str], int] = {}
    for row, record in enumerate(records.records):
        for key in (("id", record.id), content_key(record)):
            first = seen.setdefault(key, row)
            if first != row:
                what = "same text" if key[0] != "id" else "same id"
                raise DataError(
                    records.path,
                    f"duplicate {key[0]}: {what} as row {first} (0-based; case and spacing ignored)",
                    row=row,
                    field=key[0],
                    line=records.lines[row],
                )


def check_disjoint(forget: RecordFile, retain: RecordFile) -> None:
    """No forget record may be a retain record: the error names both files and both rows."""
    retain_rows = {content_key(record): row for row, record in enumerate(retain.records)}
    for row, record in enumerate(forget.records):
        key = content_key(record)
        if key in retain_rows:
            raise DataError(
                forget.path,
                f"same {key[0]} as {retain.path} row {retain_rows[key]} (0-based): "
                "a record cannot be both forgotten and retained",
                row=row,
                field=key[0],
                line=forget.lines[row],
            )


NEIGHBOUR_KINDS = (RecordKind.QA, RecordKind.PASSAGE)  # a neighbour set is scored by ROUGE or by VerbMem


def check_neighbour_kind(neighbours: RecordFile) -> None:
    """A neighbour set (``--retain-file``) holds QAs or passages: a multiple-choice file is refused."""
    if neighbours.kind not in NEIGHBOUR_KINDS:
        kinds = " or ".join(str(kind) for kind in NEIGHBOUR_KINDS)
        what = f"a {neighbours.kind} file; a neighbour set (--retain-file) holds {kinds} records"
        raise DataError(neighbours.path, what)


def read_request_files(
    forget_path: str | os.PathLike[str],
    retain_path: str | os.PathLike[str] | None = None,
    max_bytes: int | None = None,
    kind: RecordKind | str | None = None,
) -> tuple[RecordFile, RecordFile | None]:
    """A request's forget file (of ``kind``, or detected) and optional retain file, each read and
    checked for repeats, and checked against each other for overlap."""
    forget = load_record_file(forget_path, kind, max_bytes)
    check_unique(forget)
    if retain_path is None:
        return forget, None
    retain = load_record_file(retain_path, None, max_bytes)
    check_unique(retain)
    check_disjoint(forget, retain)
    return forget, retain


# --------------------------------------------------------------------------- what a method unlearns


def unlearning_records(records: RecordFile) -> list[QARecord | PassageRecord]:
    """The records a method unlearns from a request file: QAs and passages as they are, a multiple-choice
    question as a QA whose answer is its right option (``ChoiceRecord.as_qa``): the knowledge to remove is
    which option is right, and the wrong ones stay in ``perturbed_answers``."""
    return [record.as_qa() if isinstance(record, ChoiceRecord) else record for record in records.records]


# --------------------------------------------------------------------------- benchmark QAs as choices


def choices_from_perturbed(records: Sequence[QARecord], seed: int) -> list[ChoiceRecord]:
    """Multiple-choice records from QAs with perturbed answers (TOFU's real_authors / world_facts):
    the perturbed answers are the wrong options, the answer the right one, at a position drawn from
    ``random.Random(seed)`` record by record, so the same records and seed give the same options."""
    rng = random.Random(seed)
    out = []
    for record in records:
        if not record.perturbed_answers:
            raise ValueError(f"record {record.id!r} has no perturbed answers to serve as wrong options")
        position = rng.randrange(len(record.perturbed_answers) + 1)
        choices = list(record.perturbed_answers)
        choices.insert(position, record.answer)
        out.append(ChoiceRecord(record.id, record.question, tuple(choices), position, record.subject))
    return out
