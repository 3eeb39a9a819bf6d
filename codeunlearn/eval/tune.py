"""Tuning every method on the same budget: grid expansion, the selection rule, the bracketing check.

Pure functions on plain dicts (no model, no Prefect): ``tasks.tune`` runs the points and ``flows.tune``
chains them. A grid point is one ``{knob: value}`` override of a method's params block; its record holds
the method, the point's index in the grid, its params and its evaluation row (``eval.suite.Suite.run``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from codeunlearn.report.tables import markdown_table

NO_POINT_MEETS_FLOOR = "no point meets the utility floor"
NO_POINT_RUN = "no point run"
SELECTED = "selected"


class GridError(ValueError):
    pass


def grid_points(blocks: Sequence[Mapping[str, Any]], known: Iterable[str], where: str) -> list[dict[str, Any]]:
    """The points of a grid: the union, in order and without repeats, of each block's Cartesian product.

    Each block maps a knob of the method's params block to a list of values (a scalar is one value;
    a list-valued knob such as ``layers`` is written as a list of lists). A knob the method does not
    have is an error naming ``where`` (the grid's place in params.yaml), the block and the knob.
    """
    if isinstance(blocks, Mapping) or not isinstance(blocks, Sequence):
        raise GridError(f"{where}: a grid is a list of blocks ({{knob: [values]}}), got {type(blocks).__name__}")
    known = set(known)
    points: list[dict[str, Any]] = []
    for position, block in enumerate(blocks):
        if not isinstance(block, Mapping) or not block:
            raise GridError(f"{where}[{position}]: a block is a non-empty mapping of knob to values")
        unknown = sorted(set(block) - known)
        if unknown:
            raise GridError(f"{where}[{position}]: {', '.join(unknown)} not in the method's params block")
        knobs = list(block)
        axes = [block[k] if isinstance(block[k], list) else [block[k]] for k in knobs]
        for values in itertools.product(*axes):
            point = dict(zip(knobs, values, strict=True))
            if point not in points:
                points.append(point)
    return points


def point_label(params: Mapping[str, Any]) -> str:
    """A short, stable name of a point's params: ``lr=0.0003 steps=20``."""
    return " ".join(f"{k}={_compact(v)}" for k, v in params.items())


def _compact(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(_compact(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@dataclass(frozen=True)
class SelectionRule:
    """The same rule for every method: among the points whose model utility and retain ROUGE keep at
    least ``utility_ratio`` and ``retain_ratio`` of the target's, the lowest ``objective`` (lower is
    better); points within ``tie_tolerance`` of it are tied and the highest ``tie_break`` wins, then the
    earlier grid point."""

    utility_ratio: float
    retain_ratio: float
    objective: str = "forget_rouge"
    tie_break: str = "forget_quality"
    tie_tolerance: float = 0.0

    @classmethod
    def from_settings(cls, block: Mapping[str, Any]) -> SelectionRule:
        return cls(**{name: block[name] for name in cls.__dataclass_fields__ if name in block})

    def floors(self, target: Mapping[str, Any]) -> dict[str, float]:
        return {
            "model_utility": self.utility_ratio * float(target["model_utility"]),
            "retain_rouge": self.retain_ratio * float(target["retain_rouge"]),
        }

    def meets_floor(self, row: Mapping[str, Any], target: Mapping[str, Any]) -> bool:
        return all(_number(row.get(metric)) >= floor for metric, floor in self.floors(target).items())


def _number(value: Any) -> float:
    """A metric as a float; a missing or NaN one counts as the worst value (it cannot pass a floor)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return -math.inf
    return float(value)


def _cost(value: Any) -> float:
    """A lower-is-better metric as a float; a missing or NaN one counts as the worst value."""
    return -_number(None if value is None else -float(value))


def select_point(points: Sequence[Mapping[str, Any]], target: Mapping[str, Any], rule: SelectionRule) -> dict:
    """One method's points (records with ``index``, ``params`` and ``row``) -> its selection: the chosen
    point, or the status ``NO_POINT_MEETS_FLOOR`` (the method stays in the table, reported as such)."""
    if not points:
        return {"status": NO_POINT_RUN, "points": 0, "meeting_floor": 0}
    eligible = [p for p in points if rule.meets_floor(p["row"], target)]
    summary = {"points": len(points), "meeting_floor": len(eligible), "floors": rule.floors(target)}
    if not eligible:
        return {"status": NO_POINT_MEETS_FLOOR, **summary}
    best = min(_cost(p["row"].get(rule.objective)) for p in eligible)
    tied = [p for p in eligible if _cost(p["row"].get(rule.objective)) <= best + rule.tie_tolerance]
    chosen = min(tied, key=lambda p: (-_number(p["row"].get(rule.tie_break)), p["index"]))
    return {"status": SELECTED, **summary, "index": chosen["index"], "params": chosen["params"], "tied": len(tied)}


def select_points(
    points: Sequence[Mapping[str, Any]], methods: Sequence[str], target: Mapping[str, Any], rule: SelectionRule
) -> dict[str, dict]:
    """Every method's selection (``select_point``), each method judged on its own points only."""
    return {m: select_point([p for p in points if p["method"] == m], target, rule) for m in methods}


def bracketing(
    points: Sequence[Mapping[str, Any]],
    target: Mapping[str, Any],
    oracle: Mapping[str, Any],
    rule: SelectionRule,
    margin: float,
) -> dict[str, bool]:
    """Whether one method's grid brackets the trade-off: some point forgets to the oracle's level
    (forget ROUGE <= the oracle's + ``margin``) or falls below the utility floor; and whether one point
    does both at once (forgets to the oracle's level while meeting the floor)."""
    level = float(oracle["forget_rouge"]) + margin
    forgets = [float(p["row"]["forget_rouge"]) <= level for p in points]
    meets = [rule.meets_floor(p["row"], target) for p in points]
    return {
        "reaches_oracle": any(forgets),
        "crosses_floor": not all(meets),
        "brackets": any(forgets) or not all(meets),
        "forgets_at_floor": any(f and m for f, m in zip(forgets, meets, strict=True)),
    }


def selected_rows(
    points: Sequence[Mapping[str, Any]], selection: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Each method's selected point as a comparison result (its row and unlearning stats), keyed by
    method; a method without a selected point has an empty row (its leaderboard cells read n/a)."""
    by_key = {(p["method"], p["index"]): p for p in points}
    rows: dict[str, dict[str, Any]] = {}
    for method, chosen in selection.items():
        point = by_key.get((method, chosen.get("index")))
        rows[method] = {**point["row"], **point["stats"]} if point else {}
    return rows


SELECTION_COLUMNS = ("forget_rouge", "retain_rouge", "model_utility", "forget_quality", "wall_s")


def selection_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The leaderboard of selected points as markdown: each method's status, point and params beside
    its scores (a method with no point meeting the floor keeps its row, its scores n/a)."""
    header = ["method", "selected", "params", *SELECTION_COLUMNS]
    body = (
        [
            row["method"],
            f"point {row['point']}" if row.get("point") is not None else row["status"],
            point_label(row["params"]) if row.get("params") else "",
            *(_cell(row.get(col)) for col in SELECTION_COLUMNS),
        ]
        for row in rows
    )
    return markdown_table(header, body) + "\n"


def _cell(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)
