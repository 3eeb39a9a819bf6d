"""Great Expectations suite that stops an unlearning request before any model work.

One suite per split (forget, retain) runs on a pandas frame built from the records:

* schema: the required columns exist; id/question/answer are present (not null), of type str and
  non-blank; ids are unique within the split. A passage set (``text`` records, no questions) is held to
  the same checks on id/text, with the passage length bounds;
* bounds: question and answer lengths, forget size in [min_forget, max_forget], retain size >= min_retain;
* leakage: no normalised question (casefolded, whitespace collapsed) and no id of this split occurs in the
  other split. Each split's frame is checked against the other's values (a set-membership expectation),
  so GX reports the offending rows directly in each split's own row index. A uniqueness check over one
  combined frame would also fire on repeats inside one split, which are not leakage (TOFU's full.json asks
  "What is the full name of the author?" of two authors that usually both land in retain);
* subject coverage: all-or-none on forget. If any forget record names a subject, every one must (a
  partially labelled forget set is a data error); a generic JSONL forget set without subjects passes.

Odd values (an int answer, a list, NaN) never crash the suite: each text field is split into a text
column (str or null) and a ``<field>_type`` column (the value's type name) that the type check runs on.

The report never carries raw question/answer text: only expectation names, columns, row numbers, counts
and type names. Great Expectations is imported lazily because its import alone takes seconds.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from codeunlearn.data.records import normalize_text
from codeunlearn.data.validation_report import ExpectationFailure, ValidationReport, require_valid

REQUIRED_COLUMNS = ("id", "question", "answer", "subject")
TEXT_COLUMNS = ("id", "question", "answer")
# A passage set (documents to forget, ``forget_files.PassageRecord``) is checked on its text instead.
PASSAGE_REQUIRED_COLUMNS = ("id", "text", "subject")
PASSAGE_TEXT_COLUMNS = ("id", "text")
NORMALIZED_QUESTION = "question_normalized"
SPLIT_NAMES = ("forget", "retain")
_NON_BLANK = r"\S"
_TYPE_SUFFIX = "_type"
_ABSENT = object()


@dataclass(frozen=True)
class ValidationBounds:
    min_forget: int
    max_forget: int
    min_retain: int
    min_question_chars: int
    max_question_chars: int
    min_answer_chars: int
    max_answer_chars: int
    min_passage_chars: int = 1
    max_passage_chars: int = 1_000_000

    def __post_init__(self) -> None:
        pairs = {
            "forget size": (self.min_forget, self.max_forget),
            "question chars": (self.min_question_chars, self.max_question_chars),
            "answer chars": (self.min_answer_chars, self.max_answer_chars),
            "passage chars": (self.min_passage_chars, self.max_passage_chars),
        }
        for name, (low, high) in pairs.items():
            if low < 0 or high < low:
                raise ValueError(f"ValidationBounds {name}: need 0 <= min <= max, got [{low}, {high}]")
        if self.min_retain < 0:
            raise ValueError(f"ValidationBounds min_retain must be >= 0, got {self.min_retain}")


# --------------------------------------------------------------------------- frames


def _field_value(record: Any, name: str) -> Any:
    if isinstance(record, Mapping):
        return record.get(name, _ABSENT)
    return getattr(record, name, _ABSENT)


def _is_missing(value: Any) -> bool:
    if value is _ABSENT or value is None or value is pd.NA:
        return True
    return isinstance(value, float) and math.isnan(value)


def _type_name(value: Any) -> str | None:
    return None if _is_missing(value) else type(value).__name__


def _frame(records: Sequence[Any]) -> pd.DataFrame:
    """Text columns hold str or null only, so GX string expectations never see odd objects; the
    value's type goes to ``<field>_type``. A field absent from every record gets no column."""
    columns: dict[str, list] = {}
    for name in (*REQUIRED_COLUMNS, "text"):
        values = [_field_value(r, name) for r in records]
        if values and all(v is _ABSENT for v in values):
            continue
        columns[name] = [v if isinstance(v, str) else None for v in values]
        columns[name + _TYPE_SUFFIX] = [_type_name(v) for v in values]
    if "question" in columns:
        columns[NORMALIZED_QUESTION] = [q if q is None else normalize_text(q) for q in columns["question"]]
    return pd.DataFrame(columns, index=pd.RangeIndex(len(records)), dtype=object)


