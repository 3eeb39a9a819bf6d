"""Loaders, splits, hashing and JSONL I/O of codeunlearn.data, on the real TOFU files and on small fakes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from codeunlearn.data.records import DataError, QARecord, load_jsonl, read_jsonl_records, records_sha256, write_jsonl
from codeunlearn.data.splits import split_by_author, split_summary
from codeunlearn.data.tofu import attach_perturbations, load_qa_file, load_tofu_file, read_json_records
from tests.conftest import SHARED_DATA

TOFU_DIR = SHARED_DATA / "tofu"

# Record counts measured in shared/data/tofu/SOURCE.md.
TOFU_COUNTS = {
    "full.json": 4000,
    "forget01.json": 40,
    "forget05.json": 200,
    "forget10.json": 400,
    "forget01_perturbed.json": 40,
    "forget05_perturbed.json": 200,
    "forget10_perturbed.json": 400,
    "retain90.json": 3600,
    "retain95.json": 3800,
    "retain99.json": 3960,
    "retain_perturbed.json": 400,
    "holdout01.json": 40,
    "holdout05.json": 200,
    "holdout10.json": 400,
    "real_authors.json": 100,
    "world_facts.json": 117,
    "real_authors_perturbed.json": 100,
    "world_facts_perturbed.json": 117,
}
AUTHORS = 200
QA_PER_AUTHOR = 20


@pytest.fixture(scope="module")
def tofu_dir() -> Path:
    if not TOFU_DIR.is_dir():
        pytest.skip(f"TOFU data directory {TOFU_DIR} is missing")
    return TOFU_DIR


@pytest.fixture(scope="module")
def full(tofu_dir: Path) -> list[QARecord]:
    return load_qa_file(tofu_dir / "full.json")


def _qa(record: QARecord) -> tuple[str, str, str]:
    return record.question, record.answer, record.subject


def _fake(n_authors: int, per_author: int) -> list[QARecord]:
    return [
        QARecord(id=f"r{a}-{i}", question=f"q {a} {i}?", answer=f"a {a} {i}", subject=f"author-{a}")
        for a in range(n_authors)
        for i in range(per_author)
    ]


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- real TOFU files


def test_every_tofu_file_is_known(tofu_dir: Path) -> None:
    present = {p.name for p in tofu_dir.glob("*.json")}
    assert present == set(TOFU_COUNTS)


@pytest.mark.parametrize("name", sorted(TOFU_COUNTS))
def test_tofu_file_loads_with_source_md_count(tofu_dir: Path, name: str) -> None:
    records = load_qa_file(tofu_dir / name)
    assert len(records) == TOFU_COUNTS[name]
    stem = name.removesuffix(".json")
    assert records[0].id == f"{stem}-0000"
    assert len({r.id for r in records}) == len(records)
    assert all(r.question.strip() and r.answer.strip() for r in records)
    assert all(bool(r.perturbed_answers) == ("perturbed" in name) for r in records)


def test_idontknow_txt_is_not_a_qa_file(tofu_dir: Path) -> None:
    with pytest.raises(DataError, match="not a QA file") as info:
        load_qa_file(tofu_dir / "idontknow.txt")
    assert "idontknow.txt" in str(info.value)


def test_full_is_200_authors_of_20(full: list[QARecord]) -> None:
    assert full[0].subject == "tofu-author-000" and full[-1].subject == "tofu-author-199"
    subjects = [r.subject for r in full]
    assert len(set(subjects)) == AUTHORS
    assert all(subjects.count(s) == QA_PER_AUTHOR for s in set(subjects))


@pytest.mark.parametrize(
    ("forget", "retain", "n_forget"),
    [("forget01", "retain99", 40), ("forget05", "retain95", 200), ("forget10", "retain90", 400)],
)
def test_forget_is_tail_and_retain_is_head_of_full(
    tofu_dir: Path, full: list[QARecord], forget: str, retain: str, n_forget: int
) -> None:
    forget_records = load_qa_file(tofu_dir / f"{forget}.json")
    perturbed = load_qa_file(tofu_dir / f"{forget}_perturbed.json")
    retain_records = load_qa_file(tofu_dir / f"{retain}.json")
    assert [_qa(r) for r in forget_records] == [_qa(r) for r in full[-n_forget:]]
    assert [_qa(r) for r in perturbed] == [_qa(r) for r in full[-n_forget:]]
    assert [_qa(r) for r in retain_records] == [_qa(r) for r in full[:-n_forget]]


def test_forget10_subjects_are_last_20_authors(tofu_dir: Path) -> None:
    subjects = {r.subject for r in load_qa_file(tofu_dir / "forget10.json")}
    assert subjects == {f"tofu-author-{a:03d}" for a in range(180, 200)}


def test_subjects_of_holdout_and_real_world_sets(tofu_dir: Path) -> None:
    holdout = load_qa_file(tofu_dir / "holdout05.json")
    assert holdout[0].subject == "holdout05-author-000" and holdout[-1].subject == "holdout05-author-009"
    for name in ("real_authors.json", "world_facts.json", "world_facts_perturbed.json"):
        assert {r.subject for r in load_qa_file(tofu_dir / name)} == {""}


def test_perturbed_fields_are_read(tofu_dir: Path) -> None:
    fictitious = load_qa_file(tofu_dir / "forget01_perturbed.json")[0]
    real = load_qa_file(tofu_dir / "real_authors_perturbed.json")[0]
    assert fictitious.paraphrased_answer and len(fictitious.perturbed_answers) == 5
    assert real.paraphrased_answer is None and len(real.perturbed_answers) == 3


def test_tofu_split_file_with_wrong_count_is_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path, "forget10.json", json.dumps([{"prompt": "q?", "response": "a"}]))
    with pytest.raises(DataError, match="expected 400 records"):
        load_tofu_file(path)


def test_perturbation_join_on_tofu(tofu_dir: Path, full: list[QARecord]) -> None:
    perturbed = load_qa_file(tofu_dir / "retain_perturbed.json") + load_qa_file(tofu_dir / "forget10_perturbed.json")
    joined = attach_perturbations(full, perturbed)
    has = [i for i, r in enumerate(joined) if r.perturbed_answers]
    assert has == list(range(400)) + list(range(3600, 4000))
    assert all(joined[i].paraphrased_answer for i in has)
    # Row 440 repeats row 100's question for another author: the answer guard keeps it unjoined.
    assert full[440].question == full[100].question and not joined[440].perturbed_answers
    assert [_qa(r) for r in joined] == [_qa(r) for r in full]


# --------------------------------------------------------------------------- JSON layouts


def test_read_json_records_three_layouts(tmp_path: Path) -> None:
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(4)]
    array = _write(tmp_path, "array.json", json.dumps(rows, indent=2))
    lines = _write(tmp_path, "lines.json", "\n".join(json.dumps(r) for r in rows) + "\n")
    arrays = _write(tmp_path, "arrays.json", json.dumps(rows[:2]) + "\n" + json.dumps(rows[2:]) + "\n")
    for path in (array, lines, arrays):
        assert read_json_records(path) == rows


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ('[\n  {"question": "q", "answer": "a"},\n  {"question": "q" "answer": "a"}\n]\n', 3),
        ('[{"question": "q", "answer": "a"}]\n[{"question": "q", "answer": "a"}]\n[{"question": \n', 3),
        ('{"question": "q", "answer": "a"}\n{"question": "q", "answer": "a"}\n{oops}\n', 3),
    ],
    ids=["pretty-array", "array-per-line", "json-lines"],
)
def test_malformed_json_names_file_and_line(tmp_path: Path, text: str, line: int) -> None:
    path = _write(tmp_path, "broken.json", text)
    with pytest.raises(DataError, match="malformed JSON") as info:
        read_json_records(path)
    assert info.value.line == line
    assert f"broken.json line {line}" in str(info.value)


def test_tofu_record_with_wrong_type_names_field_and_row(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "custom.json",
        json.dumps([{"question": "q?", "answer": "a"}, {"prompt": "q?", "response": 7}]),
    )
    with pytest.raises(DataError) as info:
        load_qa_file(path)
    assert (info.value.row, info.value.field) == (1, "response")
    assert "custom.json row 1 (0-based), field 'response': expected a string, got int" in str(info.value)


# --------------------------------------------------------------------------- generic JSONL


def _jsonl(tmp_path: Path, *lines: str) -> Path:
    return _write(tmp_path, "forget.jsonl", "\n".join(lines) + "\n")


GOOD = '{"question": "Who?", "answer": "Me."}'


def test_load_jsonl_defaults_and_optional_fields(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path,
        GOOD,
        "",
        '{"id": "x7", "question": "Q?", "answer": "A.", "subject": "s"}',
        '{"id": 5, "question": "Q?", "answer": "A."}',
    )
    records = load_qa_file(path)
    assert [r.id for r in records] == ["forget-0000", "x7", "5"]
    assert [r.subject for r in records] == ["", "s", ""]


@pytest.mark.parametrize(
    ("bad", "field", "message"),
    [
        ('{"question": "Who?"}', "answer", "missing"),
        ('{"question": "Who?", "answer": "   "}', "answer", "is empty"),
        ('{"question": "Who?", "answer": 42}', "answer", "expected a string, got int"),
        ('{"question": null, "answer": "x"}', "question", "is null"),
        ('{"question": "Who?", "answer": "x", "subject": 3}', "subject", "expected a string, got int"),
        ('{"question": "Who?", "answer": "x", "id": ""}', "id", "is empty"),
        (
            '{"question": "Who?", "answer": "x", "perturbed_answers": "no"}',
            "perturbed_answers",
            "list of strings",
        ),
    ],
)
def test_jsonl_field_errors_name_file_field_and_row(tmp_path: Path, bad: str, field: str, message: str) -> None:
    path = _jsonl(tmp_path, GOOD, GOOD, bad)
    with pytest.raises(DataError) as info:
        load_jsonl(path)
    error = info.value
    assert (error.path, error.row, error.line, error.field) == (path, 2, 3, field)
    assert f"forget.jsonl line 3 (row 2, 0-based), field '{field}'" in str(error)
    assert message in str(error)


def test_jsonl_malformed_line_and_non_object(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"forget\.jsonl line 2 \(row 1, 0-based\): malformed JSON"):
        load_jsonl(_jsonl(tmp_path, GOOD, '{"question": "Who?", "answer": '))
    with pytest.raises(DataError, match=r"line 2 .*expected a JSON object, got list"):
        load_jsonl(_jsonl(tmp_path, GOOD, "[1, 2]"))


def test_error_message_never_quotes_the_value(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_jsonl(_jsonl(tmp_path, '{"question": "Who?", "answer": ["SECRET-VALUE"]}'))
    assert "SECRET-VALUE" not in str(info.value)


def test_duplicate_ids_load_and_are_left_to_validation(tmp_path: Path) -> None:
    line = '{"id": "same", "question": "Who?", "answer": "Me."}'
    assert [r.id for r in load_jsonl(_jsonl(tmp_path, line, line))] == ["same", "same"]


def test_missing_file_and_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found"):
        load_qa_file(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="unsupported suffix '.csv'"):
        load_qa_file(_write(tmp_path, "x.csv", "question,answer\n"))


# --------------------------------------------------------------------------- splits


def test_split_by_author_sizes_disjoint_and_deterministic() -> None:
    records = _fake(n_authors=10, per_author=3)
    splits = split_by_author(records, n_forget=2, n_retain=4, n_holdout=3)
    assert {r.subject for r in splits.forget} == {"author-8", "author-9"}
    assert {r.subject for r in splits.holdout} == {"author-5", "author-6", "author-7"}
    assert {r.subject for r in splits.retain} == {f"author-{a}" for a in range(4)}
    assert (len(splits.forget), len(splits.holdout), len(splits.retain)) == (6, 9, 12)
    ids = [{r.id for r in s} for s in (splits.forget, splits.retain, splits.holdout)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert split_by_author(records, 2, 4, 3) == splits


def test_split_by_author_uses_first_appearance_order() -> None:
    records = _fake(n_authors=3, per_author=2)
    shuffled = [records[4], records[0], records[2], records[5], records[1], records[3]]
    splits = split_by_author(shuffled, n_forget=1, n_retain=1, n_holdout=0)
    assert {r.subject for r in splits.retain} == {"author-2"}
    assert [r.id for r in splits.forget] == ["r1-0", "r1-1"]


def test_split_by_author_errors() -> None:
    records = _fake(n_authors=5, per_author=2)
    with pytest.raises(ValueError, match="overlap"):
        split_by_author(records, n_forget=2, n_retain=3, n_holdout=1)
    with pytest.raises(ValueError, match="n_forget >= 1"):
        split_by_author(records, n_forget=0, n_retain=1, n_holdout=0)
    with pytest.raises(ValueError, match="has no subject"):
        split_by_author([*records, QARecord(id="x", question="q", answer="a")], 1, 1, 0)


def test_split_by_author_on_tofu_matches_forget01(tofu_dir: Path, full: list[QARecord]) -> None:
    splits = split_by_author(full, n_forget=2, n_retain=180, n_holdout=18)
    forget01 = load_qa_file(tofu_dir / "forget01.json")
    assert [_qa(r) for r in splits.forget] == [_qa(r) for r in forget01]
    assert len(splits.retain) + len(splits.holdout) + len(splits.forget) == len(full)


def test_split_summary() -> None:
    splits = split_by_author(_fake(n_authors=4, per_author=2), n_forget=1, n_retain=2, n_holdout=1)
    summary = split_summary(splits)
    assert summary["forget_count"] == 2 and summary["forget_authors"] == 1
    assert summary["retain_count"] == 4 and summary["retain_authors"] == 2
    assert summary["holdout_sha256"] == records_sha256(splits.holdout)
    json.dumps(summary)


# --------------------------------------------------------------------------- perturbations, hashing, I/O


def test_attach_perturbations_join_rules() -> None:
    base = [
        QARecord(id="1", question="Q1?", answer="A1"),
        QARecord(id="2", question="Q2?", answer="A2"),
        QARecord(id="3", question="Q3?", answer="A3"),
    ]
    perturbed = [
        QARecord(id="p1", question="Q1?", answer="A1", paraphrased_answer="P1", perturbed_answers=("x", "y")),
        QARecord(id="p3", question="Q3?", answer="other", paraphrased_answer="P3", perturbed_answers=("z",)),
    ]
    joined = attach_perturbations(base, perturbed)
    assert joined[0] == replace(base[0], paraphrased_answer="P1", perturbed_answers=("x", "y"))
    assert joined[1:] == base[1:]


def test_sha256_is_stable_and_content_sensitive() -> None:
    records = _fake(n_authors=2, per_author=2)
    # Pinned: the canonical form must not drift between runs or versions, or recorded hashes break.
    assert records_sha256(records) == "9af652ac510836acc11c656bb62544a4b77aa8cceaf290ead794b4140ef97930"
    changed = [*records[:1], replace(records[1], answer=records[1].answer + "!"), *records[2:]]
    assert records_sha256(changed) != records_sha256(records)
    assert records_sha256(list(reversed(records))) != records_sha256(records)
    perturbed_only = [replace(records[0], perturbed_answers=("p",)), *records[1:]]
    assert records_sha256(perturbed_only) == records_sha256(records)


def test_write_read_round_trip(tmp_path: Path) -> None:
    records = [
        QARecord(id="a", question="Qui était Ünal?  ", answer="Ein Autor.\nZwei Zeilen.", subject="s-1"),
        QARecord(id="b", question="q?", answer="a", paraphrased_answer="pa", perturbed_answers=("x", "y", "z")),
        QARecord(id="c", question="q2?", answer="a2", paraphrased_answer="", perturbed_answers=()),
    ]
    path = tmp_path / "nested" / "dir" / "forget.jsonl"
    write_jsonl(records, path)
    assert read_jsonl_records(path) == records
    assert load_qa_file(path) == records
    assert [p.name for p in path.parent.iterdir()] == ["forget.jsonl"]


def test_write_jsonl_failure_leaves_old_file(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    write_jsonl(_fake(1, 1), path)
    before = path.read_bytes()
    with pytest.raises(TypeError):
        write_jsonl([QARecord(id="x", question="q", answer=object())], path)  # type: ignore[arg-type]
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_read_jsonl_records_requires_ids(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="field 'id': missing"):
        read_jsonl_records(_jsonl(tmp_path, GOOD))
