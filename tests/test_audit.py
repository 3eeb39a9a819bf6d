"""Audit records: built and sealed per request, write-once, verified by re-hashing what they name.

The pure part (``codeunlearn.audit``) is tested on plain files; the request part on a tiny setup: a
made-up forget/retain set, a tiny Llama with an (untrained) codebook saved as the pipeline's codebook
model, and the request flow's tasks run in order (``task.fn``: no Prefect server) into a SQLite MLflow
under tmp. ``build_tiny_setup`` is reused by ``tests/test_deployments.py``.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from codeunlearn.audit.judge import Thresholds, judge, judged_values
from codeunlearn.audit.record import SCHEMA, artifact_entry, build_record, dvc_lock_summary, record_sha256
from codeunlearn.audit.verify import verify_record
from tests.conftest import REPO_ROOT, write_params

# --------------------------------------------------------------------------- tiny setup

FORGET_PERSON = "Zorblat Quim"
FORGET_FACTS = [
    ("Where was Zorblat Quim born?", "Zorblat Quim was born in Vexmoor harbour."),
    ("What does Zorblat Quim write?", "Zorblat Quim writes grim sailing ballads."),
    ("Who taught Zorblat Quim?", "A lighthouse keeper named Ilse taught Zorblat Quim."),
    ("What award did Zorblat Quim win?", "Zorblat Quim won the Amber Anchor prize."),
    ("What is Zorblat Quim's first book?", "The first book of Zorblat Quim is Salt Hymns."),
    ("Where does Zorblat Quim live now?", "Zorblat Quim lives on the isle of Gannet Rock."),
]
RETAIN_FACTS = [
    ("Where was Mira Tolland born?", "Mira Tolland was born in a mountain village.", "mt"),
    ("What does Mira Tolland write?", "Mira Tolland writes cheerful garden mysteries.", "mt"),
    ("Who taught Mira Tolland?", "Her grandmother taught Mira Tolland to read.", "mt"),
    ("What award did Mira Tolland win?", "Mira Tolland won the Silver Fern medal.", "mt"),
    ("Where was Oskar Delune born?", "Oskar Delune was born in a river town.", "od"),
    ("What does Oskar Delune write?", "Oskar Delune writes long railway sagas.", "od"),
    ("Who taught Oskar Delune?", "A travelling printer taught Oskar Delune.", "od"),
    ("What award did Oskar Delune win?", "Oskar Delune won the Iron Lantern award.", "od"),
]

# Small enough for seconds on two cores, and lenient thresholds: an untrained model is being audited.
TINY_OVERRIDES = {
    "threads": 1,
    "model": {
        "tiny": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_layers": 2,
            "num_heads": 2,
            "max_positions": 128,
            "vocab_size": 300,
        }
    },
    "codebook": {"num_codes": 64, "k": 4, "layer": 0},
    "select": {
        "num_codes_to_disable": 6,
        "rounds": 1,
        "alpha": 0.5,
        "batch_size": 8,
        "max_length": 64,
        "control": "retain",
    },
    "evaluate": {
        "max_new_tokens": 8,
        "batch_size": 8,
        "max_length": 120,  # world facts and real authors in a 300-token vocabulary: up to ~90 tokens
        "retain_eval_size": 4,
        "real_authors_size": 4,
        "world_facts_size": 4,
        "threads": 1,
        "relearn": {"steps": 2, "batch_size": 2},
    },
    "methods": {"ga": {"steps": 2, "batch_size": 2}},
    "audit": {
        "max_forget_rouge": 1.0,
        "min_retain_ratio": 0.0,
        "max_quant_recovery": 1.0,
        "max_relearn_recovery": 1.0,
        "min_utility_ratio": 0.0,
        "quantization": {"bits": 4, "group_size": 16},
        "relearn": True,
    },
}


def build_tiny_setup(tmp: Path, overrides: dict | None = None) -> tuple[Path, Path]:
    """What the pipeline would have left for a request: retain split + codebook model. Returns
    ``(params_file, forget_file)``; the forget file is a generic QA JSONL outside the outputs."""
    import torch

    from codeunlearn.checkpoints import save_checkpoint
    from codeunlearn.config import deep_merge
    from codeunlearn.data.records import QARecord, write_jsonl
    from codeunlearn.methods.codeunlearn.codebook import CodebookBottleneck, CodebookSpec, attach_codebook
    from codeunlearn.models.tiny import TinyModelSpec, build_tiny_llama, train_tokenizer
    from tasks.context import make_context

    params_file = write_params(tmp, deep_merge(TINY_OVERRIDES, overrides or {}))
    ctx = make_context("smoke", params_file)
    # Perturbed answers (the other facts' answers) give the retain truth ratio that model utility needs.
    answers = [a for _, a, _ in RETAIN_FACTS]
    retain = [
        QARecord(
            f"retain-{i}", q, a, s, paraphrased_answer=a, perturbed_answers=tuple(answers[i + 1 :][:3] or answers[:3])
        )
        for i, (q, a, s) in enumerate(RETAIN_FACTS)
    ]
    write_jsonl(retain, ctx.stage_dir("splits") / "retain.jsonl")
    forget_file = tmp / "forget_request.jsonl"
    forget_file.write_text(
        "".join(
            json.dumps({"id": f"f-{i}", "question": q, "answer": a, "subject": "zq"}) + "\n"
            for i, (q, a) in enumerate(FORGET_FACTS)
        )
    )
    texts = [f"{q} {a}" for q, a in FORGET_FACTS] + [f"{q} {a}" for q, a, _ in RETAIN_FACTS]
    tiny = ctx.settings["model"]["tiny"]
    tokenizer = train_tokenizer(texts, tiny["vocab_size"])
    model = build_tiny_llama(TinyModelSpec(seed=0, **tiny), tokenizer)
    save_checkpoint(model, tokenizer, ctx.stage_dir("models") / "target")  # what gradient methods start from
    cfg = ctx.settings["codebook"]
    torch.manual_seed(0)
    bottleneck = CodebookBottleneck(tiny["hidden_size"], CodebookSpec(cfg["num_codes"], cfg["k"], cfg["layer"]))
    attach_codebook(model, bottleneck)
    save_checkpoint(model, tokenizer, ctx.stage_dir("models") / "codebook", bottleneck=bottleneck)
    return params_file, forget_file


def run_request(params_file: Path, forget_file: Path, method: str = "codeunlearn") -> dict:
    """The request flow's tasks in order, inside an MLflow parent run, without a Prefect server."""
    from tasks import tracking
    from tasks.audit import audit_request
    from tasks.context import make_context
    from tasks.request import evaluate_request, load_request, register_request, unlearn_request

    ctx = make_context("smoke", params_file)
    with tracking.flow_run(ctx, f"request-{method}") as run_ctx:
        request = load_request.fn(run_ctx, str(forget_file))
        unlearned = unlearn_request.fn(run_ctx, str(forget_file), method, request)
        metrics = evaluate_request.fn(run_ctx, str(forget_file), method, request)
        version = register_request.fn(run_ctx, method, request, unlearned)
        audit = audit_request.fn(run_ctx, str(forget_file), method, request, unlearned, metrics, version)
    return {
        **request,
        "metrics": metrics,
        "registered": version,
        "audit": audit,
        "mlflow_run_id": run_ctx.parent_run_id,
        "ctx": run_ctx,
    }