def _values(frame: pd.DataFrame, column: str) -> list[str]:
    if column not in frame:
        return []
    return sorted({v for v in frame[column] if isinstance(v, str)})


def _is_passages(frame: pd.DataFrame) -> bool:
    return "text" in frame and "question" not in frame


def _has_any_subject(frame: pd.DataFrame) -> bool:
    return "subject" in frame and any(isinstance(s, str) and s.strip() for s in frame["subject"])


# --------------------------------------------------------------------------- expectations


def _meta(column: str | None, detail: str, safe_values: bool = False) -> dict:
    # safe_values: the unexpected values are type names, not data, so the report may show them.
    return {"column": column, "detail": detail, "safe_values": safe_values}


def _text_expectations(gxe: Any, frame: pd.DataFrame) -> list:
    out = []
    for name in PASSAGE_TEXT_COLUMNS if _is_passages(frame) else TEXT_COLUMNS:
        if name not in frame:
            continue
        type_column = name + _TYPE_SUFFIX
        out += [
            gxe.ExpectColumnValuesToNotBeNull(column=type_column, meta=_meta(name, "value missing or null")),
            gxe.ExpectColumnValuesToBeInSet(
                column=type_column, value_set=["str"], meta=_meta(name, "value is not a string", True)
            ),
            gxe.ExpectColumnValuesToMatchRegex(column=name, regex=_NON_BLANK, meta=_meta(name, "empty or blank")),
        ]
    if "subject" in frame:
        out.append(
            gxe.ExpectColumnValuesToBeInSet(
                column="subject" + _TYPE_SUFFIX,
                value_set=["str"],
                meta=_meta("subject", "not a string", True),
            )
        )
    if "id" in frame:
        out.append(gxe.ExpectColumnValuesToBeUnique(column="id", meta=_meta("id", "duplicate id in this split")))
    return out


def _length_expectations(gxe: Any, frame: pd.DataFrame, bounds: ValidationBounds) -> list:
    limits = {
        "question": (bounds.min_question_chars, bounds.max_question_chars),
        "answer": (bounds.min_answer_chars, bounds.max_answer_chars),
        "text": (bounds.min_passage_chars, bounds.max_passage_chars),
    }
    return [
        gxe.ExpectColumnValueLengthsToBeBetween(
            column=name,
            min_value=low,
            max_value=high,
            meta=_meta(name, f"length outside [{low}, {high}] chars"),
        )
        for name, (low, high) in limits.items()
        if name in frame
    ]


def _size_expectation(gxe: Any, split: str, bounds: ValidationBounds) -> Any:
    if split == "forget":
        low, high = bounds.min_forget, bounds.max_forget
    else:
        low, high = bounds.min_retain, None
    expected = f"[{low}, {high}]" if high is not None else f">= {low}"
    detail = f"{split} size (records) must be {expected}"
    return gxe.ExpectTableRowCountToBeBetween(min_value=low, max_value=high, meta=_meta(None, detail))


def _leakage_expectations(gxe: Any, frame: pd.DataFrame, other: pd.DataFrame, other_split: str) -> list:
    out = []
    for column, source in ((NORMALIZED_QUESTION, "question"), ("id", "id")):
        value_set = _values(other, column)
        # GX rejects an empty value_set; with nothing on the other side there is nothing to leak.
        if column in frame and value_set:
            detail = f"{source} also in {other_split} (leakage)"
            out.append(
                gxe.ExpectColumnValuesToNotBeInSet(column=column, value_set=value_set, meta=_meta(source, detail))
            )
    return out


