"""Sustainability (sequential requests, cumulative masks) and scalability (growing forget sets) of CodeUnlearn."""

from __future__ import annotations

import json

import pytest
import torch

from codeunlearn.eval.sequential import (
    Selector,
    StudySpec,
    group_by_subject,
    scalability,
    scalability_plan,
    sustainability,
    sustainability_plan,
)
from codeunlearn.methods.codeunlearn.codebook import CodebookBottleneck, CodebookSpec, attach_codebook
from codeunlearn.methods.codeunlearn.select import SelectionSpec
from tests.conftest import qa

PEOPLE = ["Zorblat Quim", "Mira Tolland", "Ilse Varga", "Basil Ormond", "Tess Lund"]
FACTS = ["was born in {}", "writes about {}", "was taught by {}", "won a prize in {}"]
PLACES = ["Vexmoor harbour", "a mountain village", "grim ballads", "garden mysteries", "the Amber Anchor"]
SELECTION = SelectionSpec(
    num_codes_to_disable=4, alpha=1.0, smoothing=0.5, positions="all", batch_size=8, max_length=48, rounds=2
)


pytestmark = pytest.mark.usefixtures("one_thread")


def author_records() -> list:
    """Five made-up authors, four QAs each, in author order (as the pipeline's forget + retain splits)."""
    return [
        qa(f"What about {person} ({i})?", f"{person} {fact.format(PLACES[(a + i) % 5])}.", f"author-{a}", f"{a}-{i}")
        for a, person in enumerate(PEOPLE)
        for i, fact in enumerate(FACTS)
    ]


@pytest.fixture()
def selector(tiny_model, tiny_tokenizer) -> Selector:
    """The tiny Llama routed through an untrained codebook: selection runs, nothing needs to be learned."""
    torch.manual_seed(0)
    bottleneck = CodebookBottleneck(tiny_model.config.hidden_size, CodebookSpec(num_codes=64, k=4, layer=0))
    attach_codebook(tiny_model, bottleneck)
    return Selector(tiny_model, bottleneck, tiny_tokenizer, SELECTION, control="retain", name_min_mentions=5)


class Recorder:
    """A scorer that records which codes were disabled when it was called, and on how many records."""

    def __init__(self, bottleneck: CodebookBottleneck) -> None:
        self.bottleneck = bottleneck
        self.calls: list[tuple[frozenset[int], int]] = []  # one per record set scored
        self.sets_per_call: list[int] = []

    def __call__(self, record_sets) -> list[float]:
        disabled = frozenset(torch.nonzero(self.bottleneck.disabled).flatten().tolist())
        self.calls.extend((disabled, len(records)) for records in record_sets)
        self.sets_per_call.append(len(record_sets))
        return [len(disabled) / 64] * len(record_sets)


def test_authors_are_grouped_in_order_of_first_appearance():
    records = author_records()
    groups = group_by_subject(records[4:8] + records[:4] + records[8:])
    assert [group[0].subject for group in groups] == ["author-1", "author-0", "author-2", "author-3", "author-4"]
    assert [len(group) for group in groups] == [4] * 5


def test_sustainability_plan_keeps_unrequested_authors_as_retain():
    authors = group_by_subject(author_records())
    plan = sustainability_plan(authors, requests=3)
    assert [{r.subject for r in step} for step in plan.steps] == [{"author-0"}, {"author-1"}, {"author-2"}]
    assert {r.subject for r in plan.retain} == {"author-3", "author-4"}
    # Request i is contrasted with every author not forgotten by then (later requests included).
    assert [len(control) for control in plan.controls] == [16, 12, 8]
    assert plan.notes == []
    clipped = sustainability_plan(authors, requests=9, authors_per_request=2)
    assert len(clipped.steps) == 2 and len(clipped.retain) == 4 and "9 requests asked, 2 fit" in clipped.notes[0]
    with pytest.raises(ValueError, match="none to keep"):
        sustainability_plan(authors[:1], requests=1)
    with pytest.raises(ValueError):
        sustainability_plan(authors, requests=0)


def test_scalability_plan_grows_the_forget_set_and_drops_sizes_that_do_not_fit():
    authors = group_by_subject(author_records())
    plan = scalability_plan(authors, [1, 2, 4])
    assert [len(step) for step in plan.steps] == [4, 8, 16]
    assert plan.step_authors == [1, 2, 4]
    assert {r.subject for r in plan.retain} == {"author-4"}
    assert [len(control) for control in plan.controls] == [16, 12, 4]
    dropped = scalability_plan(authors, [2, 5, 8])
    assert dropped.step_authors == [2] and "[5, 8] dropped" in dropped.notes[0]
    for bad in ([], [2, 1], [0, 1], [1, 1]):
        with pytest.raises(ValueError):
            scalability_plan(authors, bad)
    with pytest.raises(ValueError, match="no size"):
        scalability_plan(authors, [5])