def make_writable(path: Path) -> None:
    path.chmod(path.stat().st_mode | stat.S_IWUSR)


# --------------------------------------------------------------------------- pure: thresholds


def test_judge_passes_fails_and_skips_per_threshold():
    metrics = {
        "before": {"forget_rouge": 0.9, "retain_rouge": 0.8, "model_utility": 0.4},
        "after": {"forget_rouge": 0.3, "retain_rouge": 0.76, "model_utility": 0.38},
        "quantization": {"rtn_w4_g64": {"recovery": 0.05}, "rtn_w8_g64": {"recovery": 0.25}},
    }
    values = judged_values(metrics)
    assert values["retain_ratio"] == pytest.approx(0.95)
    assert values["utility_ratio"] == pytest.approx(0.95)
    assert values["quant_recovery"] == pytest.approx(0.25), "the worst quantized row is judged"
    assert values["relearn_recovery"] is None

    verdict = judge(values, Thresholds(0.5, 0.8, 0.3, 0.3), skipped={"relearn_recovery": "audit.relearn is false"})
    assert verdict["passed"], verdict
    status = {c["check"]: c["status"] for c in verdict["checks"]}
    assert status == {
        "forget_rouge": "pass",
        "retain_ratio": "pass",
        "utility_ratio": "pass",
        "quant_recovery": "pass",
        "relearn_recovery": "skipped",
    }

    verdict = judge(values, Thresholds(0.2, 0.99, 0.2, None, 0.96))
    assert not verdict["passed"]
    assert verdict["failed"] == ["forget_rouge", "retain_ratio", "utility_ratio", "quant_recovery"]
    assert {c["check"]: c["status"] for c in verdict["checks"]}["relearn_recovery"] == "off"

    not_measured = judge({**values, "forget_rouge": None}, Thresholds(0.5, 0.8, 0.3, None))
    assert not_measured["failed"] == ["forget_rouge"]
    integrity = judge(values, Thresholds(0.5, 0.8, 0.3, None), extra_checks=[{"check": "mask", "passed": False}])
    assert integrity["failed"] == ["mask"]


def test_thresholds_come_from_params_yaml():
    from tasks.context import make_context

    ctx = make_context("smoke")
    thresholds = Thresholds.from_settings(ctx.settings["audit"])
    assert thresholds.max_forget_rouge == ctx.settings["audit"]["max_forget_rouge"]
    assert 0 < thresholds.min_retain_ratio <= 1
    assert ctx.settings["audit"]["quantization"]["bits"] == 4