def _subject_expectations(gxe: Any, frame: pd.DataFrame) -> list:
    if not _has_any_subject(frame):
        return []
    detail = "forget record without a subject while others have one"
    return [
        gxe.ExpectColumnValuesToNotBeNull(column="subject", meta=_meta("subject", detail)),
        gxe.ExpectColumnValuesToMatchRegex(column="subject", regex=_NON_BLANK, meta=_meta("subject", detail)),
    ]


def _suite_expectations(
    gxe: Any, split: str, frame: pd.DataFrame, other: pd.DataFrame, bounds: ValidationBounds
) -> list:
    other_split = next(s for s in SPLIT_NAMES if s != split)
    required = PASSAGE_REQUIRED_COLUMNS if _is_passages(frame) else REQUIRED_COLUMNS
    columns = gxe.ExpectTableColumnsToMatchSet(
        column_set=list(required), exact_match=False, meta=_meta(None, "required columns")
    )
    expectations = [columns, _size_expectation(gxe, split, bounds)]
    expectations += _text_expectations(gxe, frame) + _length_expectations(gxe, frame, bounds)
    expectations += _leakage_expectations(gxe, frame, other, other_split)
    if split == "forget":
        expectations += _subject_expectations(gxe, frame)
    # GX returns results in its own order; this restores ours for a stable report.
    for position, expectation in enumerate(expectations):
        expectation.meta = {**expectation.meta, "order": position}
    return expectations


# --------------------------------------------------------------------------- running GX


def _batch_definition(gx: Any) -> Any:
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    # In-memory stores, no temp docs site, no analytics, no tqdm bars: creating this costs milliseconds.
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    context = gx.get_context(mode="ephemeral", project_config=config)
    asset = context.data_sources.add_pandas("records").add_dataframe_asset("split")
    return asset.add_batch_definition_whole_dataframe("whole")


def _run_suite(gx: Any, batch_definition: Any, split: str, frame: pd.DataFrame, expectations: list) -> Any:
    suite = gx.ExpectationSuite(name=f"{split}_records", expectations=expectations)
    batch = batch_definition.get_batch(batch_parameters={"dataframe": frame})
    return batch.validate(suite, result_format="COMPLETE")


def _raised(result: Any) -> bool:
    info = result.exception_info or {}
    if "raised_exception" in info:
        return bool(info["raised_exception"])
    return any(isinstance(v, dict) and v.get("raised_exception") for v in info.values())


def _rows(result: Any) -> list[int]:
    return sorted(int(i) for i in (result.result or {}).get("unexpected_index_list") or [])


def _unexpected_summary(outcome: Mapping, meta: Mapping) -> str:
    summary = f"{outcome.get('unexpected_count', 0)} of {outcome.get('element_count', 0)} rows"
    if meta.get("safe_values"):
        found = sorted({str(v) for v in outcome.get("partial_unexpected_list") or []})
        summary += f" (found {', '.join(found)})"
    return summary


def _detail(result: Any) -> str:
    meta = result.expectation_config.meta or {}
    detail = meta.get("detail", "")
    outcome = result.result or {}
    if _raised(result):
        # The exception text is left out: pandas messages may quote the offending value.
        return f"{detail}: expectation could not be evaluated"
    missing = (outcome.get("details") or {}).get("mismatched", {}).get("missing")
    if missing:
        return f"{detail}: missing column(s) {', '.join(sorted(missing))}"
    if "unexpected_count" not in outcome:
        # Table-level expectations (row count) observe one number, not rows.
        return f"{detail}: observed {outcome.get('observed_value')}"
    return f"{detail}: {_unexpected_summary(outcome, meta)}"


def _order(result: Any) -> int:
    return int((result.expectation_config.meta or {}).get("order", 0))