def test_sequential_requests_accumulate_their_masks(selector):
    plan = sustainability_plan(group_by_subject(author_records()), requests=3)
    scorer = Recorder(selector.bottleneck)
    result = sustainability(selector, plan, scorer, StudySpec(0, 0, random_control=True, seed=0))
    masks = [set(m["new_ids"]) for m in result["masks"]]
    assert all(masks), "every request disables codes"
    assert not (masks[0] & masks[1]) and not (masks[2] & (masks[0] | masks[1])), "requests never repeat a code"
    cumulative = [masks[0], masks[0] | masks[1], masks[0] | masks[1] | masks[2]]
    assert [m["disabled"] for m in result["masks"]] == [len(c) for c in cumulative]
    # Calls: baseline (3 request sets + retain), then per step 3 request sets + retain + random (done + retain).
    calls = scorer.calls
    assert [disabled for disabled, _ in calls[:4]] == [frozenset()] * 4
    offset = 4
    for step, active in enumerate(cumulative, start=1):
        measured = calls[offset : offset + 4]
        assert all(disabled == active for disabled, _ in measured), f"step {step} measured the cumulative mask"
        random = calls[offset + 4 : offset + 4 + step + 1]
        assert all(len(disabled) == len(active) and not disabled & active for disabled, _ in random)
        offset += 4 + step + 1
    assert offset == len(calls)
    # Every set scored under one mask comes in one call, so the scorer decodes them in shared batches.
    assert scorer.sets_per_call == [4, 4, 2, 4, 3, 4, 4]
    assert not selector.bottleneck.disabled.any(), "the bottleneck is left unmasked"
    rows = result["rows"]
    assert [row["request"] for row in rows] == [1, 2, 3]
    assert rows[2]["forget_rouge_requested"] == pytest.approx(len(cumulative[2]) / 64)
    assert rows[0]["retain_rouge_delta"] == pytest.approx(len(cumulative[0]) / 64)
    assert "forget_rouge_pending" in rows[0] and "forget_rouge_pending" not in rows[2]
    assert result["forget_rouge_by_request"][0] == [0.0, 0.0, 0.0]
    assert [step["count"] for step in result["plan"]["steps"]] == [4, 4, 4]
    assert "Zorblat" not in json.dumps(result), "numbers and hashes only"


def test_gated_sequential_requests_watch_every_earlier_requests_codes(selector):
    from dataclasses import replace

    from codeunlearn.methods.codeunlearn.gate import GateCalibration

    gated = replace(selector, gate=GateCalibration(0.95, min_tokens=2, batch_size=8, max_length=48, watch_codes=2))
    plan = sustainability_plan(group_by_subject(author_records()), requests=3)
    gates = []

    def scorer(record_sets) -> list[float]:
        gates.append(gated.bottleneck.gate)
        return [0.0] * len(record_sets)

    result = sustainability(gated, plan, scorer, StudySpec(0, 0, random_control=False, seed=0))
    watched = [gate.watch_ids for gate in dict.fromkeys(g for g in gates if g is not None)]
    assert [len(w) for w in watched] == [2, 4, 6]
    assert watched[1][:2] == watched[0] and watched[2][:4] == watched[1]
    assert [w[-2:] for w in watched] == [tuple(m["new_ids"][:2]) for m in result["masks"]]
    assert gated.bottleneck.gate is None and not gated.bottleneck.disabled.any()


def test_each_scalability_step_starts_from_the_unmasked_model(selector):
    plan = scalability_plan(group_by_subject(author_records()), [1, 2, 4])
    scorer = Recorder(selector.bottleneck)
    result = scalability(selector, plan, scorer, StudySpec(6, 0, random_control=False, seed=0), codes_per_author=3)
    rows = result["rows"]
    assert [row["forget_size"] for row in rows] == [4, 8, 16]
    assert [row["authors"] for row in rows] == [1, 2, 4]
    assert all(row["disabled"] <= 3 * row["authors"] for row in rows)
    # Per size: the before-score sees no mask; the after-scores see exactly that size's mask.
    before_calls = [scorer.calls[i] for i in (1, 4, 7)]
    assert all(disabled == frozenset() for disabled, _ in before_calls)
    assert [n for _, n in before_calls] == [4, 6, 6]  # forget_eval_size caps the scored QAs
    assert [len(scorer.calls[i][0]) for i in (2, 5, 8)] == [int(row["disabled"]) for row in rows]
    assert all("random_forget_rouge" not in row for row in rows)
    assert scorer.sets_per_call == [1, 1, 2, 1, 2, 1, 2]  # baseline retain, then per size: before, after + retain
    assert rows[0]["retain_rouge_delta"] == pytest.approx(rows[0]["disabled"] / 64)
    assert not selector.bottleneck.disabled.any()


