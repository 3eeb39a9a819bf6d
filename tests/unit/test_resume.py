"""Stage fingerprints: a stage is redone exactly when a setting it can depend on changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.context import make_context
from tasks.resume import fingerprint
from tasks.stages import PIPELINE


def fingerprints(tmp_path: Path, overrides: dict) -> dict[str, str]:
    ctx = make_context("smoke", overrides={"paths": {"outputs": str(tmp_path)}, **overrides})
    return {stage: fingerprint(ctx, stage) for stage in PIPELINE}


def changed_stages(tmp_path: Path, overrides: dict) -> list[str]:
    before = fingerprints(tmp_path, {})
    after = fingerprints(tmp_path, overrides)
    return [stage for stage in PIPELINE if before[stage] != after[stage]]


@pytest.mark.parametrize(
    ("overrides", "first_changed"),
    [
        ({"finetune": {"steps": 7}}, "prepare_data"),
        ({"seed": 123}, "prepare_data"),
        ({"codebook": {"num_codes": 64}}, "train_codebook"),
        ({"codebook_train": {"lr": 0.5}}, "train_codebook"),
        ({"select": {"num_codes_to_disable": 3}}, "select_codes"),
        ({"evaluate": {"max_new_tokens": 3}}, "evaluate"),
    ],
)
def test_a_setting_redoes_its_first_reader_and_everything_after(tmp_path, overrides, first_changed):
    order = list(PIPELINE)
    assert changed_stages(tmp_path, overrides) == order[order.index(first_changed) :]


@pytest.mark.parametrize(
    "overrides", [{"methods": {"ga": {"steps": 1}}}, {"audit": {"max_forget_rouge": 0.1}}, {"progress": False}]
)
def test_settings_no_pipeline_stage_reads_redo_nothing(tmp_path, overrides):
    assert changed_stages(tmp_path, overrides) == []


def test_a_comparison_reuses_a_method_finished_with_the_same_params_and_start(tmp_path):
    from codeunlearn.io import write_json
    from tasks.compare import completed_method, method_dir, method_fingerprint

    ctx = make_context("smoke", overrides={"paths": {"outputs": str(tmp_path)}})
    identity = method_fingerprint(ctx, "ga")
    out = method_dir(ctx, "ga")
    (out / "model").mkdir(parents=True)
    write_json(out / "stats.json", {"wall_s": 1.5, "fingerprint": identity})
    assert completed_method(ctx, "ga", identity) == {"wall_s": 1.5}
    changed = make_context("smoke", overrides={"paths": {"outputs": str(tmp_path)}, "methods": {"ga": {"lr": 0.5}}})
    assert method_fingerprint(changed, "ga") != identity
    assert completed_method(changed, "ga", method_fingerprint(changed, "ga")) is None
    assert method_fingerprint(ctx, "npo") != identity
    no_resume = make_context("smoke", overrides={"paths": {"outputs": str(tmp_path)}, "resume": False})
    assert completed_method(no_resume, "ga", identity) is None


def test_a_comparison_reuses_an_evaluation_only_under_the_same_settings_model_and_oracle(tmp_path):
    from tasks.compare import completed_evaluation, evaluation_fingerprint, save_evaluation

    def context(**overrides):
        return make_context("smoke", overrides={"paths": {"outputs": str(tmp_path)}, **overrides})

    ctx = context()
    save_evaluation(ctx, "ga", {"row": {"forget_rouge": 0.25}})
    assert completed_evaluation(ctx, "ga")["row"] == {"forget_rouge": 0.25}
    assert completed_evaluation(ctx, "npo") is None
    for changed in (
        context(evaluate={"max_new_tokens": 3}),  # how every model is scored
        context(methods={"ga": {"lr": 0.5}}),  # the model itself
        context(finetune={"steps": 7}),  # the oracle (and the target) every row is relative to
    ):
        assert evaluation_fingerprint(changed, "ga") != evaluation_fingerprint(ctx, "ga")
        assert completed_evaluation(changed, "ga") is None
    assert evaluation_fingerprint(context(methods={"npo": {"lr": 0.5}}), "ga") == evaluation_fingerprint(ctx, "ga")
    assert completed_evaluation(context(resume=False), "ga") is None


def test_a_reused_oracle_evaluation_restores_the_scores_every_row_is_relative_to(tmp_path, monkeypatch):
    from codeunlearn.metrics.scoring import ModelScores
    from tasks import compare

    ctx = make_context("smoke", overrides={"paths": {"outputs": str(tmp_path)}})
    scores = {"splits": {"forget": {"truth_ratios": [0.5, 0.25], "n": 2}}, "mia": {"forget_min_k": [-1.5]}}
    compare.save_evaluation(ctx, "oracle", {"row": {"forget_rouge": 0.1}, "scores": scores})
    monkeypatch.setattr(compare, "build_suite", lambda _ctx: type("Suite", (), {"oracle_scores": None})())
    suite, row = compare.evaluate_reference.fn(ctx)
    assert row == {"forget_rouge": 0.1}
    assert suite.oracle_scores == ModelScores(**scores)


def changed_by_code(monkeypatch, tmp_path: Path, changed_file: str) -> list[str]:
    """The stages whose fingerprint moves when ``changed_file``'s source changes (its digest, patched)."""
    from codeunlearn import codehash

    before = fingerprints(tmp_path, {})
    real = codehash.file_digest
    target = codehash.REPO_ROOT / changed_file
    monkeypatch.setattr(codehash, "file_digest", lambda path: "edited" if path == target else real(path))
    after = fingerprints(tmp_path, {})
    return [stage for stage in PIPELINE if before[stage] != after[stage]]


