"""Benchmark loaders -> one record schema (QARecord); content hashing; author splits.

Two input formats:

* TOFU's own JSON files (``load_tofu_file``), in the three layouts the release uses (one JSON array,
  JSON lines, several JSON arrays one per line). ``forget*.json`` say ``prompt``/``response`` where
  the rest say ``question``/``answer``; both become ``question``/``answer`` here.
* A generic JSON-lines format (``load_jsonl``): one object per line with ``question`` and ``answer``,
  optional ``id`` and ``subject``. ``write_jsonl`` writes the same format, so split files written by
  the pipeline read back with ``read_jsonl_records``.

Authors in TOFU: full.json is 200 fictitious authors x 20 consecutive QAs, so the author of row r of
full.json is ``tofu-author-{r // 20:03d}``. forgetXX are the last XX% of full.json and retainXX the
first records, in order, so their rows map to full.json rows by an offset known from the file name.

Which authors have perturbed (truth-ratio) data, checked by joining on question text to full.json:

* ``retain_perturbed.json``: full.json rows 0-399, i.e. authors tofu-author-000 .. tofu-author-019.
* ``forget10_perturbed.json``: rows 3600-3999, authors 180-199 (forget05: 190-199, forget01: 198-199).

So a retain split that should carry truth-ratio data must use (a subset of) the first 20 authors;
``split_by_author`` takes retain from the first authors, so ``n_retain <= 20`` is fully covered.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

# TOFU's construction: 200 fictitious authors x 20 QAs in full.json. Dataset facts, not tunables.
TOFU_FULL_RECORDS = 4000
TOFU_QA_PER_AUTHOR = 20
TOFU_AUTHOR_PREFIX = "tofu-author"
_PERCENT = 100

_FULL_SUBSET = re.compile(r"^(?P<kind>forget|retain)(?P<percent>\d{2})(?:_perturbed)?$")
_HOLDOUT = re.compile(r"^holdout\d{2}(?:_perturbed)?$")
# retain_perturbed.json holds full.json rows 0-399 in order (checked), so its offset is 0.
_FULL_PREFIX_FILES = {"full", "retain_perturbed"}
# Real-world utility sets: not fictitious authors, so no author subject.
_NO_SUBJECT_FILES = {"real_authors", "world_facts", "real_authors_perturbed", "world_facts_perturbed"}


@dataclass(frozen=True)
class QARecord:
    id: str
    question: str
    answer: str
    subject: str = ""
    paraphrased_answer: str | None = None
    perturbed_answers: tuple[str, ...] = ()


@dataclass
class Splits:
    forget: list[QARecord]
    retain: list[QARecord]
    holdout: list[QARecord]


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


def _malformed(path: Path, exc: json.JSONDecodeError, **where: Any) -> DataError:
    return DataError(path, f"malformed JSON at column {exc.colno}: {exc.msg}", **where)


def _wrong_type(path: Path, expected: str, value: Any, **where: Any) -> DataError:
    # Names the type only: the value itself may be the sensitive text being forgotten.
    return DataError(path, f"expected {expected}, got {type(value).__name__}", **where)


# --------------------------------------------------------------------------- reading raw JSON


def _read_text(path: Path) -> str:
    if not path.exists():
        raise DataError(path, "file not found")
    if not path.is_file():
        raise DataError(path, "not a regular file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not UTF-8 text (byte offset {exc.start})") from exc


def _as_object_list(path: Path, value: Any, first_row: int, line: int | None) -> list[dict]:
    items = value if isinstance(value, list) else [value]
    for offset, item in enumerate(items):
        if not isinstance(item, dict):
            raise _wrong_type(path, "a JSON object", item, row=first_row + offset, line=line)
    return items


def _parse_lines(path: Path, text: str) -> list[dict]:
    records: list[dict] = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _malformed(path, exc, line=line_number) from exc
        records.extend(_as_object_list(path, value, len(records), line_number))
    return records


def read_json_records(path: str | os.PathLike[str]) -> list[dict]:
    """All objects of a TOFU-style JSON file: one array, JSON lines, or one array per line (concatenated)."""
    path = Path(path)
    text = _read_text(path)
    try:
        return _as_object_list(path, json.loads(text), 0, None)
    except json.JSONDecodeError as exc:
        # "Extra data" means the first document parsed: a multi-document file, so read it line by line
        # (that error then points at the right line). Any other error is inside a single document.
        if exc.msg != "Extra data":
            raise _malformed(path, exc, line=exc.lineno) from exc
    return _parse_lines(path, text)


# --------------------------------------------------------------------------- field checks


def _text(path: Path, raw: Mapping, names: Sequence[str], row: int, line: int | None) -> str:
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
        raise _wrong_type(path, "a string", value, row=row, field=shown, line=line)
    if not value.strip():
        raise DataError(path, "is empty", row=row, field=shown, line=line)
    return value


def _optional_str(path: Path, raw: Mapping, name: str, row: int, line: int | None) -> str | None:
    value = raw.get(name)
    if value is None or isinstance(value, str):
        return value
    raise _wrong_type(path, "a string", value, row=row, field=name, line=line)


def _perturbed(path: Path, raw: Mapping, row: int, line: int | None) -> tuple[str, ...]:
    # TOFU's files say perturbed_answer (a list); our own JSONL says perturbed_answers.
    name = "perturbed_answers" if "perturbed_answers" in raw else "perturbed_answer"
    value = raw.get(name)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(path, "expected a list of strings", row=row, field=name, line=line)
    return tuple(value)


def _record_id(path: Path, raw: Mapping, row: int, line: int | None, required: bool) -> str:
    value = raw.get("id")
    if value is None:
        if required:
            raise DataError(path, "missing", row=row, field="id", line=line)
        return f"{path.stem}-{row:04d}"
    # Integer ids are common in hand-made JSONL; bool is an int subclass but never an id.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise _wrong_type(path, "a string", value, row=row, field="id", line=line)
    if not value.strip():
        raise DataError(path, "is empty", row=row, field="id", line=line)
    return value


# --------------------------------------------------------------------------- TOFU


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


def _subject_rule(path: Path, n_records: int):
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

    A record's own ``subject`` field, if it has one, wins over the file-name rule.
    """
    path = Path(path)
    raws = read_json_records(path)
    subject_of = _subject_rule(path, len(raws))
    records = []
    for row, raw in enumerate(raws):
        own_subject = _optional_str(path, raw, "subject", row, None)
        records.append(
            QARecord(
                id=f"{path.stem}-{row:04d}",
                question=_text(path, raw, ("question", "prompt"), row, None),
                answer=_text(path, raw, ("answer", "response"), row, None),
                subject=own_subject if own_subject is not None else subject_of(row),
                paraphrased_answer=_optional_str(path, raw, "paraphrased_answer", row, None),
                perturbed_answers=_perturbed(path, raw, row, None),
            )
        )
    return records


