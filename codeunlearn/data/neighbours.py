"""A request's neighbour set (``codeunlearn forget --retain-file R``), split in two.

One part is the request's control (CodeUnlearn's control set and the gate's calibration, in place of the
profile's retain split); the other is held out, never seen by the method, and scored before and after
the request, so collateral damage in the user's own domain is measured. Deterministic: the same file and
``request.neighbour_split`` params always give the same halves.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from codeunlearn.data.records import DataError


@dataclass(frozen=True)
class NeighbourSplit:
    """``request.neighbour_split`` in params.yaml: the control's share of the neighbour set and the seed
    that picks which subjects go to the control."""

    control_share: float
    seed: int

    def __post_init__(self) -> None:
        if not 0.0 < self.control_share < 1.0:
            raise ValueError(f"request.neighbour_split.control_share is {self.control_share}; it must be in (0, 1)")


def _count(total: int, share: float) -> int:
    """How many of ``total`` units the control takes: at least one, and at least one left to score."""
    return min(max(round(total * share), 1), total - 1)


def _by_subject(records: Sequence[Any], spec: NeighbourSplit) -> tuple[list[Any], list[Any]]:
    subjects = sorted({r.subject for r in records})
    random.Random(spec.seed).shuffle(subjects)
    control = set(subjects[: _count(len(subjects), spec.control_share)])
    return [r for r in records if r.subject in control], [r for r in records if r.subject not in control]


def _by_rows(records: Sequence[Any], spec: NeighbourSplit) -> tuple[list[Any], list[Any]]:
    """Interleaved rows: row i joins the control when the running share crosses an integer (0.5: alternate)."""
    take = [int((i + 1) * spec.control_share) > int(i * spec.control_share) for i in range(len(records))]
    pairs = list(zip(records, take, strict=True))
    return [r for r, t in pairs if t], [r for r, t in pairs if not t]


def split_neighbours(records: Sequence[Any], spec: NeighbourSplit, source: str = "") -> tuple[list[Any], list[Any]]:
    """(control, held_out) of a neighbour set: whole subjects to each side when every record has a subject
    and there are at least two, else interleaved rows. Raises ``DataError`` when a side would be empty."""
    if len(records) < 2:
        raise DataError(source, f"a neighbour set needs at least 2 records (control, held out); got {len(records)}")
    subjects = {getattr(r, "subject", "") for r in records}
    if "" not in subjects and len(subjects) >= 2:
        return _by_subject(records, spec)
    control, held_out = _by_rows(records, spec)
    if not control or not held_out:
        raise DataError(source, f"request.neighbour_split.control_share {spec.control_share} leaves a side empty")
    return control, held_out