@pytest.mark.parametrize(
    ("changed_file", "first_changed"),
    [
        ("tasks/unlearn.py", "select_codes"),
        ("tasks/evaluate.py", "evaluate"),
        ("codeunlearn/data/splits.py", "prepare_data"),
        ("tasks/resume.py", "prepare_data"),
    ],
)
def test_changed_code_redoes_its_stage_and_every_later_one(monkeypatch, tmp_path, changed_file, first_changed):
    order = list(PIPELINE)
    assert changed_by_code(monkeypatch, tmp_path, changed_file) == order[order.index(first_changed) :]


def test_a_marker_written_by_older_code_is_rejected_and_earlier_markers_are_kept(monkeypatch, tmp_path):
    from codeunlearn import codehash
    from codeunlearn.io import write_json
    from tasks.resume import completed_result, marker_path

    ctx = make_context("smoke", overrides={"paths": {"outputs": str(tmp_path)}})
    for stage in PIPELINE:
        write_json(marker_path(ctx, stage), {"fingerprint": fingerprint(ctx, stage), "result": {"stage": stage}})
    assert all(completed_result(ctx, stage) == {"stage": stage} for stage in PIPELINE)
    real = codehash.file_digest
    edited = codehash.REPO_ROOT / "tasks" / "unlearn.py"
    monkeypatch.setattr(codehash, "file_digest", lambda path: "edited" if path == edited else real(path))
    order = list(PIPELINE)
    redone = [stage for stage in PIPELINE if completed_result(ctx, stage) is None]
    assert redone == order[order.index("select_codes") :]


def test_a_study_reruns_on_its_own_code_and_on_its_inputs_code_never_on_evaluation_code(monkeypatch, tmp_path):
    from codeunlearn import codehash
    from tasks.resume import code_hash

    before = {stage: code_hash(stage) for stage in ("sweep", "sequential", "studies_report")}
    real = codehash.file_digest
    edited = {codehash.REPO_ROOT / "tasks" / "evaluate.py"}
    monkeypatch.setattr(codehash, "file_digest", lambda path: "edited" if path in edited else real(path))
    assert {stage: code_hash(stage) for stage in before} == before
    edited.add(codehash.REPO_ROOT / "tasks" / "sweep.py")
    assert [stage for stage in before if code_hash(stage) != before[stage]] == ["sweep", "sequential", "studies_report"]


def test_the_import_graph_follows_an_edited_file_and_its_new_imports(tmp_path):
    """On a copy of the source: a real edit changes the hash, a new import joins the closure."""
    import shutil

    from codeunlearn.codehash import REPO_ROOT, files_hash, module_closure

    for package in ("codeunlearn", "tasks"):
        shutil.copytree(REPO_ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    closure = module_closure("tasks.sweep", tmp_path)
    assert tmp_path / "tasks" / "sweep.py" in closure
    assert tmp_path / "tasks" / "compare.py" not in closure
    hashed = files_hash(closure, tmp_path)
    leaf = tmp_path / "tasks" / "sweep.py"
    leaf.write_text(leaf.read_text() + "\n\ndef helper():\n    from tasks import compare  # noqa: F401\n")
    module_closure.cache_clear()
    from codeunlearn import codehash

    codehash.file_digest.cache_clear()
    grown = module_closure("tasks.sweep", tmp_path)
    assert tmp_path / "tasks" / "compare.py" in grown
    assert files_hash(closure, tmp_path) != hashed