# --------------------------------------------------------------------------- generic JSONL


def _jsonl_record(path: Path, raw: Mapping, row: int, line: int, require_id: bool) -> QARecord:
    subject = _optional_str(path, raw, "subject", row, line)
    return QARecord(
        id=_record_id(path, raw, row, line, required=require_id),
        question=_text(path, raw, ("question",), row, line),
        answer=_text(path, raw, ("answer",), row, line),
        subject=subject or "",
        paraphrased_answer=_optional_str(path, raw, "paraphrased_answer", row, line),
        perturbed_answers=_perturbed(path, raw, row, line),
    )


def _parse_jsonl(path: str | os.PathLike[str], require_id: bool) -> list[QARecord]:
    path = Path(path)
    records: list[QARecord] = []
    for line_number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        row = len(records)
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _malformed(path, exc, row=row, line=line_number) from exc
        if not isinstance(raw, dict):
            raise _wrong_type(path, "a JSON object", raw, row=row, line=line_number)
        records.append(_jsonl_record(path, raw, row, line_number, require_id))
    return records


def load_jsonl(path: str | os.PathLike[str]) -> list[QARecord]:
    """Generic QA JSONL: ``question``/``answer`` non-empty strings; optional ``id`` (else
    ``{stem}-{row:04d}``), ``subject``, ``paraphrased_answer``, ``perturbed_answers``.

    Duplicate ids are not a load error: the validation suite reports them with their rows.
    """
    return _parse_jsonl(path, require_id=False)


