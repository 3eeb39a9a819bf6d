"""A request's audit on a tiny setup (``tests.helpers.build_tiny_setup``): a made-up forget/retain set, a
tiny Llama with an (untrained) codebook saved as the pipeline's codebook model, and the request flow's
tasks run in order (``task.fn``: no Prefect server) into a SQLite MLflow under tmp.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from codeunlearn.audit.record import record_sha256
from codeunlearn.audit.verify import verify_record
from tests.helpers import FORGET_FACTS, FORGET_PERSON, build_tiny_setup, make_writable, run_request

# --------------------------------------------------------------------------- a request on a tiny setup


@pytest.fixture(scope="module")
def tiny_request(tmp_path_factory):
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    tmp = tmp_path_factory.mktemp("audit")
    params_file, forget_file = build_tiny_setup(tmp)
    return tmp, params_file, forget_file, run_request(params_file, forget_file)


def test_request_writes_a_sealed_audit_record(tiny_request):
    tmp, _, forget_file, result = tiny_request
    ctx = result["ctx"]
    audit = result["audit"]
    path = Path(audit["record"])
    assert path == ctx.stage_dir("requests") / result["request_id"] / "audit.json"
    record = json.loads(path.read_text())
    assert record["record_sha256"] == audit["record_sha256"] == record_sha256(record)
    assert record["request_id"] == result["request_id"]
    assert record["method"] == "codeunlearn" and record["params_hash"] == ctx.params_hash
    assert record["forget"]["records_sha256"] == result["forget_sha256"]
    assert record["forget"]["count"] == len(FORGET_FACTS) and record["forget"]["subjects"] == 1
    assert record["models"]["after"] == result["registered"]
    assert record["models"]["before"]["previous_unlearned"] is None
    codebook = json.loads((ctx.stage_dir("models") / "codebook" / "codebook.json").read_text())
    assert record["mask"]["codebook_sha256"] == codebook["sha256"]
    assert record["mask"]["active_disabled_codes"] == record["mask"]["disabled_codes"] > 0
    assert set(record["metrics"]) == {"before", "after", "quantization", "relearn", "timing_s"}
    assert record["metrics"]["quantization"]["rtn_w4_g16"]["bits"] == 4
    assert "recovery" in record["metrics"]["relearn"]
    assert {c["check"] for c in record["verdict"]["checks"]} == {
        "forget_rouge",
        "retain_ratio",
        "utility_ratio",
        "quant_recovery",
        "relearn_recovery",
        "neighbour_ratio",
    }
    for when in ("before", "after"):
        assert {"model_utility", "world_facts_rouge", "real_authors_rouge"} <= set(record["metrics"][when])
    assert record["verdict"]["passed"] is True and audit["passed"] is True
    names = {a["name"] for a in record["artifacts"]}
    assert {
        "forget_file",
        "deployed_mask/mask.safetensors",
        "request_mask/mask.json",
        "codebook_model/codebook.safetensors",
        "codebook_model/model.safetensors",
    } <= names
    text = path.read_text()
    for question, answer in FORGET_FACTS:
        assert question not in text and answer not in text, "the forget set's text must not reach the record"
    assert FORGET_PERSON not in text


def test_audit_is_logged_to_mlflow_and_tags_the_model_version(tiny_request):
    import mlflow
    from mlflow import MlflowClient

    tmp, _, _, result = tiny_request
    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
    client = MlflowClient()
    parent = client.get_run(result["mlflow_run_id"])
    audit_run_id = parent.data.tags["codeunlearn.audit_run_id"]
    assert audit_run_id == result["audit"]["mlflow_run_id"]
    audit_run = client.get_run(audit_run_id)
    assert audit_run.data.tags["codeunlearn.stage"] == "audit"
    assert audit_run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert audit_run.data.metrics["audit.passed"] == 1.0
    tracked = mlflow.artifacts.load_dict(f"runs:/{audit_run_id}/audit/audit.json")
    assert tracked["record_sha256"] == result["audit"]["record_sha256"]
    name, number = result["registered"].rsplit("/", 1)
    tags = client.get_model_version(name, number).tags
    assert tags["codeunlearn.audit.record_sha256"] == result["audit"]["record_sha256"]
    assert tags["codeunlearn.audit.passed"] == "true"
    assert tags["codeunlearn.audit.run_id"] == audit_run_id
    assert tags["codeunlearn.mask_sha256"] == tracked["mask"]["deployed_sha256"]


def test_a_second_audit_of_the_same_request_is_refused(tiny_request):
    from codeunlearn.audit.record import AuditRecordExistsError
    from tasks.audit import audit_request

    _, _, forget_file, result = tiny_request
    before = Path(result["audit"]["record"]).read_bytes()
    with pytest.raises(AuditRecordExistsError, match="write-once"):
        audit_request.fn(
            result["ctx"],
            str(forget_file),
            "codeunlearn",
            {"request_id": result["request_id"]},
            {},
            result["metrics"],
            result["registered"],
        )
    assert Path(result["audit"]["record"]).read_bytes() == before


def test_cli_audit_holds_then_fails_naming_the_tampered_artifact(tiny_request):
    from typer.testing import CliRunner

    from flows.cli import app

    tmp, params_file, _, result = tiny_request
    runner = CliRunner()
    for ident in (result["mlflow_run_id"], result["audit"]["mlflow_run_id"], result["request_id"]):
        outcome = runner.invoke(app, ["audit", ident, "--params", str(params_file)])
        assert outcome.exit_code == 0, outcome.output
        assert "the record holds" in outcome.output
        assert f"MLflow run {result['audit']['mlflow_run_id']}, compared with" in outcome.output

    mask = result["ctx"].stage_dir("requests") / result["request_id"] / "deployed_mask" / "mask.safetensors"
    original = mask.read_bytes()
    make_writable(mask)
    mask.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
    try:
        outcome = runner.invoke(app, ["audit", result["mlflow_run_id"], "--params", str(params_file)])
        assert outcome.exit_code == 1, outcome.output
        assert "does NOT hold" in outcome.output
        assert "deployed_mask/mask.safetensors: sha256 changed" in outcome.output
        assert "codebook_model/codebook.safetensors" in outcome.output  # listed, and still ok
    finally:
        mask.write_bytes(original)

    # A forger who rewrites the local record and re-seals it still disagrees with the tracked copy.
    record_path = Path(result["audit"]["record"])
    original = record_path.read_bytes()
    forged = json.loads(original)
    forged["metrics"]["after"]["forget_rouge"] = 0.01234
    forged["record_sha256"] = record_sha256(forged)
    make_writable(record_path)
    record_path.write_text(json.dumps(forged))
    try:
        outcome = runner.invoke(app, ["audit", result["request_id"], "--params", str(params_file)])
        assert outcome.exit_code == 1, outcome.output
        assert "differs from the tracked copy" in outcome.output
    finally:
        record_path.write_bytes(original)

    outcome = runner.invoke(app, ["audit", "no-such-run", "--params", str(params_file)])
    assert outcome.exit_code == 2 and "no-such-run" in outcome.output


def test_reverify_passes_then_catches_a_swapped_active_mask(tiny_request):
    from mlflow import MlflowClient

    from codeunlearn.methods.codeunlearn.method import ACTIVE_MASK
    from tasks.reverify import latest_unlearned, reverify_model

    tmp, _, _, result = tiny_request
    ctx = result["ctx"].with_parent(None)
    latest = latest_unlearned.fn(ctx)
    assert latest["version"] == result["registered"] and latest["request_id"] == result["request_id"]
    checked = reverify_model.fn(ctx, latest)
    assert checked["passed"], checked
    assert checked["metrics"]["after"]["forget_rouge"] == pytest.approx(result["metrics"]["after"]["forget_rouge"]), (
        "deterministic: the request's own number comes back"
    )
    assert Path(checked["result"]).exists()
    name, number = result["registered"].rsplit("/", 1)
    assert MlflowClient().get_model_version(name, number).tags["codeunlearn.reverify.passed"] == "true"

    active = ctx.stage_dir("requests") / ACTIVE_MASK / "mask.json"
    original = active.read_bytes()
    make_writable(active)
    active.write_bytes(original.replace(b"\n", b"\n ", 1))
    try:
        checked = reverify_model.fn(ctx, latest)
    finally:
        active.write_bytes(original)
    assert not checked["passed"]
    assert checked["failed"] == ["active_mask_is_registered"]


def test_a_gradient_method_request_is_audited_on_its_edited_model(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params_file, forget_file = build_tiny_setup(tmp_path)
    result = run_request(params_file, forget_file, method="ga")
    record = json.loads(Path(result["audit"]["record"]).read_text())
    assert record["method"] == "ga" and record["mask"] is None
    assert record["models"]["before"]["base_role"] == "target"
    assert record["models"]["after"] == result["registered"]
    names = {a["name"] for a in record["artifacts"]}
    assert "unlearned_model/model.safetensors" in names and not any(n.startswith("deployed_mask") for n in names)
    assert "quantization" in record["metrics"] and "relearn" in record["metrics"]
    assert verify_record(record).holds


# --------------------------------------------------------------------------- a neighbour set (--retain-file)


def _write_neighbours(path: Path) -> Path:
    from tests.helpers import RETAIN_FACTS

    path.write_text(
        "".join(
            json.dumps({"id": f"n-{i}", "question": q, "answer": a, "subject": s}) + "\n"
            for i, (q, a, s) in enumerate(RETAIN_FACTS)
        )
    )
    return path


def test_a_neighbour_file_is_the_control_and_is_scored_before_and_after(tmp_path):
    from codeunlearn.data.forget_files import RecordKind, load_record_file
    from codeunlearn.data.neighbours import NeighbourSplit, split_neighbours
    from codeunlearn.data.records import records_sha256
    from tasks.context import make_context

    os.environ.pop("MLFLOW_TRACKING_URI", None)
    params_file, forget_file = build_tiny_setup(tmp_path)
    neighbours = _write_neighbours(tmp_path / "neighbours.jsonl")
    result = run_request(params_file, forget_file, retain_file=neighbours)
    record = json.loads(Path(result["audit"]["record"]).read_text())

    spec = NeighbourSplit(**make_context("smoke", params_file).settings["request"]["neighbour_split"])
    control, held_out = split_neighbours(load_record_file(neighbours, RecordKind.QA).records, spec)
    block = record["neighbour"]
    assert block["control_sha256"] == records_sha256(control) and block["held_out_sha256"] == records_sha256(held_out)
    assert block["control_count"] + block["held_out_count"] == 8
    for key in ("neighbour_rouge", "neighbour_prob"):
        for when in ("before", "after"):
            assert block[f"{key}_{when}"] == record["metrics"][when][key]
            assert 0.0 <= block[f"{key}_{when}"] <= 1.0
    mask_meta = json.loads((Path(result["audit"]["record"]).parent / "mask" / "mask.json").read_text())
    assert mask_meta["provenance"]["control_sha256"] == records_sha256(control)
    text = Path(result["audit"]["record"]).read_text()
    assert all(r.question not in text and r.answer not in text for r in [*control, *held_out])


def test_without_a_neighbour_file_the_record_has_no_neighbour_block(tiny_request):
    record = json.loads(Path(tiny_request[3]["audit"]["record"]).read_text())
    assert "neighbour" not in record
    assert "neighbour_rouge" not in record["metrics"]["before"]


def test_a_request_on_a_forget_set_the_model_never_knew_is_not_a_pass(tmp_path):
    from codeunlearn.audit.judge import NOT_KNOWN

    os.environ.pop("MLFLOW_TRACKING_URI", None)
    # The untrained tiny model answers nothing of the forget set: its forget ROUGE before is far below 0.99.
    params_file, forget_file = build_tiny_setup(tmp_path, {"audit": {"min_known": 0.99}})
    result = run_request(params_file, forget_file)
    record = json.loads(Path(result["audit"]["record"]).read_text())
    assert record["verdict"]["outcome"] == NOT_KNOWN and record["verdict"]["passed"] is False
    assert result["audit"]["outcome"] == NOT_KNOWN and "known_before" in result["audit"]["failed"]
    assert record["thresholds"]["min_known"] == 0.99
