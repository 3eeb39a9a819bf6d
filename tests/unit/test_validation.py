"""The Great Expectations forget/retain suite: each failure found with expectation, split, column, rows."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

from codeunlearn.data.records import DataError, QARecord, load_jsonl  # noqa: E402
from codeunlearn.data.tofu import load_qa_file  # noqa: E402
from codeunlearn.data.validation import ValidationBounds, validate_forget_retain  # noqa: E402
from codeunlearn.data.validation_report import (  # noqa: E402
    ExpectationFailure,
    ForgetSetValidationError,
    ValidationReport,
    require_valid,
)
from tests.conftest import SHARED_DATA

TOFU_DIR = SHARED_DATA / "tofu"
BOUNDS = ValidationBounds(
    min_forget=3,
    max_forget=50,
    min_retain=3,
    min_question_chars=5,
    max_question_chars=200,
    min_answer_chars=1,
    max_answer_chars=100,
)
SECRET = "ZEBRA-7731 answered the secret"


def _records(split: str, n: int, subject: bool = True) -> list[QARecord]:
    return [
        QARecord(
            id=f"{split}-{i:04d}",
            question=f"What did {split} author {i} write?",
            answer=f"{SECRET} {split} {i}",
            subject=f"{split}-author-{i // 2}" if subject else "",
        )
        for i in range(n)
    ]


def _set(records: list, row: int, **changes: object) -> list:
    out = list(records)
    out[row] = replace(out[row], **changes)
    return out


def _failures(report: ValidationReport, expectation: str, split: str) -> list[ExpectationFailure]:
    return [f for f in report.failures if f.expectation == expectation and f.split == split]


def _only(report: ValidationReport, expectation: str, split: str, column: str | None) -> ExpectationFailure:
    found = [f for f in _failures(report, expectation, split) if f.column == column]
    assert len(found) == 1, report.failures
    return found[0]


@pytest.fixture(scope="module")
def forget() -> list[QARecord]:
    return _records("forget", 6)


@pytest.fixture(scope="module")
def retain() -> list[QARecord]:
    return _records("retain", 8)


def test_good_sets_pass(forget: list, retain: list) -> None:
    report = validate_forget_retain(forget, retain, BOUNDS)
    assert report.success and report.failures == []
    stats = report.statistics
    assert stats["unsuccessful_expectations"] == 0 and stats["evaluated_expectations"] > 10
    assert (stats["forget_records"], stats["forget_subjects"], stats["retain_records"]) == (6, 3, 8)
    require_valid(report, "forget set")


def test_missing_field_is_a_load_error(tmp_path: Path) -> None:
    path = tmp_path / "forget.jsonl"
    path.write_text('{"question": "Who is it?", "answer": "A."}\n{"question": "Who else?"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2 \(row 1, 0-based\), field 'answer': missing"):
        load_jsonl(path)


def test_missing_field_in_raw_mappings_is_caught(retain: list) -> None:
    rows = [{"id": f"m{i}", "question": f"Question number {i}?", "answer": "x", "subject": "s"} for i in range(4)]
    del rows[2]["answer"]
    report = validate_forget_retain(rows, retain, BOUNDS)
    assert _only(report, "expect_column_values_to_not_be_null", "forget", "answer").rows == [2]
    no_answers = [{"id": f"m{i}", "question": f"Question number {i}?"} for i in range(4)]
    failure = _only(
        validate_forget_retain(no_answers, retain, BOUNDS),
        "expect_table_columns_to_match_set",
        "forget",
        None,
    )
    assert "answer" in failure.detail and "subject" in failure.detail


def test_a_request_checked_twice_runs_the_suite_once_and_a_failure_every_time(
    forget: list, retain: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI's early check and the flow's first step see the same request: one suite run between them."""
    from codeunlearn.data import validation

    runs = []
    real = validation.validate_forget_retain

    def counted(*args: object, **kwargs: object) -> ValidationReport:
        runs.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(validation, "validate_forget_retain", counted)
    monkeypatch.setattr(validation, "_PASSED_REQUESTS", {})
    bounds = vars(BOUNDS)
    first = validation.check_request(forget, retain, bounds, "forget.jsonl")
    again = validation.check_request(list(forget), list(retain), dict(bounds), "forget.jsonl")
    assert len(runs) == 1 and again == first and again is not first
    validation.check_request(_set(forget, 1, answer="another answer"), retain, bounds, "forget.jsonl")
    assert len(runs) == 2  # other content: checked afresh
    bad = _set(forget, 4, answer="  \n ")
    for _ in range(2):
        with pytest.raises(ForgetSetValidationError):
            validation.check_request(bad, retain, bounds, "forget.jsonl")
    assert len(runs) == 4  # a failure is never remembered


