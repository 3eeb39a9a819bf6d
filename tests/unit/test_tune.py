"""The tuning grid: expansion, the selection rule, bracketing, point keys (resume) and the grids in params.yaml."""

from __future__ import annotations

import pytest

from codeunlearn.eval.tune import (
    NO_POINT_MEETS_FLOOR,
    NO_POINT_RUN,
    SELECTED,
    GridError,
    SelectionRule,
    bracketing,
    grid_points,
    select_points,
    selected_rows,
    selection_table,
)

RULE = SelectionRule(utility_ratio=0.9, retain_ratio=0.9)
TARGET = {"forget_rouge": 0.95, "retain_rouge": 0.8, "model_utility": 0.5, "forget_quality": 0.0}
ORACLE = {"forget_rouge": 0.4, "retain_rouge": 0.8, "model_utility": 0.5, "forget_quality": 1.0}


def point(method: str, index: int, forget: float, utility: float = 0.5, retain: float = 0.8, quality: float = 0.1):
    row = {"forget_rouge": forget, "retain_rouge": retain, "model_utility": utility, "forget_quality": quality}
    return {"method": method, "index": index, "params": {"lr": index}, "row": row, "stats": {"wall_s": 1.0}}


def test_a_grid_is_the_union_of_each_blocks_product_in_order_without_repeats():
    blocks = [{"lr": [1, 2], "steps": 20}, {"lr": 1, "steps": [20, 40]}, {"layers": [[1, 2], [2, 3]]}]
    points = grid_points(blocks, {"lr", "steps", "layers"}, "g")
    assert points == [
        {"lr": 1, "steps": 20},
        {"lr": 2, "steps": 20},
        {"lr": 1, "steps": 40},
        {"layers": [1, 2]},
        {"layers": [2, 3]},
    ]


def test_a_grid_knob_the_method_lacks_is_an_error_naming_the_field_block_and_knob():
    with pytest.raises(GridError, match=r"compare.tune.grids.ga\[1\]: stepz not in the method's params block"):
        grid_points([{"lr": [1]}, {"stepz": [2]}], {"lr", "steps"}, "compare.tune.grids.ga")
    with pytest.raises(GridError, match="a grid is a list of blocks"):
        grid_points({"lr": [1]}, {"lr"}, "compare.tune.grids.ga")
    with pytest.raises(GridError, match=r"\[0\]: a block is a non-empty mapping"):
        grid_points([{}], {"lr"}, "compare.tune.grids.ga")


def test_the_lowest_forget_rouge_meeting_both_floors_is_selected():
    points = [
        point("ga", 0, forget=0.9),
        point("ga", 1, forget=0.3, utility=0.40),  # below the utility floor (0.45): not eligible
        point("ga", 2, forget=0.5, retain=0.70),  # below the retain floor (0.72): not eligible
        point("ga", 3, forget=0.6),
    ]
    chosen = select_points(points, ["ga"], TARGET, RULE)["ga"]
    assert chosen["status"] == SELECTED and chosen["index"] == 3 and chosen["meeting_floor"] == 2
    assert chosen["floors"] == pytest.approx({"model_utility": 0.45, "retain_rouge": 0.72})


def test_ties_on_forget_rouge_are_broken_by_forget_quality_then_grid_order():
    points = [point("npo", 0, 0.5, quality=0.2), point("npo", 1, 0.5, quality=0.7), point("npo", 2, 0.5, quality=0.7)]
    chosen = select_points(points, ["npo"], TARGET, RULE)["npo"]
    assert (chosen["index"], chosen["tied"]) == (1, 3)
    loose = SelectionRule(utility_ratio=0.9, retain_ratio=0.9, tie_tolerance=0.05)
    near = [point("npo", 0, 0.50, quality=0.2), point("npo", 1, 0.54, quality=0.9), point("npo", 2, 0.6, quality=1.0)]
    assert select_points(near, ["npo"], TARGET, loose)["npo"]["index"] == 1


def test_a_method_with_no_point_meeting_the_floor_is_reported_not_dropped():
    points = [point("rmu", 0, 0.1, utility=0.1), point("rmu", 1, 0.2, retain=0.1), point("ga", 0, 0.7)]
    selection = select_points(points, ["rmu", "ga", "grin"], TARGET, RULE)
    assert list(selection) == ["rmu", "ga", "grin"]
    assert selection["rmu"]["status"] == NO_POINT_MEETS_FLOOR and "index" not in selection["rmu"]
    assert selection["ga"]["status"] == SELECTED and selection["ga"]["index"] == 0
    assert selection["grin"]["status"] == NO_POINT_RUN
    rows = selected_rows(points, selection)
    assert rows["rmu"] == {} and rows["ga"]["forget_rouge"] == 0.7 and rows["ga"]["wall_s"] == 1.0
    table = selection_table(
        [
            {"method": m, "status": s["status"], "point": s.get("index"), "params": s.get("params")}
            for m, s in selection.items()
        ]
    )
    assert "| rmu | no point meets the utility floor |" in table and "| ga | point 0 | lr=0 |" in table


