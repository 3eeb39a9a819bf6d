"""Forget, retain and holdout splits cut by author (TOFU's construction), and their summary.

No raw text in a summary or a warning: counts, distinct authors, row numbers and sha256 per split.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from codeunlearn.data.records import QARecord, normalize_text, records_sha256

log = logging.getLogger(__name__)


@dataclass
class Splits:
    forget: list[QARecord]
    retain: list[QARecord]
    holdout: list[QARecord]


def _authors_in_order(records: Sequence[QARecord]) -> list[str]:
    authors: dict[str, None] = {}
    for row, record in enumerate(records):
        if not record.subject:
            raise ValueError(f"record {record.id!r} (row {row}, 0-based) has no subject; cannot split by author")
        authors.setdefault(record.subject, None)
    return list(authors)


def drop_repeated_rows(records: Sequence[QARecord], split: str) -> list[QARecord]:
    """The records without a benchmark's own repeats: a row whose question and answer (case and spacing
    ignored) equal an earlier row's is dropped, with a warning naming the count. A question asked again
    with another answer (full.json rows 100 and 440, two authors) is another fact and stays."""
    seen: set[tuple[str, str]] = set()
    kept = []
    for record in records:
        key = (normalize_text(record.question), normalize_text(record.answer))
        if key not in seen:
            seen.add(key)
            kept.append(record)
    if len(kept) < len(records):
        log.warning("%s split: dropped %d repeated rows of %d", split, len(records) - len(kept), len(records))
    return kept


def split_by_author(records: Sequence[QARecord], n_forget: int, n_retain: int, n_holdout: int) -> Splits:
    """Cut forget / retain / holdout by author, deterministically (TOFU's construction).

    Authors are taken in first-appearance order: forget = the LAST ``n_forget`` authors, holdout = the
    ``n_holdout`` authors just before them (never trained on: membership-inference non-members),
    retain = the FIRST ``n_retain`` authors. Records keep their input order within each split, and
    a split's repeated rows are dropped (``drop_repeated_rows``).
    """
    if n_forget < 1 or n_retain < 0 or n_holdout < 0:
        raise ValueError(f"need n_forget >= 1, n_retain >= 0, n_holdout >= 0; got {n_forget}, {n_retain}, {n_holdout}")
    authors = _authors_in_order(records)
    needed = n_forget + n_holdout + n_retain
    if needed > len(authors):
        raise ValueError(
            f"splits would overlap: n_retain + n_holdout + n_forget = {needed} authors, "
            f"but the records have only {len(authors)}"
        )
    first_forget = len(authors) - n_forget
    forget = set(authors[first_forget:])
    holdout = set(authors[first_forget - n_holdout : first_forget])
    retain = set(authors[:n_retain])
    return Splits(
        *(
            drop_repeated_rows([r for r in records if r.subject in authors], name)
            for name, authors in (("forget", forget), ("retain", retain), ("holdout", holdout))
        )
    )


def split_retain_by_author(records: Sequence[QARecord], control_authors: int) -> tuple[list[QARecord], list[QARecord]]:
    """(control, scored): the retain split's first ``control_authors`` authors and the rest.

    The control authors are CodeUnlearn's control set and the gate's calibration; the scored authors
    are never seen by a selection, so their retain score is not protected by construction. 0 keeps
    the whole split on both sides (the pre-hold-out behaviour).
    """
    if control_authors == 0:
        return list(records), list(records)
    authors = _authors_in_order(records)
    if not 0 < control_authors < len(authors):
        raise ValueError(
            f"select.control_authors is {control_authors}, but the retain split has {len(authors)} authors: "
            "it must leave at least one author to score"
        )
    control = set(authors[:control_authors])
    return [r for r in records if r.subject in control], [r for r in records if r.subject not in control]


def _count_authors(records: Iterable[QARecord]) -> int:
    return len({r.subject for r in records if r.subject})


def split_summary(splits: Splits) -> dict[str, Any]:
    """Counts, distinct authors and sha256 per split, e.g. forget_count / forget_authors / forget_sha256.

    No raw text: safe to log.
    """
    summary: dict[str, Any] = {}
    for name in ("forget", "retain", "holdout"):
        records = getattr(splits, name)
        summary[f"{name}_count"] = len(records)
        summary[f"{name}_authors"] = _count_authors(records)
        summary[f"{name}_sha256"] = records_sha256(records)
    return summary