def _check(result: Any, split: str) -> dict:
    meta = result.expectation_config.meta or {}
    return {
        "expectation": result.expectation_config.type,
        "split": split,
        "column": meta.get("column"),
        "success": bool(result.success),
        "unexpected_count": int((result.result or {}).get("unexpected_count") or 0),
    }


def _failure(result: Any, split: str) -> ExpectationFailure:
    meta = result.expectation_config.meta or {}
    return ExpectationFailure(
        expectation=result.expectation_config.type,
        split=split,
        column=meta.get("column"),
        rows=_rows(result),
        detail=_detail(result),
    )


def _statistics(suite_results: Mapping[str, Any], frames: Mapping[str, pd.DataFrame]) -> dict:
    keys = ("evaluated_expectations", "successful_expectations", "unsuccessful_expectations")
    stats: dict[str, Any] = {k: sum(int(r.statistics.get(k) or 0) for r in suite_results.values()) for k in keys}
    evaluated = stats["evaluated_expectations"]
    stats["success_percent"] = 100.0 * stats["successful_expectations"] / evaluated if evaluated else None
    for split, frame in frames.items():
        subjects = [s for s in frame.get("subject", []) if isinstance(s, str) and s.strip()]
        stats[f"{split}_records"] = len(frame)
        stats[f"{split}_subjects"] = len(set(subjects))
        stats[f"{split}_records_with_subject"] = len(subjects)
    return stats


def validate_forget_retain(
    forget: Sequence[Any], retain: Sequence[Any], bounds: ValidationBounds, source: str = "forget set"
) -> ValidationReport:
    """Run the forget/retain suite. Records are QARecords (or mappings with the same fields).

    Never raises on bad data: every problem is a failure in the report. Use ``require_valid`` to stop.
    """
    import great_expectations as gx
    import great_expectations.expectations as gxe

    frames = {"forget": _frame(forget), "retain": _frame(retain)}
    batch_definition = _batch_definition(gx)
    suite_results, checks, failures = {}, [], []
    for split in SPLIT_NAMES:
        other = frames[next(s for s in SPLIT_NAMES if s != split)]
        expectations = _suite_expectations(gxe, split, frames[split], other, bounds)
        suite_results[split] = _run_suite(gx, batch_definition, split, frames[split], expectations)
        for result in sorted(suite_results[split].results, key=_order):
            checks.append(_check(result, split))
            if not result.success:
                failures.append(_failure(result, split))
    return ValidationReport(
        success=all(r.success for r in suite_results.values()),
        statistics=_statistics(suite_results, frames),
        failures=failures,
        checks=checks,
        source=source,
    )


def check_request(
    forget: Sequence[Any], retain: Sequence[Any], bounds: Mapping[str, Any], source: str
) -> ValidationReport:
    """A request's forget set against the profile's retain split (``validation:`` in params.yaml as
    ``bounds``): the report, or ``ForgetSetValidationError`` naming every failed expectation. Writes
    nothing (the GX context is ephemeral), so it runs before any run is opened or folder made.

    A passing check is remembered for the process by its inputs' content: the CLI checks a request
    before Prefect starts and the request flow checks it again as its first step, and the suite then
    runs once. A failing check is never remembered."""
    key = _request_key(forget, retain, bounds, source)
    if key not in _PASSED_REQUESTS:
        report = validate_forget_retain(forget, retain, ValidationBounds(**bounds), source=source)
        require_valid(report, source)
        _PASSED_REQUESTS[key] = report
    return copy.deepcopy(_PASSED_REQUESTS[key])


_PASSED_REQUESTS: dict[str, ValidationReport] = {}


def _request_key(forget: Sequence[Any], retain: Sequence[Any], bounds: Mapping[str, Any], source: str) -> str:
    # Records are frozen dataclasses or mappings: their repr holds every field, in a fixed order.
    content = repr((list(forget), list(retain), sorted(bounds.items()), source))
    return hashlib.sha256(content.encode()).hexdigest()