def test_each_method_is_judged_on_its_own_points_only():
    points = [point("ga", 0, 0.2), point("npo", 0, 0.6), point("npo", 1, 0.4)]
    selection = select_points(points, ["ga", "npo"], TARGET, RULE)
    assert (selection["ga"]["index"], selection["npo"]["index"]) == (0, 1)


def test_a_missing_or_nan_metric_never_passes_a_floor():
    bad = point("ga", 0, 0.1)
    bad["row"]["model_utility"] = float("nan")
    missing = point("ga", 1, 0.2)
    del missing["row"]["retain_rouge"]
    assert select_points([bad, missing], ["ga"], TARGET, RULE)["ga"]["status"] == NO_POINT_MEETS_FLOOR


def test_bracketing_tells_whether_the_grid_reaches_the_oracle_or_crosses_the_floor():
    assert bracketing([point("ga", 0, 0.9)], TARGET, ORACLE, RULE, 0.05) == {
        "reaches_oracle": False,
        "crosses_floor": False,
        "brackets": False,
        "forgets_at_floor": False,
    }
    reached = bracketing([point("ga", 0, 0.9), point("ga", 1, 0.44, utility=0.1)], TARGET, ORACLE, RULE, 0.05)
    assert reached["reaches_oracle"] and reached["crosses_floor"] and not reached["forgets_at_floor"]
    assert bracketing([point("ga", 0, 0.45)], TARGET, ORACLE, RULE, 0.05)["forgets_at_floor"]


def test_rule_reads_its_params_block():
    rule = SelectionRule.from_settings({"utility_ratio": 0.8, "retain_ratio": 0.7, "tie_break": "forget_quality"})
    assert (rule.utility_ratio, rule.retain_ratio, rule.objective) == (0.8, 0.7, "forget_rouge")


def test_a_point_override_lands_in_the_methods_own_params_block():
    from codeunlearn.methods import get_method

    assert get_method("codeunlearn").params_override({"num_codes_to_disable": 8}) == {
        "select": {"num_codes_to_disable": 8}
    }
    assert get_method("npo").params_override({"beta": 0.5}) == {"methods": {"npo": {"beta": 0.5}}}


@pytest.mark.parametrize("profile,least", [("smoke", 2), ("default", 6)])
def test_every_compared_method_has_a_grid_of_the_profiles_size(profile, least):
    from tasks.context import make_context
    from tasks.tune import method_grid

    ctx = make_context(profile)
    for method in ctx.settings["compare"]["methods"]:
        size = len(method_grid(ctx, method))
        if profile == "smoke":
            assert size == least, method
        elif method != "codeunlearn":
            assert size >= least, method


def test_the_default_grids_hold_the_published_settings():
    from tasks.context import make_context
    from tasks.tune import method_grid

    ctx = make_context("default")
    grids = {m: method_grid(ctx, m) for m in ("ga", "npo", "rmu", "zerounlearn")}
    assert any(p["lr"] == 1.0e-5 for p in grids["ga"])  # TOFU
    assert any(p["lr"] == 1.0e-5 and p["beta"] == 0.1 for p in grids["npo"])  # NPO
    assert any(p["lr"] == 5.0e-5 and p["steering_coeff"] == 6.5 for p in grids["rmu"])  # WMDP
    assert any(p["layers"] == [17, 18, 19] for p in grids["zerounlearn"])


def test_a_points_key_changes_with_its_params_and_nothing_else_of_the_grid(tmp_path):
    from tasks.context import make_context
    from tasks.tune import point_key
    from tests.conftest import write_params

    params = write_params(tmp_path)
    ctx = make_context("smoke", params)
    key = point_key(ctx, "npo", {"lr": 3.0e-4, "beta": 0.1})
    assert key == point_key(make_context("smoke", params), "npo", {"lr": 3.0e-4, "beta": 0.1})
    assert key != point_key(ctx, "npo", {"lr": 3.0e-4, "beta": 0.5})
    assert key != point_key(ctx, "graddiff", {"lr": 3.0e-4})
    wider = make_context("smoke", params, {"compare": {"tune": {"grids": {"npo": [{"lr": [1.0, 2.0]}]}}}})
    assert point_key(wider, "npo", {"lr": 3.0e-4, "beta": 0.1}) == key  # widening a grid keeps its points
    quiet = make_context("smoke", params, {"progress": not ctx.settings["progress"]})
    assert point_key(quiet, "npo", {"lr": 3.0e-4, "beta": 0.1}) == key
    changed = make_context("smoke", params, {"evaluate": {"retain_eval_size": 3}})
    assert point_key(changed, "npo", {"lr": 3.0e-4, "beta": 0.1}) != key


def test_a_finished_point_is_read_back_and_a_stale_one_is_not(tmp_path):
    from codeunlearn.io import write_json
    from tasks.context import make_context
    from tasks.tune import completed_point, point_file, point_key
    from tests.conftest import write_params

    ctx = make_context("smoke", write_params(tmp_path))
    key = point_key(ctx, "ga", {"lr": 1.0})
    assert completed_point(ctx, "ga", key) is None
    write_json(point_file(ctx, "ga", key), {"key": key, "row": {"forget_rouge": 0.1}})
    assert completed_point(ctx, "ga", key)["row"] == {"forget_rouge": 0.1}
    write_json(point_file(ctx, "ga", key), {"key": "other", "row": {}})
    assert completed_point(ctx, "ga", key) is None
    write_json(point_file(ctx, "ga", key), {"key": key, "row": {}})
    no_resume = make_context("smoke", write_params(tmp_path, {"resume": False}))
    assert completed_point(no_resume, "ga", key) is None


