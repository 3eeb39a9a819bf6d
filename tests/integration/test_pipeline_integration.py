"""The whole smoke flow end to end on real TOFU data: every stage, MLflow runs, the mask, selectivity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.stages import PIPELINE
from tests.conftest import SHARED_DATA, write_params

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not (SHARED_DATA / "tofu").exists(), reason="needs ../shared/data/tofu"),
]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    import os

    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from flows.pipeline import pipeline
    from flows.studies import studies

    tmp = tmp_path_factory.mktemp("smoke")
    params_file = write_params(tmp)
    results = pipeline(profile="smoke", params_file=str(params_file))
    results["studies"] = studies(profile="smoke", params_file=str(params_file))
    return tmp, results


def test_every_stage_ran_and_wrote_its_outputs(smoke_run):
    tmp, results = smoke_run
    out = tmp / "outputs" / "smoke"
    for path in (
        "splits/forget.jsonl",
        "splits/summary.json",
        "validation/report.html",
        "models/target/config.json",
        "models/oracle/config.json",
        "models/codebook/codebook.safetensors",
        "mask/mask.safetensors",
        "mask/mask.json",
        "eval/metrics.json",
        "eval/rouge.png",
        "report/report.md",
        "sequential/sustainability.json",
        "sequential/scalability.json",
        "sequential/sequential.png",
    ):
        assert (out / path).exists(), path
    mask = json.loads((out / "mask" / "mask.json").read_text())
    codebook = json.loads((out / "models" / "codebook" / "codebook.json").read_text())
    assert mask["codebook_sha256"] == codebook["sha256"]
    assert mask["count"] > 0


def test_target_learned_and_the_mask_is_selective(smoke_run):
    _, results = smoke_run
    m = results["evaluate"]
    # Orderings, not margins tuned to one seed: the target knows what the oracle never saw, and the mask
    # costs the forget set more than the retain set, and more than as many random codes do.
    assert m["target"]["forget_rouge"] > m["oracle"]["forget_rouge"], "the smoke target must learn its facts"
    forget_drop = m["codebook"]["forget_rouge"] - m["codeunlearn"]["forget_rouge"]
    retain_drop = m["codebook"]["retain_rouge"] - m["codeunlearn"]["retain_rouge"]
    random_forget_drop = m["codebook"]["forget_rouge"] - m["random_codes"]["forget_rouge"]
    assert forget_drop > 0
    assert forget_drop > retain_drop
    assert forget_drop > random_forget_drop


def test_muse_rows_and_the_sequential_curves_are_measured_and_reported(smoke_run):
    tmp, results = smoke_run
    out = tmp / "outputs" / "smoke"
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    for model in ("target", "oracle", "codebook", "codeunlearn"):
        for key in ("muse_verbmem_rouge", "muse_knowmem_forget_rouge", "muse_knowmem_retain_rouge", "muse_privleak"):
            assert key in metrics[model], (model, key)
    assert metrics["oracle"]["muse_privleak"] == 0.0  # the oracle is its own PrivLeak reference
    # The main job's attack coverage: 4-bit on target and CodeUnlearn, relearning on oracle and CodeUnlearn.
    for model in ("target", "codeunlearn"):
        assert any(spec["bits"] == 4 for spec in metrics[model]["quant"].values()), model
    for model in ("oracle", "codeunlearn"):
        assert 0.0 <= metrics[model]["relearn"]["heldout_rouge_after"] <= 1.0, model
    sustained = json.loads((out / "sequential" / "sustainability.json").read_text())
    assert [row["request"] for row in sustained["rows"]] == [1, 2, 3]
    disabled = [row["disabled"] for row in sustained["rows"]]
    assert disabled == sorted(disabled) and disabled[0] > 0, "requests accumulate codes"
    # The first request stays forgotten while later requests are added.
    assert sustained["rows"][-1]["forget_rouge_first"] < sustained["baseline"]["forget_rouge_first"]
    scaled = json.loads((out / "sequential" / "scalability.json").read_text())
    assert [row["authors"] for row in scaled["rows"]] == [1, 2, 4]
    assert all(row["forget_rouge"] < row["forget_rouge_before"] for row in scaled["rows"])
    assert results["studies"]["sequential"]["sustainability"] and results["studies"]["sequential"]["scalability"]
    report = (out / "report" / "report.md").read_text()
    studies_report = (out / "studies" / "report.md").read_text()
    assert "### MUSE-News" in report
    for heading in ("### Sustainability: sequential requests", "### Scalability: growing forget sets", "S' sweep"):
        assert heading in studies_report and heading not in report, heading


def test_mlflow_has_a_parent_run_with_stage_children_and_registered_models(smoke_run):
    import mlflow
    from mlflow import MlflowClient

    tmp, results = smoke_run
    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
    client = MlflowClient()
    parent = client.get_run(results["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    experiment = parent.info.experiment_id
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    stages = {run.data.tags["codeunlearn.stage"] for run in children}
    assert set(PIPELINE) <= stages, "every main-job stage logs a child run"
    studies = client.get_run(results["studies"]["mlflow_run_id"])
    study_children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{studies.info.run_id}'")
    assert {run.data.tags["codeunlearn.stage"] for run in study_children} == {"sweep", "sequential", "studies_report"}
    select = next(run for run in children if run.data.tags["codeunlearn.stage"] == "select_codes")
    artifacts = {a.path for a in client.list_artifacts(select.info.run_id, "mask")}
    assert {"mask/mask.safetensors", "mask/mask.json"} <= artifacts
    names = {m.name for m in client.search_registered_models()}
    assert {"codeunlearn-smoke-target", "codeunlearn-smoke-oracle", "codeunlearn-smoke-codebook"} <= names


def test_every_method_lowers_forget_rouge_on_a_dask_local_cluster(smoke_run):
    """The comparison flow on the smoke models: each method a Prefect task on a Dask LocalCluster."""
    from flows.compare import compare

    tmp, _ = smoke_run
    rows = {row["method"]: row for row in compare(profile="smoke", params_file=str(tmp / "params.yaml"))}
    target = rows["target"]["forget_rouge"]
    for method in ("codeunlearn", "ga", "graddiff", "npo", "rmu", "grin", "zerounlearn"):
        assert rows[method]["forget_rouge"] < target, method
        assert rows[method]["wall_s"] > 0 and rows[method]["peak_mem_mb"] is not None
        assert rows[method]["forget_rouge_q4"] is not None
    out = tmp / "outputs" / "smoke" / "compare"
    for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.png", "leaderboard.json"):
        assert (out / name).exists(), name
    # A second comparison reuses every finished method and evaluation: nothing is retrained or rescored.
    evaluations = sorted(out.glob("*/evaluation.json"))
    assert len(evaluations) == 9
    stamps = {path: path.stat().st_mtime_ns for path in evaluations}
    again = {row["method"]: row for row in compare(profile="smoke", params_file=str(tmp / "params.yaml"))}
    assert again == rows
    assert {path: path.stat().st_mtime_ns for path in evaluations} == stamps


def test_the_tuning_grid_runs_on_two_dask_workers_selects_and_resumes(smoke_run):
    """The smoke grid (two points a method) on a Dask LocalCluster of two worker processes, restricted to
    three methods (six points) to keep CI short; each point an MLflow child run; a rerun reruns nothing."""
    import mlflow

    from codeunlearn.eval.tune import NO_POINT_MEETS_FLOOR, SELECTED
    from flows.tune import tune
    from tasks.context import make_context

    tmp, _ = smoke_run
    params = str(tmp / "params.yaml")
    compare_cfg = make_context("smoke", Path(params)).settings["compare"]
    assert (compare_cfg["task_runner"], compare_cfg["workers"]) == ("dask", 2)
    methods = ["codeunlearn", "ga", "npo"]
    summary = tune(profile="smoke", params_file=params, methods=methods)
    assert [(p["method"], p["index"]) for p in summary["points"]] == [(m, i) for m in methods for i in (0, 1)]
    for method in methods:
        assert summary["selection"][method]["status"] in (SELECTED, NO_POINT_MEETS_FLOOR), method
        assert summary["selection"][method]["points"] == 2
    assert {row["method"] for row in summary["leaderboard"]} == set(methods)
    out = tmp / "outputs" / "smoke" / "tune"
    for name in ("tune.json", "leaderboard.md", "frontier.png"):
        assert (out / name).exists(), name
    assert not (out / "runs").exists() or not any((out / "runs").rglob("*.safetensors"))  # keep_models: false
    children = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`codeunlearn.stage` LIKE 'tune_%'")
    assert {f"tune_{m}_{i}" for m in methods for i in (0, 1)} <= set(children["tags.mlflow.runName"])
    points = sorted(out.glob("points/*/*.json"))
    assert len(points) == 6
    stamps = {path: path.stat().st_mtime_ns for path in points}
    again = tune(profile="smoke", params_file=params, methods=methods)
    assert again["selection"] == summary["selection"]
    assert {path: path.stat().st_mtime_ns for path in points} == stamps

    # The tuned comparison: each method with a selected point runs there, attacks included.
    from codeunlearn.io import read_json
    from flows.compare import compare

    selected = [m for m in methods if summary["selection"][m]["status"] == SELECTED]
    rows = {row["method"]: row for row in compare(profile="smoke", params_file=params, methods=methods, tuned=True)}
    assert set(rows) == {"oracle", "target", *selected}
    assert all(rows[m]["forget_rouge_q4"] is not None for m in selected)
    tuned = tmp / "outputs" / "smoke" / "compare" / "tuned"
    assert read_json(tuned / "selection.json")["selection"] == summary["selection"]
    assert read_json(tuned / "leaderboard.json") == list(rows.values())


def test_a_request_keeps_the_forget_text_out_of_mlflow_and_logs(smoke_run, tmp_path, capfd):
    """A generic-JSONL request end to end; neither the MLflow store nor the output holds its questions or
    answers, raw or JSON-escaped (``bench.reliability.needles``)."""
    import json as _json

    from bench.reliability import needles
    from codeunlearn.data.records import read_jsonl_records
    from flows.request import unlearn

    tmp, _ = smoke_run
    forget = read_jsonl_records(tmp / "outputs" / "smoke" / "splits" / "forget.jsonl")[:8]
    request_file = tmp_path / "request.jsonl"
    request_file.write_text("".join(_json.dumps({"question": r.question, "answer": r.answer}) + "\n" for r in forget))
    result = unlearn(forget_file=str(request_file), profile="smoke", params_file=str(tmp / "params.yaml"))
    assert result["metrics"]["after"]["forget_rouge"] < result["metrics"]["before"]["forget_rouge"]
    assert result["unlearn"]["request_latency_s"] > 0
    captured = capfd.readouterr()
    stores = [tmp / "mlflow.db", *[p for p in Path(tmp / "mlruns").rglob("*") if p.is_file()]]
    for needle in needles(forget):
        assert needle not in captured.out.encode() and needle not in captured.err.encode()
        for store in stores:
            assert needle not in store.read_bytes(), f"{store} contains forget-set text"


def _forget_command(tmp: Path, *args: str) -> dict:
    """`codeunlearn forget` in this process (typer's runner), on the smoke run; its printed result."""
    from typer.testing import CliRunner

    from flows.cli import app

    command = ["forget", *args, "--profile", "smoke", "--params", str(tmp / "params.yaml")]
    result = CliRunner().invoke(app, command, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{") :])


def test_a_multiple_choice_request_is_unlearned_and_scored_by_accuracy(smoke_run, tmp_path):
    """TOFU's perturbed answers of the forget author as the wrong options: a choice file through the CLI."""
    from codeunlearn.data.forget_files import choices_from_perturbed
    from codeunlearn.data.records import read_jsonl_records

    tmp, _ = smoke_run
    split = read_jsonl_records(tmp / "outputs" / "smoke" / "splits" / "forget.jsonl")
    forget = [r for r in split if r.perturbed_answers]
    rows = [
        {"question": c.question, "choices": list(c.choices), "answer": c.answer}
        for c in choices_from_perturbed(forget[:8], seed=0)
    ]
    request_file = tmp_path / "choices.json"
    request_file.write_text(json.dumps(rows))
    # NPO starts every request from the target, so earlier requests on this run (CodeUnlearn's masks add
    # up) do not change its "before"; a gradient method also shows the choice-as-QA path.
    result = _forget_command(tmp, "--forget-file", str(request_file), "--method", "npo")
    before, after = result["metrics"]["before"], result["metrics"]["after"]
    assert {"forget_choice_acc", "forget_choice_acc_norm", "forget_rouge", "model_utility"} <= set(after)
    assert after["forget_rouge"] < before["forget_rouge"]
    request = tmp / "outputs" / "smoke" / "requests" / result["request_id"]
    assert json.loads((request / "audit.json").read_text())["forget"]["kind"] == "choice"


def test_a_passage_request_is_unlearned_and_scored_by_verbmem(smoke_run, tmp_path):
    """A document to forget (the forget author's answers as one text) through the CLI, with no subject,
    beside a neighbour file of passages (retain authors' answers): their held-out half is scored by
    VerbMem, and MUSE's KnowMem on other news joins the scores."""
    from codeunlearn.data.records import read_jsonl_records

    tmp, _ = smoke_run
    splits = tmp / "outputs" / "smoke" / "splits"
    forget = read_jsonl_records(splits / "forget.jsonl")
    retain = read_jsonl_records(splits / "retain.jsonl")
    passages = [" ".join(r.answer for r in forget[start : start + 5]) for start in (0, 5)]
    request_file = tmp_path / "passages.jsonl"
    request_file.write_text("".join(json.dumps({"text": text}) + "\n" for text in passages))
    neighbours = [" ".join(r.answer for r in retain[start : start + 5]) for start in (0, 5, 10, 15)]
    neighbour_file = tmp_path / "neighbour_passages.jsonl"
    neighbour_file.write_text("".join(json.dumps({"text": text}) + "\n" for text in neighbours))
    result = _forget_command(tmp, "--forget-file", str(request_file), "--retain-file", str(neighbour_file))
    before, after = result["metrics"]["before"], result["metrics"]["after"]
    assert {"forget_rouge", "forget_min_k", "model_utility"} <= set(after) and "forget_choice_acc" not in after
    assert {"neighbour_verbmem", "knowmem_retain"} <= set(after) and "neighbour_rouge" not in after
    assert 0.0 <= after["forget_rouge"] <= 1.0 and before["forget_min_k"] > 0
    record = json.loads((tmp / "outputs" / "smoke" / "requests" / result["request_id"] / "audit.json").read_text())
    assert record["forget"]["kind"] == "passage" and record["forget"]["count"] == 2
    assert record["neighbour"]["held_out_count"] == 2 and "neighbour_verbmem_after" in record["neighbour"]
    assert "passage" in json.dumps(record["verdict"])  # the relearning attack is skipped, and says why
