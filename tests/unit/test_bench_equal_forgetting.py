"""bench.equal_forgetting picks NPO's grid point that forgets as much as CodeUnlearn's selected point."""

from __future__ import annotations

import pytest

from bench.equal_forgetting import equal_forgetting_point, selected_point


def _point(method: str, index: int, forget: float, steps: int | None = None, lr: float = 1e-5) -> dict:
    params = {"lr": lr} if steps is None else {"lr": lr, "steps": steps}
    row = {"forget_rouge": forget, "model_utility": 0.3, "retain_rouge": 0.8}
    return {"method": method, "index": index, "params": params, "row": row}


def _summary(*points: dict) -> dict:
    return {"points": list(points), "selection": {"codeunlearn": {"index": 1, "status": "selected"}}}


def _steps(params: dict) -> int:
    return params.get("steps", 20)  # a point without steps runs the method's default


def test_the_selected_point_is_the_rules_choice():
    summary = _summary(_point("codeunlearn", 0, 0.5), _point("codeunlearn", 1, 0.3), _point("npo", 1, 0.9))
    assert selected_point(summary, "codeunlearn")["row"]["forget_rouge"] == 0.3
    with pytest.raises(ValueError, match="no selected point for 'npo'"):
        selected_point(summary, "npo")


def test_the_cheapest_point_reaching_the_goal_wins_then_the_lower_forget_rouge():
    summary = _summary(
        _point("npo", 0, 0.25, steps=80),
        _point("npo", 1, 0.29, steps=40, lr=5e-5),
        _point("npo", 2, 0.28, steps=40, lr=1e-4),
        _point("npo", 3, 0.31),  # 20 steps, default: does not reach 0.3
        _point("ga", 4, 0.01, steps=1),  # another method's point never counts
    )
    chosen, reaches = equal_forgetting_point(summary, _steps, goal=0.3)
    assert reaches and chosen["index"] == 2


def test_without_a_point_reaching_the_goal_the_lowest_forget_rouge_is_taken_and_said():
    summary = _summary(_point("npo", 0, 0.6, steps=40), _point("npo", 1, 0.5, steps=80), _point("npo", 2, 0.7))
    chosen, reaches = equal_forgetting_point(summary, _steps, goal=0.3)
    assert not reaches and chosen["index"] == 1


def test_a_grid_without_the_baseline_is_an_error_naming_the_command():
    with pytest.raises(ValueError, match="bench.tune"):
        equal_forgetting_point(_summary(_point("codeunlearn", 1, 0.3)), _steps, goal=0.3)
