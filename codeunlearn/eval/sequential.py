"""Sequential and growing CodeUnlearn requests: MUSE's sustainability and scalability criteria.

* **Sustainability** (MUSE criterion 6): requests arrive one after another and each starts from the
  model the previous one left. Request i's codes are selected with the masks of requests 1..i-1
  applied (so the chi-squared test sees what is still there) and added to them
  (``CodeMask.merged_with``). After every request: forget ROUGE on each request's set (the current
  one, the first one, all requested so far, the ones not yet requested) and retain ROUGE on the
  authors no request touches, beside a random mask of the same total size.
* **Scalability** (criterion 5): one request per forget-set size (e.g. 1, 2, 4 authors), each from
  the unmasked codebook model, with the same retain evaluation set at every size.

The forget sets are cut by author from the pipeline's own splits (the forget split's authors first,
then the retain split's, in order): the codebook model was trained on all of them, so every request
removes knowledge the model has. The authors no step uses are the fixed retain set; the selection's
control at each step is every author not being forgotten at that step. Deviation from MUSE: it cuts
News folds (``sust/forget_1..4``, ``scal/forget_1..4``) and retrains per request; here TOFU authors
and ROUGE-L recall, and a request is a mask (no gradient step).

Everything returned is numbers, counts and hashes; never the records' text.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from torch import nn

from codeunlearn.data.records import records_sha256
from codeunlearn.methods.codeunlearn.codebook import CodebookBottleneck
from codeunlearn.methods.codeunlearn.controls import build_control
from codeunlearn.methods.codeunlearn.gate import GateCalibration, gate_mask
from codeunlearn.methods.codeunlearn.mask import CodeMask, apply_mask, random_mask_like, unmask
from codeunlearn.methods.codeunlearn.select import SelectionSpec, select_mask
from codeunlearn.metrics import muse
from codeunlearn.metrics.sets import evenly_spaced

# Mean forget / retain metric (ROUGE-L recall) of the model as it stands, one per record set: every set
# scored under the same mask comes in one call, so the scorer can decode them in shared batches.
Scorer = Callable[[Sequence[Sequence[Any]]], list[float]]


# Each experiment's result file in the sequential stage's folder.
FILES = {"sustainability": "sustainability.json", "scalability": "scalability.json"}


@dataclass(frozen=True)
class StudySpec:
    """How a study measures each step: the forget / retain subsets scored (evenly spaced; 0 or less:
    all), whether a matched random-code control runs beside, and the control's seed."""

    forget_eval_size: int
    retain_eval_size: int
    random_control: bool
    seed: int


def group_by_subject(records: Sequence[Any]) -> list[list[Any]]:
    """Records grouped by ``subject`` (the author), groups in order of first appearance."""
    groups: dict[str, list[Any]] = {}
    for record in records:
        groups.setdefault(getattr(record, "subject", ""), []).append(record)
    return list(groups.values())


@dataclass(frozen=True)
class Plan:
    """Forget records of each step, the fixed retain set, and each step's selection control."""

    steps: list[list[Any]]  # sustainability: one request's records; scalability: the whole forget set
    step_authors: list[int]
    controls: list[list[Any]]  # every author not forgotten at that step
    retain: list[Any]  # authors no step touches
    notes: list[str] = field(default_factory=list)  # what was cut to fit the available authors


def _flat(groups: Sequence[Sequence[Any]]) -> list[Any]:
    return [record for group in groups for record in group]


def sustainability_plan(authors: Sequence[Sequence[Any]], requests: int, authors_per_request: int = 1) -> Plan:
    """``requests`` requests of ``authors_per_request`` consecutive authors; at least one author is kept
    as the retain set (fewer requests are planned, and noted, when the authors run out)."""
    if requests < 1 or authors_per_request < 1:
        raise ValueError(f"requests and authors_per_request must be >= 1, got {requests}, {authors_per_request}")
    fits = (len(authors) - 1) // authors_per_request
    if fits < 1:
        raise ValueError(
            f"sustainability: {len(authors)} authors leave none to keep as the retain set "
            f"after one request of {authors_per_request}"
        )
    notes = []
    if fits < requests:
        notes.append(f"{requests} requests asked, {fits} fit {len(authors)} authors (one kept as retain)")
        requests = fits
    used = requests * authors_per_request
    steps = [_flat(authors[i * authors_per_request : (i + 1) * authors_per_request]) for i in range(requests)]
    controls = [_flat(authors[(i + 1) * authors_per_request :]) for i in range(requests)]
    return Plan(steps, [authors_per_request] * requests, controls, _flat(authors[used:]), notes)


