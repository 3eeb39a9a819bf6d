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


def test_a_neighbour_file_of_multiple_choice_questions_is_refused(tmp_path, monkeypatch):
    """A neighbour set holds QAs (scored by ROUGE) or passages (by VerbMem), never multiple choice."""
    from flows.cli import app

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = write_params(tmp_path)
    forget = tmp_path / "forget.jsonl"
    forget.write_text('{"question": "Who is Zorblat Quim?", "answer": "A sailor."}\n')
    neighbours = tmp_path / "neighbours.jsonl"
    neighbours.write_text('{"question": "Who is Mira Tolland?", "choices": ["A writer.", "A sailor."], "answer": 0}\n')
    args = ["forget", "--forget-file", str(forget), "--retain-file", str(neighbours), "--profile", "smoke"]
    result = CliRunner().invoke(app, [*args, "--params", str(params)])
    assert result.exit_code == 2
    assert "neighbours.jsonl" in result.output and "qa or passage records" in result.output
    assert not (tmp_path / "outputs").exists()


def _profile_with_retain_split(tmp_path):
    from codeunlearn.data.records import QARecord, write_jsonl
    from tests.helpers import FORGET_FACTS, RETAIN_FACTS

    params = write_params(tmp_path)
    retain = [QARecord(f"retain-{i}", q, a, s) for i, (q, a, s) in enumerate(RETAIN_FACTS)]
    write_jsonl(retain, tmp_path / "outputs" / "smoke" / "splits" / "retain.jsonl")
    leaking = tmp_path / "forget.jsonl"  # the forget facts plus one of the profile's own retain QAs
    rows = [(q, a) for q, a in FORGET_FACTS] + [RETAIN_FACTS[0][:2]]
    leaking.write_text("".join(f'{{"question": "{q}", "answer": "{a}", "subject": "zq"}}\n' for q, a in rows))
    return params, leaking


def _written(tmp_path) -> set[str]:
    return {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")}


def test_a_forget_set_overlapping_the_profiles_retain_split_is_refused_before_any_run(tmp_path, monkeypatch):
    import sys

    from flows.cli import app

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params, leaking = _profile_with_retain_split(tmp_path)
    before = _written(tmp_path)
    monkeypatch.setitem(sys.modules, "flows.request", None)  # reaching the flow (Prefect, MLflow) would fail
    args = ["forget", "--forget-file", str(leaking), "--profile", "smoke", "--params", str(params)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "forget.jsonl" in result.output and "leakage" in result.output
    assert _written(tmp_path) == before, "a rejected request writes nothing: no mlflow.db, mlruns or outputs"


def test_the_request_flow_checks_before_tracking_starts(tmp_path, monkeypatch):
    from codeunlearn.data.validation_report import ForgetSetValidationError
    from flows.request import unlearn

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params, leaking = _profile_with_retain_split(tmp_path)
    before = _written(tmp_path)
    with pytest.raises(ForgetSetValidationError):
        unlearn.fn(forget_file=str(leaking), profile="smoke", params_file=str(params))
    assert _written(tmp_path) == before
