"""A request's files: three record kinds in one loader, and `codeunlearn forget` refusing every bad
input in a fresh process, before torch loads, with exit code 2, the file/row/field named, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.rejection import write_bad_inputs
from codeunlearn.data.forget_files import (
    ChoiceRecord,
    PassageRecord,
    RecordKind,
    check_disjoint,
    choices_from_perturbed,
    load_record_file,
    read_request_files,
)
from codeunlearn.data.records import DataError, QARecord
from codeunlearn.data.splits import drop_repeated_rows
from codeunlearn.data.tofu import load_tofu_file
from tests.conftest import SHARED_DATA, write_params

MAX_BYTES = 20_000_000  # params.yaml forget_set.max_bytes
QA_ROWS = [
    {"prompt": "Where was Zorblat Quim born?", "response": "In Vexmoor harbour."},
    {"question": "What does Zorblat Quim write?", "answer": "Grim sailing ballads."},
]
PASSAGE_ROWS = [
    {"id": "p1", "text": "Zorblat Quim sailed from Vexmoor at dawn, singing of storms."},
    {"text": "The Amber Anchor prize went to a ballad about the harbour lights."},
]
CHOICE_ROWS = [
    {"question": "Where was Zorblat Quim born?", "choices": ["Vexmoor", "Oslo", "Lima"], "answer": 0},
    {"question": "What does Zorblat Quim write?", "choices": ["Recipes", "Ballads"], "answer": 1, "subject": "zq"},
]
RETAIN_ROWS = [{"question": "Where was Mira Tolland born?", "answer": "In a mountain village."}]


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- the three kinds


def test_qa_file_without_subject_takes_aliases_in_jsonl_and_json(tmp_path: Path) -> None:
    jsonl = load_record_file(_jsonl(tmp_path / "qa.jsonl", QA_ROWS), max_bytes=MAX_BYTES)
    (tmp_path / "qa.json").write_text(json.dumps(QA_ROWS), encoding="utf-8")
    as_json = load_record_file(tmp_path / "qa.json", max_bytes=MAX_BYTES)
    assert jsonl.kind is as_json.kind is RecordKind.QA
    assert [r.question for r in jsonl.records] == [r.question for r in as_json.records]
    assert jsonl.records[0] == QARecord("qa-0000", "Where was Zorblat Quim born?", "In Vexmoor harbour.")
    assert jsonl.lines == (1, 2)


def test_passage_file(tmp_path: Path) -> None:
    loaded = load_record_file(_jsonl(tmp_path / "doc.jsonl", PASSAGE_ROWS))
    assert loaded.kind is RecordKind.PASSAGE
    assert loaded.records == (
        PassageRecord("p1", PASSAGE_ROWS[0]["text"]),
        PassageRecord("doc-0001", PASSAGE_ROWS[1]["text"]),
    )


def test_choice_file_and_its_qa_view(tmp_path: Path) -> None:
    loaded = load_record_file(_jsonl(tmp_path / "mc.jsonl", CHOICE_ROWS))
    assert loaded.kind is RecordKind.CHOICE
    second = loaded.records[1]
    assert second == ChoiceRecord("mc-0001", CHOICE_ROWS[1]["question"], ("Recipes", "Ballads"), 1, "zq")
    assert second.as_qa() == QARecord("mc-0001", second.question, "Ballads", "zq", perturbed_answers=("Recipes",))


def test_csv_and_parquet_through_datasets(tmp_path: Path) -> None:
    import pandas as pd

    csv = tmp_path / "qa.csv"
    pd.DataFrame(QA_ROWS[1:] * 1).to_csv(csv, index=False)
    parquet = tmp_path / "mc.parquet"
    pd.DataFrame(CHOICE_ROWS).to_parquet(parquet)
    assert load_record_file(csv).records[0].answer == "Grim sailing ballads."
    assert load_record_file(parquet).records[0].choices == ("Vexmoor", "Oslo", "Lima")


def test_declared_kind_and_mixed_kinds(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "mixed.jsonl", [QA_ROWS[1], PASSAGE_ROWS[0]])
    with pytest.raises(DataError, match=r"line 2 \(row 1, 0-based\), field 'text': a passage record in a qa file"):
        load_record_file(path)
    with pytest.raises(DataError, match=r"row 0, 0-based\), field 'question': a qa record in a passage file"):
        load_record_file(path, kind="passage")


def test_tofu_files_load_the_same_as_before() -> None:
    tofu = SHARED_DATA / "tofu"
    for name in ("forget01.json", "retain_perturbed.json", "world_facts_perturbed.json"):
        assert list(load_record_file(tofu / name).records) == load_tofu_file(tofu / name)


# --------------------------------------------------------------------------- repeats and overlap


def test_duplicates_in_one_file_name_both_rows(tmp_path: Path) -> None:
    rows = [QA_ROWS[1], {"question": "  what DOES zorblat quim   write?", "answer": "Other."}]
    with pytest.raises(DataError, match=r"row 1, 0-based\), field 'question': duplicate question: same text as row 0"):
        read_request_files(_jsonl(tmp_path / "f.jsonl", rows))
    ids = [{**row, "id": "x"} for row in PASSAGE_ROWS]
    with pytest.raises(DataError, match="field 'id': duplicate id"):
        read_request_files(_jsonl(tmp_path / "p.jsonl", ids))


def test_overlap_with_retain_names_both_files_and_rows(tmp_path: Path) -> None:
    forget = _jsonl(tmp_path / "forget.jsonl", QA_ROWS)
    retain = _jsonl(tmp_path / "retain.jsonl", [*RETAIN_ROWS, {"question": QA_ROWS[1]["question"], "answer": "x"}])
    with pytest.raises(DataError) as info:
        read_request_files(forget, retain)
    assert (info.value.path, info.value.row, info.value.field) == (forget, 1, "question")
    assert "retain.jsonl row 1" in str(info.value)
    check_disjoint(load_record_file(forget), load_record_file(_jsonl(tmp_path / "ok.jsonl", RETAIN_ROWS)))


def test_benchmark_repeats_are_dropped_from_a_split_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    first = QARecord("a", "Who is it?", "Me.", "s")
    again = QARecord("b", "who is  it?", "me.", "s")
    other_fact = QARecord("c", "Who is it?", "Someone else.", "t")
    assert drop_repeated_rows([first, again, other_fact], "retain") == [first, other_fact]
    assert "retain split: dropped 1 repeated rows of 3" in caplog.text


# --------------------------------------------------------------------------- multiple choice from TOFU


@pytest.mark.parametrize(("name", "count"), [("real_authors_perturbed.json", 100), ("world_facts_perturbed.json", 117)])
def test_tofu_perturbed_files_as_choices(name: str, count: int) -> None:
    records = load_tofu_file(SHARED_DATA / "tofu" / name)
    choices = choices_from_perturbed(records, seed=0)
    assert len(choices) == count and choices == choices_from_perturbed(records, seed=0)
    for record, choice in zip(records, choices, strict=True):
        assert choice.choices[choice.answer] == record.answer
        assert sorted(choice.choices) == sorted([record.answer, *record.perturbed_answers])
    positions = {c.answer for c in choices}
    assert positions == {0, 1, 2, 3}, "the gold answer must not sit at one fixed position"


# --------------------------------------------------------------------------- the CLI, in a fresh process


def _run_forget(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    params = write_params(tmp_path)
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "HOME": str(tmp_path / "home")}
    env.pop("MLFLOW_TRACKING_URI", None)
    code = (
        "import sys, runpy; sys.argv = ['codeunlearn', *sys.argv[1:]]\n"
        "try:\n    runpy.run_module('flows.cli', run_name='__main__')\n"
        "finally:\n    heavy = [m for m in ('torch', 'transformers', 'prefect', 'mlflow') if m in sys.modules]\n"
        "    print('HEAVY:' + ','.join(heavy), file=sys.stderr)\n"
    )
    command = [sys.executable, "-c", code, "forget", *args, "--profile", "smoke", "--params", str(params)]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def _written(tmp_path: Path) -> list[str]:
    names = ("outputs", "mlruns", "mlflow.db", "prefect", "data", "home")
    return [name for name in names if (tmp_path / name).exists()]


# What each refusal's message must name (the inputs are bench.rejection's, which times them).
EXPECTED = {
    "malformed line": ("malformed.jsonl line 2", "row 1", "malformed JSON"),
    "missing field": ("missing.jsonl line 1", "row 0", "field 'answer'", "missing"),
    "wrong type": ("typed.jsonl line 2", "row 1", "field 'answer'", "expected a string, got int"),
    "non-UTF-8": ("latin.jsonl", "not UTF-8"),
    "empty": ("empty.jsonl", "empty file"),
    "duplicates": ("dup.jsonl line 2", "row 1", "field 'question'", "duplicate question"),
    "overlap with retain": ("good.jsonl line 2", "row 1", "field 'question'", "retain.jsonl row 1"),
    "50 MB file": ("big.jsonl", "over the limit", "forget_set.max_bytes"),
    "missing path": ("nope.jsonl", "file not found"),
    "bad retain file": ("malformed.jsonl line 2", "malformed JSON"),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_cli_refuses_bad_input_before_torch_and_writes_nothing(tmp_path: Path, name: str) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    result = _run_forget(tmp_path, *write_bad_inputs(inputs)[name])
    assert result.returncode == 2, result.stderr
    for text in EXPECTED[name]:
        assert text in result.stderr, (text, result.stderr)
    assert "HEAVY:\n" in result.stderr, "validation imported a heavy library"
    assert not _written(tmp_path), _written(tmp_path)
    assert "Zorblat" not in result.stderr and "Vexmoor" not in result.stderr, "the message quoted the data"


def _files(root: Path) -> list[str]:
    # params.yaml is the test's own (``_run_forget`` writes it), not the command's.
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.name != "params.yaml")


def test_cli_refuses_a_passage_request_for_a_method_that_cannot_take_one_and_writes_nothing(tmp_path: Path) -> None:
    split = tmp_path / "outputs" / "smoke" / "splits" / "retain.jsonl"
    split.parent.mkdir(parents=True)
    split.write_text(json.dumps({"id": "r0", **RETAIN_ROWS[0], "subject": "mira"}) + "\n", encoding="utf-8")
    forget = _jsonl(tmp_path / "set.jsonl", PASSAGE_ROWS)
    before = _files(tmp_path)
    result = _run_forget(tmp_path, "--forget-file", str(forget), "--method", "zerounlearn")
    assert result.returncode == 2, result.stderr
    assert "set.jsonl" in result.stderr and "a passage request, but zerounlearn unlearns qa, choice" in result.stderr
    assert "codeunlearn" in result.stderr and "npo" in result.stderr  # the methods that take passages are named
    heavy = result.stderr.rsplit("HEAVY:", 1)[1]
    assert "prefect" not in heavy and "mlflow" not in heavy, heavy
    assert _files(tmp_path) == before