def scalability_plan(authors: Sequence[Sequence[Any]], sizes: Sequence[int]) -> Plan:
    """One forget set per size (its first ``size`` authors); sizes that leave no retain author are dropped."""
    if not sizes or any(size < 1 for size in sizes) or list(sizes) != sorted(set(sizes)):
        raise ValueError(f"scalability sizes must be increasing positive author counts, got {list(sizes)}")
    fitting = [size for size in sizes if size < len(authors)]
    notes = []
    if len(fitting) < len(sizes):
        dropped = [size for size in sizes if size not in fitting]
        notes.append(f"sizes {dropped} dropped: {len(authors)} authors, one kept as retain")
    if not fitting:
        raise ValueError(f"scalability: no size in {list(sizes)} leaves a retain author out of {len(authors)}")
    steps = [_flat(authors[:size]) for size in fitting]
    controls = [_flat(authors[size:]) for size in fitting]
    return Plan(steps, fitting, controls, _flat(authors[max(fitting) :]), notes)


@dataclass(frozen=True)
class Selector:
    """CodeUnlearn's selection as the pipeline runs it: the ``select`` params and the control kind."""

    model: nn.Module
    bottleneck: CodebookBottleneck
    tokenizer: Any
    spec: SelectionSpec
    control: str  # "retain" or "name_swap" (controls.build_control)
    name_min_mentions: int
    gate: GateCalibration | None = None  # select.gate when enabled: each mask is gated, calibrated on ``pool``

    def __call__(self, forget: Sequence[Any], pool: Sequence[Any], num_codes: int, provenance: dict) -> CodeMask:
        """Codes enriched on ``forget`` against ``pool``, found with the bottleneck's current mask applied;
        with a gate, it watches the earlier requests' codes and this one's top codes."""
        control = build_control(self.control, forget, pool, self.name_min_mentions)
        spec = replace(self.spec, num_codes_to_disable=num_codes)
        details = {**provenance, "forget_sha256": records_sha256(forget), "forget_count": len(forget)}
        mask, _ = select_mask(
            self.model, self.bottleneck, self.tokenizer, forget, control, spec, details, retain=list(pool)
        )
        if self.gate is None:
            return mask
        return gate_mask(self.model, self.bottleneck, self.tokenizer, mask, pool, self.gate)


def _weighted(values: Sequence[float], weights: Sequence[int]) -> float | None:
    total = sum(weights)
    return float(np.dot(values, weights) / total) if total else None


def sustainability(
    select: Selector,
    plan: Plan,
    score: Scorer,
    spec: StudySpec,
) -> dict[str, Any]:
    """Run ``plan``'s requests in order, each adding its codes to the mask of the ones before.

    Returns ``baseline`` (no mask), ``rows`` (one per request: ``muse.sustainability_table`` with
    deltas against the baseline), the matrix ``forget_rouge_by_request[step][request]`` (step 0 =
    no mask) and per-step mask sizes. The bottleneck is left unmasked.
    """
    bottleneck = select.bottleneck
    evals = [evenly_spaced(step, spec.forget_eval_size) for step in plan.steps]
    sizes = [len(records) for records in evals]
    retain = evenly_spaced(plan.retain, spec.retain_eval_size)
    rng = np.random.default_rng(spec.seed)
    unmask(bottleneck)
    *first_scores, retain_before = score([*evals, retain])
    matrix = [first_scores]
    baseline = {"retain_rouge": retain_before, "forget_rouge_first": matrix[0][0]}
    results: list[dict[str, float]] = []
    masks: list[dict[str, Any]] = []
    active: CodeMask | None = None
    try:
        for index, forget in enumerate(plan.steps):
            began = time.perf_counter()
            unmask(bottleneck)
            if active is not None:
                apply_mask(bottleneck, active)
            new = select(forget, plan.controls[index], select.spec.num_codes_to_disable, {"request": index + 1})
            active = active.merged_with(new) if active is not None else new
            select_s = time.perf_counter() - began
            unmask(bottleneck)
            apply_mask(bottleneck, active)
            *by_request, retain_after = score([*evals, retain])
            matrix.append(by_request)
            done = index + 1
            row = {
                "new_codes": len(new.disabled_ids),
                "disabled": len(active.disabled_ids),
                "forget_rouge_current": by_request[index],
                "forget_rouge_current_before": matrix[0][index],
                "forget_rouge_first": by_request[0],
                "forget_rouge_requested": _weighted(by_request[:done], sizes[:done]),
                "retain_rouge": retain_after,
                "select_s": select_s,
            }
            pending = _weighted(by_request[done:], sizes[done:])
            if pending is not None:
                row["forget_rouge_pending"] = pending
                row["forget_rouge_pending_before"] = _weighted(matrix[0][done:], sizes[done:])
            if spec.random_control:
                unmask(bottleneck)
                apply_mask(bottleneck, random_mask_like(active, rng))
                *random_forget, random_retain = score([*evals[:done], retain])
                row["random_forget_rouge_requested"] = _weighted(random_forget, sizes[:done])
                row["random_retain_rouge"] = random_retain
            results.append(row)
            masks.append({"request": done, "new_ids": list(new.disabled_ids), "disabled": len(active.disabled_ids)})
    finally:
        unmask(bottleneck)
    metrics = [key for key in results[0] if all(key in row for row in results)]
    table = muse.sustainability_table(results, baseline=baseline, metrics=metrics)
    for row, result in zip(table, results, strict=True):
        row.update({k: v for k, v in result.items() if k not in row})  # keys only some steps have
    return {
        "baseline": baseline,
        "rows": table,
        "forget_rouge_by_request": matrix,
        "masks": masks,
        "plan": describe_plan(plan, evals, retain),
    }


