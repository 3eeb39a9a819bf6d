"""Audit records: judged against thresholds, built and sealed, write-once, verified by re-hashing what they name.

The pure part (``codeunlearn.audit``) on plain files; ``test_audit_request.py`` runs requests.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from codeunlearn.audit.judge import Thresholds, judge, judged_values
from codeunlearn.audit.record import SCHEMA, artifact_entry, build_record, dvc_lock_summary, record_sha256
from codeunlearn.audit.verify import verify_record
from tests.conftest import REPO_ROOT

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
        "neighbour_ratio": "off",
    }

    verdict = judge(values, Thresholds(0.2, 0.99, 0.2, None, 0.96))
    assert not verdict["passed"]
    assert verdict["failed"] == ["forget_rouge", "retain_ratio", "utility_ratio", "quant_recovery"]
    assert {c["check"]: c["status"] for c in verdict["checks"]}["relearn_recovery"] == "off"

    not_measured = judge({**values, "forget_rouge": None}, Thresholds(0.5, 0.8, 0.3, None))
    assert not_measured["failed"] == ["forget_rouge"]
    integrity = judge(values, Thresholds(0.5, 0.8, 0.3, None), extra_checks=[{"check": "mask", "passed": False}])
    assert integrity["failed"] == ["mask"]


def test_neighbours_are_judged_after_over_before_and_skipped_without_a_neighbour_set():
    metrics = {
        "before": {"forget_rouge": 0.9, "neighbour_rouge": 0.5},
        "after": {"forget_rouge": 0.1, "neighbour_rouge": 0.4},
    }
    values = judged_values(metrics)
    assert values["neighbour_ratio"] == pytest.approx(0.8)
    thresholds = Thresholds(0.5, None, None, None, None, min_neighbour_ratio=0.9)
    assert judge(values, thresholds)["failed"] == ["neighbour_ratio"]
    assert judge(values, Thresholds(0.5, None, None, None, None, min_neighbour_ratio=0.75))["passed"]
    without = judged_values({"before": {"forget_rouge": 0.9}, "after": {"forget_rouge": 0.1}})
    assert without["neighbour_ratio"] is None
    skipped = judge(without, thresholds, skipped={"neighbour_ratio": "no neighbour set"})
    assert skipped["passed"] and {c["check"]: c["status"] for c in skipped["checks"]}["neighbour_ratio"] == "skipped"
    assert judge(without, thresholds)["failed"] == ["neighbour_ratio"], "unmeasured and not skipped fails"


def _known(before: float) -> dict:
    return judged_values({"before": {"forget_rouge": before}, "after": {"forget_rouge": 0.0}})


def test_a_forget_set_not_known_before_has_nothing_to_prove():
    from codeunlearn.audit.judge import NOT_KNOWN

    thresholds = Thresholds(1.0, None, None, None, None, min_known=0.3)
    verdict = judge(_known(0.2), thresholds)
    assert not verdict["passed"] and verdict["outcome"] == NOT_KNOWN, "not known is never a pass"
    assert verdict["failed"] == ["known_before"] and verdict["checks"][0]["status"] == "not_known"


def test_a_forget_set_known_before_is_judged_as_usual():
    thresholds = Thresholds(0.5, None, None, None, None, min_known=0.3)
    verdict = judge(_known(0.3), thresholds)
    assert verdict["passed"] and verdict["outcome"] == "pass"
    assert verdict["checks"][0] == {
        "check": "known_before",
        "value": 0.3,
        "threshold": 0.3,
        "op": "ge",
        "status": "pass",
        "passed": True,
    }
    failing = judge({**_known(0.9), "forget_rouge": 0.6}, thresholds)
    assert failing["outcome"] == "fail" and failing["failed"] == ["forget_rouge"]


def test_min_known_off_leaves_the_check_out():
    verdict = judge(_known(0.0), Thresholds(1.0, None, None, None, None))
    assert "known_before" not in {c["check"] for c in verdict["checks"]} and verdict["passed"]


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
        "schema: '2.0'\nstages:\n  prepare_data:\n    cmd: python -m flows.stage prepare_data\n    outs:\n"
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