def test_empty_answer(forget: list, retain: list) -> None:
    report = validate_forget_retain(_set(forget, 4, answer="  \n "), retain, BOUNDS)
    assert not report.success
    assert _only(report, "expect_column_values_to_match_regex", "forget", "answer").rows == [4]


def test_duplicate_id_within_and_across_splits(forget: list, retain: list) -> None:
    report = validate_forget_retain(_set(forget, 5, id="forget-0001"), _set(retain, 3, id="forget-0000"), BOUNDS)
    assert _only(report, "expect_column_values_to_be_unique", "forget", "id").rows == [1, 5]
    assert _only(report, "expect_column_values_to_not_be_in_set", "forget", "id").rows == [0]
    assert _only(report, "expect_column_values_to_not_be_in_set", "retain", "id").rows == [3]


def test_forget_retain_question_overlap_rows_in_each_split(forget: list, retain: list) -> None:
    leaked = "  " + forget[2].question.upper().replace(" ", "   \t") + " "
    report = validate_forget_retain(forget, _set(retain, 6, question=leaked), BOUNDS)
    assert _only(report, "expect_column_values_to_not_be_in_set", "forget", "question").rows == [2]
    assert _only(report, "expect_column_values_to_not_be_in_set", "retain", "question").rows == [6]
    assert [f.column for f in report.failures] == ["question", "question"]


def test_repeated_question_inside_one_split_is_not_leakage(forget: list, retain: list) -> None:
    report = validate_forget_retain(forget, _set(retain, 1, question=retain[0].question), BOUNDS)
    assert report.success, report.failures


def test_wrong_type_is_caught_at_load_and_in_validation(tmp_path: Path, forget: list, retain: list) -> None:
    path = tmp_path / "forget.jsonl"
    path.write_text('{"question": "Who is it?", "answer": 12}\n', encoding="utf-8")
    with pytest.raises(DataError, match="field 'answer': expected a string, got int"):
        load_jsonl(path)
    report = validate_forget_retain(_set(forget, 3, answer=12), retain, BOUNDS)
    failure = _only(report, "expect_column_values_to_be_in_set", "forget", "answer")
    assert failure.rows == [3] and "int" in failure.detail
    assert len(report.failures) == 1


def test_odd_values_do_not_crash(forget: list, retain: list) -> None:
    odd = _set(forget, 0, id=("t",), question=["a list"], answer={"a": 1}, subject=float("nan"))
    odd = _set(odd, 1, answer=None, question=b"bytes")
    report = validate_forget_retain(odd, retain, BOUNDS)
    assert _only(report, "expect_column_values_to_be_in_set", "forget", "answer").rows == [0]
    assert _only(report, "expect_column_values_to_not_be_null", "forget", "answer").rows == [1]
    assert _only(report, "expect_column_values_to_be_in_set", "forget", "question").rows == [0, 1]
    assert _only(report, "expect_column_values_to_not_be_null", "forget", "subject").rows == [0]
    json.dumps(report.to_dict())