def scalability(
    select: Selector,
    plan: Plan,
    score: Scorer,
    spec: StudySpec,
    codes_per_author: int | None = None,
    utility: Callable[[], dict[str, float]] | None = None,
) -> dict[str, Any]:
    """One request per forget-set size, each from the unmasked model; S' is the selection's, or
    ``codes_per_author`` x authors. ``utility`` (optional) measures the model as it stands (e.g. TOFU
    model utility, world-facts and real-authors ROUGE); its numbers join the baseline and each
    CodeUnlearn row. Returns ``baseline`` and ``rows`` (``muse.scalability_table``, ``forget_size`` in
    QAs). The bottleneck is left unmasked."""
    bottleneck = select.bottleneck
    evals = [evenly_spaced(step, spec.forget_eval_size) for step in plan.steps]
    retain = evenly_spaced(plan.retain, spec.retain_eval_size)
    rng = np.random.default_rng(spec.seed)
    unmask(bottleneck)
    baseline = {"retain_rouge": score([retain])[0], **(utility() if utility else {})}
    results: list[dict[str, float]] = []
    try:
        for index, forget in enumerate(plan.steps):
            authors = plan.step_authors[index]
            num_codes = codes_per_author * authors if codes_per_author else select.spec.num_codes_to_disable
            unmask(bottleneck)
            (before,) = score([evals[index]])
            began = time.perf_counter()
            mask = select(forget, plan.controls[index], num_codes, {"forget_authors": authors})
            select_s = time.perf_counter() - began
            apply_mask(bottleneck, mask)
            after, retain_after = score([evals[index], retain])
            row = {
                "authors": authors,
                "disabled": len(mask.disabled_ids),
                "forget_rouge_before": before,
                "forget_rouge": after,
                "retain_rouge": retain_after,
                "select_s": select_s,
                **(utility() if utility else {}),
            }
            if spec.random_control:
                unmask(bottleneck)
                apply_mask(bottleneck, random_mask_like(mask, rng))
                row["random_forget_rouge"], row["random_retain_rouge"] = score([evals[index], retain])
            results.append(row)
    finally:
        unmask(bottleneck)
    table = muse.scalability_table([len(step) for step in plan.steps], results, baseline=baseline)
    return {"baseline": baseline, "rows": table, "plan": describe_plan(plan, evals, retain)}


def describe_plan(plan: Plan, evals: Sequence[Sequence[Any]], retain: Sequence[Any]) -> dict[str, Any]:
    """Counts and hashes of every set (never text or names)."""
    return {
        "steps": [
            {
                "authors": authors,
                "count": len(step),
                "sha256": records_sha256(step),
                "eval_count": len(evaluated),
                "control_count": len(control),
            }
            for authors, step, evaluated, control in zip(
                plan.step_authors, plan.steps, evals, plan.controls, strict=True
            )
        ],
        "retain_count": len(plan.retain),
        "retain_eval_count": len(retain),
        "retain_sha256": records_sha256(plan.retain),
        "notes": list(plan.notes),
    }
