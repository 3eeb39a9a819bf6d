"""The README's benchmark tables are rendered from the JSON, value for value."""

from __future__ import annotations

from bench import tables
from codeunlearn.io import write_json

MACHINE = {"cpu": "Test CPU", "cores": 2, "threads": 2, "torch": "2.13.0+cpu", "load_average_1m": 0.5}


def test_tables_show_every_benchmark_value_and_its_machine(tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "RESULTS", tmp_path / "bench" / "results")
    out = tables.RESULTS / "default"
    write_json(
        out / "latency.json",
        {
            "codeunlearn_request_s": 12.5,
            "npo_s": 50.0,
            "npo_s_over_codeunlearn_request_s": 4.0,
            "machine": MACHINE,
            "git_commit": "abc1234567890",
        },
    )
    text = tables.tables("default")
    assert "| codeunlearn_request_s | 12.500 |" in text
    assert "| npo_s_over_codeunlearn_request_s | 4.000 |" in text
    assert "| ga_s | n/a |" in text
    assert "Test CPU, 2 cores" in text and "commit abc1234567" in text
    assert "overhead.json: not measured yet" in text


def test_leaderboard_names_the_commit_of_the_comparison_its_rows_come_from(tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "RESULTS", tmp_path / "bench" / "results")
    from codeunlearn.report.leaderboard import COLUMNS

    row = {"method": "ga", **dict.fromkeys(COLUMNS), "forget_rouge": 0.25}
    write_json(
        tables.RESULTS / "default" / "leaderboard.json",
        {"rows": [row], "machine": MACHINE, "git_commit": "bench0000000", "compare_git_commit": "compare1111111"},
    )
    text = tables.tables("default")
    assert "| ga | 0.250 | n/a |" in text
    assert "commit bench00000; rows from the comparison at commit compare111_" in text


def test_leaderboard_shows_the_pipelines_rows_with_model_utility_beside_forgetting(tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "RESULTS", tmp_path / "bench" / "results")
    from codeunlearn.report.leaderboard import COLUMNS, leaderboard_rows

    assert {"model_utility", "world_facts_rouge", "real_authors_rouge"} <= set(COLUMNS)
    rows = leaderboard_rows(
        {
            "codeunlearn": {
                "forget_rouge": 0.2,
                "model_utility": 0.3,
                "world_facts_rouge": 0.4,
                "real_authors_rouge": 0.5,
            }
        }
    )
    write_json(
        tables.RESULTS / "default" / "leaderboard.json",
        {"pipeline_rows": rows, "pipeline_git_commit": "pipe22222222", "machine": MACHINE, "git_commit": "b" * 12},
    )
    text = tables.tables("default")
    assert "Pipeline (`python -m flows.pipeline`):" in text and "Comparison" not in text
    header = next(line for line in text.splitlines() if line.startswith("| method |"))
    assert "model_utility ↑ | world_facts_rouge ↑ | real_authors_rouge ↑" in header
    assert "| codeunlearn | 0.200 | n/a | n/a | 0.300 | 0.400 | 0.500 |" in text
    assert "pipeline rows from the pipeline's evaluation at commit pipe222222" in text


def test_the_committed_benchmarks_page_is_generated_from_the_committed_results():
    page = tables.RESULTS.parent.parent / "docs" / "benchmarks.md"
    assert page.read_text() == tables.benchmarks_page(), "run: python -m bench.tables --write docs/benchmarks.md"


def test_the_tuning_table_shows_each_methods_selected_point_with_its_params_and_the_rule(tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "RESULTS", tmp_path / "bench" / "results")
    from codeunlearn.eval.tune import NO_POINT_MEETS_FLOOR, SELECTED

    bracket = {"reaches_oracle": True, "crosses_floor": False, "brackets": True, "forgets_at_floor": True}
    payload = {
        "profile": "default",
        "rule": {"objective": "forget_rouge", "utility_ratio": 0.9, "retain_ratio": 0.9, "tie_break": "forget_quality"},
        "floors": {"model_utility": 0.45, "retain_rouge": 0.72},
        "selection": {
            "ga": {"status": SELECTED, "points": 8, "meeting_floor": 3, "bracketing": bracket},
            "rmu": {"status": NO_POINT_MEETS_FLOOR, "points": 6, "meeting_floor": 0, "bracketing": bracket},
        },
        "leaderboard": [
            {"method": "ga", "status": SELECTED, "point": 2, "params": {"lr": 5e-05, "steps": 40}, "forget_rouge": 0.3},
            {"method": "rmu", "status": NO_POINT_MEETS_FLOOR, "point": None, "params": None},
        ],
        "machine": MACHINE,
        "git_commit": "tune33333333",
    }
    write_json(tables.RESULTS / "default" / "tune.json", payload)
    text = tables.tables("default")
    assert "model utility >= 0.9 x the target's (0.450)" in text
    assert "| ga | point 2 | lr=5e-05 steps=40 | 0.300 |" in text
    assert "| rmu | no point meets the utility floor |" in text
    assert "| ga | 8 | 3 | True | False |" in text
    assert "![tuning frontier](img/tune_default.png)" in text


def test_the_tuned_comparison_rows_show_beside_the_literature_settings_with_their_commit(tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "RESULTS", tmp_path / "bench" / "results")
    from codeunlearn.report.leaderboard import COLUMNS

    literature = {"method": "rmu", **dict.fromkeys(COLUMNS), "forget_rouge": 0.9}
    tuned = {"method": "rmu", **dict.fromkeys(COLUMNS), "forget_rouge": 0.05, "forget_rouge_q4": 0.4}
    write_json(
        tables.RESULTS / "default" / "leaderboard.json",
        {
            "rows": [literature],
            "tuned_compare_rows": [tuned],
            "tuned_compare_git_commit": "tuned3333333",
            "machine": MACHINE,
            "git_commit": "b" * 12,
        },
    )
    text = tables.tables("default")
    assert "Tuned comparison (`python -m flows.compare --tuned`, commit tuned33333)" in text
    assert "| rmu | 0.900 |" in text and "| rmu | 0.050 |" in text and "| 0.400 |" in text


def test_the_equal_forgetting_table_times_both_methods_beside_their_forgetting_and_utility(tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "RESULTS", tmp_path / "bench" / "results")
    point = {"forget_rouge": 0.2, "model_utility": 0.3, "retain_rouge": 0.85}
    payload = {
        "what": "npo's method call at the grid point forgetting as much as codeunlearn's selected point",
        "codeunlearn": {
            "index": 5,
            "params": {"strength": 8.0},
            **point,
            "request_s": 2.0,
            "request_runs_s": [2.0, 2.5, 1.5],
        },
        "npo": {
            "index": 6,
            "params": {"lr": 5e-05, "steps": 40},
            **point,
            "reaches": True,
            "s": 300.0,
            "runs_s": [300.0, 310.0, 290.0],
            "steps": 40,
        },
        "npo_s_over_codeunlearn_request_s": 150.0,
        "machine": MACHINE,
        "git_commit": "equal4444444",
    }
    write_json(tables.RESULTS / "default" / "equal_forgetting.json", payload)
    text = tables.tables("default")
    assert "| codeunlearn | point 5, strength=8.0 | 0.200 | 0.300 | 0.850 | 2.000 | 2.0, 2.5, 1.5 |" in text
    assert (
        "| npo | point 6, lr=5e-05 steps=40 (reaches: True) | 0.200 | 0.300 | 0.850 | 300.000 | 300.0, 310.0, 290.0 |"
        in text
    )
    assert "NPO's step over CodeUnlearn's request: 150.0x." in text
    assert "commit equal44444" in text