def test_same_seed_gives_the_same_curves(tiny_tokenizer):
    from codeunlearn.models.tiny import TinyModelSpec, build_tiny_llama

    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_tiny_llama(TinyModelSpec(32, 64, 2, 2, 128, 300, seed=0), tiny_tokenizer)
        bottleneck = CodebookBottleneck(32, CodebookSpec(num_codes=64, k=4, layer=0))
        attach_codebook(model, bottleneck)
        selector = Selector(model, bottleneck, tiny_tokenizer, SELECTION, "retain", 5)
        plan = sustainability_plan(group_by_subject(author_records()), requests=2)
        results.append(sustainability(selector, plan, Recorder(bottleneck), StudySpec(0, 0, True, seed=7)))
    timeless = [[{k: v for k, v in row.items() if k != "select_s"} for row in r["rows"]] for r in results]
    assert timeless[0] == timeless[1] and results[0]["masks"] == results[1]["masks"]


def test_the_plot_and_the_task_runner_handle_skipped_experiments(tmp_path):
    from codeunlearn.report.plots import sequential_plot
    from tasks.sequential import _run

    disabled = _run("scalability", {"enabled": False}, dict)
    assert disabled == {"enabled": False, "skipped": "disabled in params (evaluate.scalability.enabled)"}

    def too_few() -> dict:
        raise ValueError("no size fits")

    assert _run("scalability", {"enabled": True}, too_few) == {"enabled": True, "skipped": "no size fits"}
    sustained = {
        "baseline": {"forget_rouge_first": 0.9, "retain_rouge": 0.8},
        "rows": [
            {
                "request": 1,
                "forget_rouge_first": 0.2,
                "forget_rouge_requested": 0.2,
                "forget_rouge_current": 0.2,
                "retain_rouge": 0.75,
            }
        ],
    }
    sequential_plot({"sustainability": sustained, "scalability": disabled}, tmp_path / "sequential.png")
    assert (tmp_path / "sequential.png").stat().st_size > 0


def test_studies_report_shows_both_curves_and_says_why_one_did_not_run():
    from codeunlearn.report.run import render_report
    from codeunlearn.report.studies import render_studies_report
    from tests.conftest import report_inputs

    sustained = {
        "baseline": {"forget_rouge_first": 0.9, "retain_rouge": 0.8},
        "rows": [
            {
                "request": 1.0,
                "disabled": 4.0,
                "forget_rouge_current": 0.2,
                "forget_rouge_first": 0.2,
                "forget_rouge_requested": 0.2,
                "forget_rouge_pending": 0.85,
                "retain_rouge": 0.75,
            },
            {
                "request": 2.0,
                "disabled": 8.0,
                "forget_rouge_current": 0.3,
                "forget_rouge_first": 0.25,
                "forget_rouge_requested": 0.275,
                "retain_rouge": 0.7,
            },
        ],
        "plan": {"notes": ["5 requests asked, 2 fit 3 authors (one kept as retain)"]},
    }
    skipped = {"enabled": True, "skipped": "scalability: no size in [5] leaves a retain author out of 3"}
    metrics = {"target": {"forget_rouge": 0.9, "retain_rouge": 0.8}}
    studies = {"profile": "test", "params_hash": "0" * 64, "codebook_sha256": "b" * 64}
    text = render_studies_report({**studies, "sequential": {"sustainability": sustained, "scalability": skipped}}, {})
    assert "### Sustainability: sequential requests" in text
    assert "| 1 | 4 | n/a | 0.200 | 0.200 | 0.200 | 0.850 | 0.750 | n/a | n/a |" in text
    assert "| 2 | 8 | n/a | 0.300 | 0.250 | 0.275 | n/a | 0.700 |" in text
    assert "- 5 requests asked, 2 fit" in text
    assert "Not run: scalability: no size in [5]" in text
    assert "### Sustainability" not in render_studies_report(studies, {})
    # The main job's report never waits for, nor shows, the studies.
    main_report = render_report(report_inputs(metrics, {}, {"sustainability": sustained}), {})
    assert "### Sustainability" not in main_report


def test_scalability_measures_utility_under_each_sizes_mask(selector):
    plan = scalability_plan(group_by_subject(author_records()), [1, 2])
    scorer = Recorder(selector.bottleneck)
    seen: list[int] = []

    def utility() -> dict[str, float]:
        seen.append(int(selector.bottleneck.disabled.sum()))
        return {"model_utility": 0.5 - 0.01 * seen[-1]}

    result = scalability(
        selector,
        plan,
        scorer,
        StudySpec(4, 0, random_control=False, seed=0),
        codes_per_author=3,
        utility=utility,
    )
    rows = result["rows"]
    assert seen[0] == 0 and result["baseline"]["model_utility"] == 0.5  # the unmasked model first
    assert seen[1:] == [int(row["disabled"]) for row in rows]  # then each size under its own mask
    assert [row["model_utility"] for row in rows] == [0.5 - 0.01 * n for n in seen[1:]]