def test_too_small_forget_and_retain_sets(forget: list, retain: list) -> None:
    report = validate_forget_retain(forget[:2], retain[:1], BOUNDS)
    forget_size = _only(report, "expect_table_row_count_to_be_between", "forget", None)
    assert forget_size.rows == [] and "observed 2" in forget_size.detail and "[3, 50]" in forget_size.detail
    assert "observed 1" in _only(report, "expect_table_row_count_to_be_between", "retain", None).detail


def test_too_long_answer_and_too_short_question(forget: list, retain: list) -> None:
    report = validate_forget_retain(_set(forget, 2, answer="x" * 101), _set(retain, 7, question="Why?"), BOUNDS)
    assert _only(report, "expect_column_value_lengths_to_be_between", "forget", "answer").rows == [2]
    assert _only(report, "expect_column_value_lengths_to_be_between", "retain", "question").rows == [7]


def test_subject_coverage_is_all_or_none(forget: list, retain: list) -> None:
    partial = validate_forget_retain(_set(forget, 3, subject=""), retain, BOUNDS)
    assert _only(partial, "expect_column_values_to_match_regex", "forget", "subject").rows == [3]
    generic = validate_forget_retain(_records("forget", 6, subject=False), retain, BOUNDS)
    assert generic.success and generic.statistics["forget_subjects"] == 0


def test_error_message_names_expectation_split_column_rows(forget: list, retain: list) -> None:
    bad = _set(_set(forget, 4, answer=""), 5, id="forget-0001")
    with pytest.raises(ForgetSetValidationError) as info:
        require_valid(validate_forget_retain(bad, retain, BOUNDS), "forget.jsonl")
    message = str(info.value)
    # The empty answer also breaks the 1-char minimum length: two expectations, both named.
    assert message.startswith("forget.jsonl failed validation (3 of ")
    assert "forget: expect_column_value_lengths_to_be_between column 'answer' rows [4]" in message
    assert "forget: expect_column_values_to_match_regex column 'answer' rows [4]" in message
    assert "forget: expect_column_values_to_be_unique column 'id' rows [1, 5]" in message
    assert not info.value.report.success


def test_error_message_shows_first_ten_rows(retain: list) -> None:
    many = [replace(r, answer="") for r in _records("forget", 14)]
    with pytest.raises(ForgetSetValidationError, match=r"rows \[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, \.\.\. and 4 more\]"):
        require_valid(validate_forget_retain(many, retain, BOUNDS), "forget set")


def test_report_outputs_carry_no_raw_text(forget: list, retain: list) -> None:
    bad = _set(_set(forget, 1, answer=SECRET + " too long " + "y" * 100), 2, question=retain[0].question)
    report = validate_forget_retain(bad, retain, BOUNDS, source="forget.jsonl")
    assert not report.success
    as_json = json.dumps(report.to_dict())
    page = report.to_html()
    for text in (SECRET, retain[0].question, forget[0].question):
        assert text not in as_json and text not in page
    assert page.startswith("<!doctype html>") and "expect_column_value_lengths_to_be_between" in page
    assert json.loads(as_json)["failures"][0]["rows"]


def test_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="answer chars"):
        replace(BOUNDS, min_answer_chars=10, max_answer_chars=5)


def test_real_tofu_pairing_passes_and_full_leaks() -> None:
    if not TOFU_DIR.is_dir():
        pytest.skip(f"TOFU data directory {TOFU_DIR} is missing")
    forget10 = load_qa_file(TOFU_DIR / "forget10.json")
    bounds = replace(BOUNDS, max_forget=400, min_retain=1, max_question_chars=2000, max_answer_chars=4000)
    assert validate_forget_retain(forget10, load_qa_file(TOFU_DIR / "retain90.json"), bounds).success
    leaky = validate_forget_retain(forget10, load_qa_file(TOFU_DIR / "full.json"), bounds)
    assert _only(leaky, "expect_column_values_to_not_be_in_set", "forget", "question").rows == list(range(400))
    assert _only(leaky, "expect_column_values_to_not_be_in_set", "retain", "question").rows == list(range(3600, 4000))