def read_jsonl_records(path: str | os.PathLike[str]) -> list[QARecord]:
    """Read what ``write_jsonl`` wrote; exact round trip. Every line must carry its ``id``."""
    return _parse_jsonl(path, require_id=True)


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


# --------------------------------------------------------------------------- splits


def _authors_in_order(records: Sequence[QARecord]) -> list[str]:
    authors: dict[str, None] = {}
    for row, record in enumerate(records):
        if not record.subject:
            raise ValueError(f"record {record.id!r} (row {row}, 0-based) has no subject; cannot split by author")
        authors.setdefault(record.subject, None)
    return list(authors)


def split_by_author(records: Sequence[QARecord], n_forget: int, n_retain: int, n_holdout: int) -> Splits:
    """Cut forget / retain / holdout by author, deterministically (TOFU's construction).

    Authors are taken in first-appearance order: forget = the LAST ``n_forget`` authors, holdout = the
    ``n_holdout`` authors just before them (never trained on: membership-inference non-members),
    retain = the FIRST ``n_retain`` authors. Records keep their input order within each split.
    """
    if n_forget < 1 or n_retain < 0 or n_holdout < 0:
        raise ValueError(f"need n_forget >= 1, n_retain >= 0, n_holdout >= 0; got {n_forget}, {n_retain}, {n_holdout}")
    authors = _authors_in_order(records)
    needed = n_forget + n_holdout + n_retain
    if needed > len(authors):
        raise ValueError(
            f"splits would overlap: n_retain + n_holdout + n_forget = {needed} authors, "
            f"but the records have only {len(authors)}"
        )
    first_forget = len(authors) - n_forget
    forget = set(authors[first_forget:])
    holdout = set(authors[first_forget - n_holdout : first_forget])
    retain = set(authors[:n_retain])
    return Splits(
        forget=[r for r in records if r.subject in forget],
        retain=[r for r in records if r.subject in retain],
        holdout=[r for r in records if r.subject in holdout],
    )


def split_retain_by_author(records: Sequence[QARecord], control_authors: int) -> tuple[list[QARecord], list[QARecord]]:
    """(control, scored): the retain split's first ``control_authors`` authors and the rest.

    The control authors are CodeUnlearn's control set and the gate's calibration; the scored authors
    are never seen by a selection, so their retain score is not protected by construction. 0 keeps
    the whole split on both sides (the pre-hold-out behaviour).
    """
    if control_authors == 0:
        return list(records), list(records)
    authors = _authors_in_order(records)
    if not 0 < control_authors < len(authors):
        raise ValueError(
            f"select.control_authors is {control_authors}, but the retain split has {len(authors)} authors: "
            "it must leave at least one author to score"
        )
    control = set(authors[:control_authors])
    return [r for r in records if r.subject in control], [r for r in records if r.subject not in control]


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


# --------------------------------------------------------------------------- hashing and files


def records_sha256(records: Iterable[QARecord]) -> str:
    """sha256 of a canonical JSON of (id, question, answer, subject) in order: the split's identity."""
    payload = [[r.id, r.question, r.answer, r.subject] for r in records]
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
    path = Path(path)
    text = "".join(_record_json(r) + "\n" for r in records)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _count_authors(records: Iterable[QARecord]) -> int:
    return len({r.subject for r in records if r.subject})


def split_summary(splits: Splits) -> dict[str, Any]:
    """Counts, distinct authors and sha256 per split, e.g. forget_count / forget_authors / forget_sha256.

    No raw text: safe to log.
    """
    summary: dict[str, Any] = {}
    for name in ("forget", "retain", "holdout"):
        records = getattr(splits, name)
        summary[f"{name}_count"] = len(records)
        summary[f"{name}_authors"] = _count_authors(records)
        summary[f"{name}_sha256"] = records_sha256(records)
    return summary