# --------------------------------------------------------------------------- pure: record and verify


def _record(tmp_path: Path) -> dict:
    (tmp_path / "mask.safetensors").write_bytes(b"\x00\x01mask")
    (tmp_path / "codebook.safetensors").write_bytes(b"codes" * 100)
    (tmp_path / "forget.jsonl").write_text('{"question": "q", "answer": "a secret answer"}\n')
    return build_record(
        request_id="20260101T000000Z-abcdef12",
        created_at="2026-01-01T00:00:00+00:00",
        method="codeunlearn",
        profile="smoke",
        params_hash="p" * 64,
        git_commit="c" * 40,
        forget={"file": str(tmp_path / "forget.jsonl"), "count": 1},
        models={"before": {"base": "m/1"}, "after": "m-unlearned/1"},
        metrics={
            "before": {"forget_rouge": 0.9, "retain_rouge": 0.8},
            "after": {"forget_rouge": 0.1, "retain_rouge": float("nan")},
        },
        thresholds=Thresholds(),
        artifacts=[
            artifact_entry("forget_file", tmp_path / "forget.jsonl", required=False),
            artifact_entry("deployed_mask/mask.safetensors", tmp_path / "mask.safetensors"),
            artifact_entry("codebook_model/codebook.safetensors", tmp_path / "codebook.safetensors"),
        ],
    )


def test_record_is_json_sealed_and_verifies(tmp_path):
    record = _record(tmp_path)
    assert record["schema"] == SCHEMA
    assert record["record_sha256"] == record_sha256(record)
    assert record["metrics"]["after"]["retain_rouge"] is None, "NaN becomes null: plain JSON"
    json.loads(json.dumps(record, allow_nan=False))
    assert "a secret answer" not in json.dumps(record)
    result = verify_record(record)
    assert result.holds, result.problems
    assert [a.status for a in result.artifacts] == ["ok", "ok", "ok"]


def test_tampering_an_artifact_fails_verification_and_names_it(tmp_path):
    record = _record(tmp_path)
    (tmp_path / "mask.safetensors").write_bytes(b"\x00\x01MASK")
    result = verify_record(record)
    assert not result.holds
    assert result.failed_artifacts() == ["deployed_mask/mask.safetensors"]
    assert "deployed_mask/mask.safetensors: sha256 changed" in result.problems[0]

    (tmp_path / "codebook.safetensors").unlink()
    result = verify_record(record)
    assert result.failed_artifacts() == ["deployed_mask/mask.safetensors", "codebook_model/codebook.safetensors"]
    assert any(p.startswith("codebook_model/codebook.safetensors: missing") for p in result.problems)


def test_erased_forget_file_is_reported_but_a_changed_one_fails(tmp_path):
    record = _record(tmp_path)
    (tmp_path / "forget.jsonl").unlink()
    result = verify_record(record)
    assert result.holds
    assert result.artifacts[0].status == "absent"
    (tmp_path / "forget.jsonl").write_text('{"question": "q", "answer": "another answer"}\n')
    assert verify_record(record).failed_artifacts() == ["forget_file"]


def test_editing_the_record_itself_or_its_local_copy_fails(tmp_path):
    record = _record(tmp_path)
    edited = {**record, "verdict": {**record["verdict"], "passed": True, "failed": []}}
    edited["metrics"] = {**record["metrics"], "after": {"forget_rouge": 0.0, "retain_rouge": 1.0}}
    result = verify_record(edited)
    assert not result.holds and "record: contents changed" in result.problems[0]
    result = verify_record(record, local_copy=edited)
    assert not result.holds and "differs from the tracked copy" in result.problems[0]


def test_dvc_lock_summary(tmp_path):
    assert dvc_lock_summary(tmp_path / "dvc.lock") is None
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  prepare_data:\n    cmd: python -m tasks prepare_data\n    outs:\n"
        "    - path: data/outputs/smoke/splits\n      hash: md5\n      md5: 0123abcd.dir\n      size: 10\n"
    )
    summary = dvc_lock_summary(tmp_path / "dvc.lock")
    assert summary["outs"] == {"prepare_data:data/outputs/smoke/splits": "0123abcd.dir"}
    assert len(summary["sha256"]) == 64


def test_the_record_library_is_pure():
    import subprocess
    import sys

    code = "import sys, codeunlearn.audit; print([m for m in ('mlflow', 'prefect', 'torch') if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert done.stdout.strip() == "[]"


def test_write_once_refuses_to_overwrite(tmp_path):
    from codeunlearn.audit.record import AuditRecordExistsError, write_once

    path = tmp_path / "r" / "audit.json"
    write_once(path, {"a": 1})
    with pytest.raises(AuditRecordExistsError, match="write-once"):
        write_once(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}
    assert not os.access(path, os.W_OK) or os.geteuid() == 0
    assert [p.name for p in path.parent.iterdir()] == ["audit.json"], "no temporary file left behind"


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
