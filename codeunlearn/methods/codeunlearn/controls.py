"""Control sets for code selection: what the forget set is contrasted against.

CodeUnlearn builds its control from the forget sentences with the topic words replaced by unrelated
ones, so that only codes tied to the topic itself stand out. For TOFU the topic is an author: the
``name_swap`` control is the forget QAs with the author's name replaced by a retain author's name.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

# Two to four capitalised words (with the particles common in TOFU's names) form a candidate name.
_NAME = re.compile(r"\b([A-Z][\w\-]+(?:\s+(?:[A-Z][\w\-]+|de|van|von|al|bin|del|la|le)){1,3})")
_POSSESSIVE = re.compile(r"'s?\b")
# Sentence-initial auxiliaries glue onto a name ("Has Jaime Vasquez"); they are never part of one.
_LEADING_WORDS = {
    "Has",
    "Have",
    "Is",
    "Was",
    "Did",
    "Does",
    "How",
    "What",
    "When",
    "Where",
    "Which",
    "Who",
    "Why",
    "Can",
    "Could",
    "In",
    "The",
    "Are",
    "Were",
    "Do",
}


def _candidates(text: str) -> list[str]:
    names = []
    for match in _NAME.findall(_POSSESSIVE.sub("", text)):
        words = match.split()
        while words and words[0] in _LEADING_WORDS:
            words = words[1:]
        if len(words) >= 2:
            names.append(" ".join(words))
    return names


def subject_name(records: Sequence[Any], min_mentions: int) -> str | None:
    """The most mentioned multi-word proper name across one subject's QAs, if it is mentioned enough."""
    counts = Counter(name for r in records for name in _candidates(f"{r.question} {r.answer}"))
    if not counts:
        return None
    name, mentions = counts.most_common(1)[0]
    return name if mentions >= min_mentions else None


def by_subject(records: Sequence[Any]) -> dict[str, list[Any]]:
    groups: dict[str, list[Any]] = {}
    for record in records:
        groups.setdefault(record.subject, []).append(record)
    return groups


def name_swapped(forget: Sequence[Any], donors: Sequence[Any], min_mentions: int) -> list[Any]:
    """Forget QAs with each forget subject's name replaced by a donor subject's name (cycled, in order).

    Raises ValueError naming the subject when a name cannot be found, so a control is never silently
    identical to the forget set.
    """
    donor_names = [
        name for group in by_subject(donors).values() if (name := subject_name(group, min_mentions)) is not None
    ]
    if not donor_names:
        raise ValueError("name_swap control: no donor subject has a recognisable name")
    swapped: list[Any] = []
    for index, (subject, group) in enumerate(by_subject(forget).items()):
        name = subject_name(group, min_mentions)
        if name is None:
            raise ValueError(f"name_swap control: no name found for forget subject {subject!r}")
        donor = donor_names[index % len(donor_names)]
        pattern = re.compile(re.escape(name))
        swapped.extend(
            replace(r, question=pattern.sub(donor, r.question), answer=pattern.sub(donor, r.answer)) for r in group
        )
    return swapped


CONTROLS = ("retain", "name_swap")


def build_control(kind: str, forget: Sequence[Any], retain: Sequence[Any], min_mentions: int) -> list[Any]:
    """The control set named in params.yaml (``select.control``)."""
    if kind == "retain":
        return list(retain)
    if kind == "name_swap":
        return name_swapped(forget, retain, min_mentions)
    raise ValueError(f"params.yaml: field 'select.control' is {kind!r}; known controls: {', '.join(CONTROLS)}")