def test_the_frontier_plot_rings_the_selected_points(tmp_path):
    from codeunlearn.report.plots import tune_frontier_plot

    points = [point("ga", 0, 0.9), point("ga", 1, 0.5), point("rmu", 0, 0.2, utility=0.1)]
    selection = select_points(points, ["ga", "rmu"], TARGET, RULE)
    summary = {"points": points, "selection": selection, "target": TARGET, "oracle": ORACLE}
    summary["floors"] = RULE.floors(TARGET)
    tune_frontier_plot(summary, tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").stat().st_size > 0


def test_the_bench_leaderboard_carries_the_tuned_rows_with_their_params(tmp_path):
    from bench.run import leaderboard_payload
    from codeunlearn.io import write_json
    from tasks.context import make_context
    from tests.conftest import write_params

    ctx = make_context("smoke", write_params(tmp_path))
    rows = [{"method": "ga", "status": SELECTED, "point": 1, "params": {"lr": 1.0}, "forget_rouge": 0.2}]
    write_json(ctx.stage_dir("tune") / "tune.json", {"leaderboard": rows, "git_commit": "c0ffee"})
    payload = leaderboard_payload(ctx)
    assert payload["tuned_rows"] == rows and payload["tune_git_commit"] == "c0ffee"


def test_a_points_code_is_its_own_methods_and_the_shared_code_never_another_methods():
    from tasks.tune import code_fingerprint, point_code_files
    from tests.conftest import REPO_ROOT

    methods = REPO_ROOT / "codeunlearn" / "methods"
    npo = set(point_code_files("npo"))
    assert {methods / "npo.py", methods / "graddiff.py", methods / "base.py"} <= npo  # graddiff: npo imports it
    assert REPO_ROOT / "tasks" / "tune.py" in npo and REPO_ROOT / "codeunlearn" / "eval" / "suite.py" in npo
    assert not {methods / "rmu.py", methods / "ga.py", methods / "zerounlearn" / "method.py"} & npo
    assert methods / "codeunlearn" / "select.py" not in npo
    assert methods / "codeunlearn" / "select.py" in point_code_files("codeunlearn")
    assert not any(path.is_relative_to(REPO_ROOT / "codeunlearn" / "report") for path in npo)
    assert code_fingerprint("npo") != code_fingerprint("rmu")


def test_the_tuned_comparison_runs_each_method_at_its_selected_point(tmp_path):
    from codeunlearn.io import read_json, write_json
    from tasks import compare
    from tasks.context import make_context
    from tests.conftest import write_params

    params = write_params(tmp_path)
    ctx = make_context("smoke", params, {"compare": {"tuned": True}})
    with pytest.raises(FileNotFoundError, match=r"tune\.json: no tuning summary; run python -m flows\.tune"):
        compare.tuned_contexts.fn(ctx, ["npo"])
    selection = {
        "npo": {"status": SELECTED, "index": 1, "params": {"beta": 0.5}},
        "ga": {"status": NO_POINT_MEETS_FLOOR},
    }
    summary = {"selection": selection, "git_commit": "abc1234", "params_hash": "p0"}
    write_json(ctx.stage_dir("tune") / "tune.json", summary)
    with pytest.raises(KeyError, match="no grid run for rmu"):
        compare.tuned_contexts.fn(ctx, ["npo", "rmu"])

    contexts = compare.tuned_contexts.fn(ctx, ["npo", "ga"])
    assert list(contexts) == ["npo"]  # ga's grid never met the floor: left out, and said so
    assert contexts["npo"].settings["methods"]["npo"]["beta"] == 0.5
    plain = make_context("smoke", params)
    assert plain.settings["methods"]["npo"]["beta"] != 0.5
    assert compare.method_fingerprint(contexts["npo"], "npo") != compare.method_fingerprint(plain, "npo")
    # The tuned runs live beside the literature settings' and share the references' evaluations.
    assert compare.method_dir(contexts["npo"], "npo") == ctx.stage_dir("compare") / "tuned" / "npo"
    assert compare.method_dir(contexts["npo"], "oracle") == compare.method_dir(plain, "oracle")
    assert compare.method_dir(plain, "npo") == ctx.stage_dir("compare") / "npo"
    saved = read_json(ctx.stage_dir("compare") / "tuned" / "selection.json")
    assert saved == {"tune_git_commit": "abc1234", "tune_params_hash": "p0", "selection": selection}
    notes = compare.selection_notes(ctx)
    assert "- npo: point 1, {'beta': 0.5}" in notes and f"- ga: {NO_POINT_MEETS_FLOOR}" in notes
    assert compare.selection_notes(plain) == ""
