"""The `codeunlearn forget` command refuses a bad forget file with a clear message and writes nothing."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from tests.conftest import SHARED_DATA, write_params

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "tofu").exists(), reason="needs ../shared/data/tofu")


def test_malformed_forget_file_is_refused_naming_file_field_and_row(tmp_path, monkeypatch):
    from flows.cli import app

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = write_params(tmp_path)
    bad = tmp_path / "forget.jsonl"
    bad.write_text(
        '{"question": "Who is Zorblat Quim?", "answer": "A sailor."}\n{"question": "Where?", "answer": ""}\n'
    )
    args = ["forget", "--forget-file", str(bad), "--profile", "smoke", "--params", str(params)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    message = result.output
    assert "forget.jsonl" in message and "answer" in message and "row 1" in message
    assert not (tmp_path / "outputs").exists(), "a refused request must not write outputs"


def test_a_neighbour_file_of_passages_is_refused(tmp_path, monkeypatch):
    from flows.cli import app

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = write_params(tmp_path)
    forget = tmp_path / "forget.jsonl"
    forget.write_text('{"question": "Who is Zorblat Quim?", "answer": "A sailor."}\n')
    neighbours = tmp_path / "neighbours.jsonl"
    neighbours.write_text('{"text": "A long article about sailors."}\n')
    args = ["forget", "--forget-file", str(forget), "--retain-file", str(neighbours), "--profile", "smoke"]
    result = CliRunner().invoke(app, [*args, "--params", str(params)])
    assert result.exit_code == 2
    assert "neighbours.jsonl" in result.output and "QA records" in result.output
    assert not (tmp_path / "outputs").exists()
