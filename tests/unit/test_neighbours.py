"""The neighbour set's split (``codeunlearn.data.neighbours``): deterministic, subject-disjoint."""

from __future__ import annotations

import pytest

from codeunlearn.data.neighbours import NeighbourSplit, split_neighbours
from codeunlearn.data.records import DataError, QARecord


def _records(subjects: list[str]) -> list[QARecord]:
    return [QARecord(f"r-{i}", f"question {i}?", f"answer {i}.", s) for i, s in enumerate(subjects)]


def test_whole_subjects_go_to_each_side_the_same_way_every_time():
    records = _records([s for s in "abcdef" for _ in range(3)])
    spec = NeighbourSplit(control_share=0.5, seed=0)
    control, held_out = split_neighbours(records, spec)
    assert (control, held_out) == split_neighbours(records, spec)
    assert {r.subject for r in control}.isdisjoint({r.subject for r in held_out})
    assert len({r.subject for r in control}) == 3 and len(control) + len(held_out) == len(records)


def test_each_side_keeps_at_least_one_subject():
    control, held_out = split_neighbours(_records(["a", "a", "b"]), NeighbourSplit(control_share=0.9, seed=3))
    assert {r.subject for r in control} and {r.subject for r in held_out}


def test_records_without_subjects_alternate():
    records = _records([""] * 6)
    control, held_out = split_neighbours(records, NeighbourSplit(control_share=0.5, seed=0))
    assert [r.id for r in control] == ["r-1", "r-3", "r-5"] and [r.id for r in held_out] == ["r-0", "r-2", "r-4"]


def test_one_subject_splits_by_rows():
    control, held_out = split_neighbours(_records(["a"] * 4), NeighbourSplit(control_share=0.5, seed=0))
    assert len(control) == len(held_out) == 2


def test_a_neighbour_set_too_small_to_split_is_refused():
    with pytest.raises(DataError, match="at least 2 records"):
        split_neighbours(_records(["a"]), NeighbourSplit(control_share=0.5, seed=0), "n.jsonl")


def test_the_share_must_leave_both_sides():
    with pytest.raises(ValueError, match="control_share"):
        NeighbourSplit(control_share=1.0, seed=0)
