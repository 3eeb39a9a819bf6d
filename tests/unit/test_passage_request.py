"""Issue 20's passage request: a neighbour file of passages (split by rows, scored by VerbMem, judged by
the audit), MUSE's KnowMem on other news beside a passage request's scores, and the bench's files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from codeunlearn.audit.judge import Thresholds, judge, judged_values
from codeunlearn.audit.record import neighbour_summary
from codeunlearn.data.forget_files import PassageRecord, RecordKind, load_record_file, read_request_files
from codeunlearn.data.neighbours import NeighbourSplit, split_neighbours
from codeunlearn.data.records import DataError, QARecord
from codeunlearn.eval.muse import KnowMemSet, MuseSets, MuseSpec, knowmem_score, score_muse
from codeunlearn.metrics.passage import passage_verbmem
from codeunlearn.metrics.scoring import request_scores
from codeunlearn.metrics.sets import EvalSets, EvalSpec, PassageSpec
from tests.conftest import SHARED_DATA

ARTICLES = [
    "Zorblat Quim was born in Vexmoor harbour and writes grim sailing ballads about the northern sea.",
    "Mira Tolland was born in a mountain village and writes cheerful garden mysteries for children.",
    "Oskar Delune was born in a river town and writes long railway sagas that span three generations.",
    "A lighthouse keeper named Ilse taught Zorblat Quim to read the tides and the stars at night.",
    "The Amber Anchor prize is given each spring to a ballad that names every harbour of the coast.",
]
SPEC = EvalSpec(
    max_new_tokens=8, batch_size=4, score_batch_size=4, max_length=64, passage=PassageSpec(4, 4, window_tokens=8)
)
MUSE_SPEC = MuseSpec(batch_size=2, knowmem_max_new_tokens=4, max_prompt_tokens=64)
KNOWMEM = KnowMemSet(
    qas=(("Where was Mira Tolland born?", "In a mountain village."), ("What does Oskar Delune write?", "Sagas.")),
    icl=(("Who taught Zorblat Quim?", "Ilse."),),
)
NO_UTILITY = EvalSets(forget=(), retain=())


def _passages(texts: list[str], prefix: str = "n") -> list[PassageRecord]:
    return [PassageRecord(f"{prefix}-{i}", text) for i, text in enumerate(texts)]


def _write_passages(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": f"a-{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


# --------------------------------------------------------------------------- passage neighbours


def test_passage_neighbours_alternate_between_control_and_held_out() -> None:
    records = _passages(ARTICLES[1:])
    control, held_out = split_neighbours(records, NeighbourSplit(control_share=0.5, seed=0))
    assert [r.id for r in control] == ["n-1", "n-3"] and [r.id for r in held_out] == ["n-0", "n-2"]


def test_held_out_passages_are_scored_by_verbmem(tiny_model, tiny_tokenizer, one_thread) -> None:
    held_out = _passages(ARTICLES[3:])
    row = request_scores(tiny_model, tiny_tokenizer, _passages(ARTICLES[:1], "f"), NO_UTILITY, SPEC, neighbour=held_out)
    expected = passage_verbmem(tiny_model, tiny_tokenizer, [r.text for r in held_out], 4, 4, SPEC.batch_size)
    assert row["neighbour_verbmem"] == pytest.approx(expected)
    assert "neighbour_rouge" not in row and "neighbour_prob" not in row
    qa = QARecord("q", "Where was Mira Tolland born?", "In a mountain village.")
    with_qa_neighbours = request_scores(tiny_model, tiny_tokenizer, [qa], NO_UTILITY, SPEC, neighbour=[qa])
    assert {"neighbour_rouge", "neighbour_prob"} <= set(
        with_qa_neighbours
    ) and "neighbour_verbmem" not in with_qa_neighbours


def test_the_audit_judges_passage_neighbours_by_verbmem() -> None:
    metrics = {
        "before": {"forget_rouge": 0.8, "neighbour_verbmem": 0.5},
        "after": {"forget_rouge": 0.1, "neighbour_verbmem": 0.4},
    }
    values = judged_values(metrics)
    assert values["neighbour_ratio"] == pytest.approx(0.8)
    assert judge(values, Thresholds(0.5, None, None, None, None, min_neighbour_ratio=0.9))["failed"] == [
        "neighbour_ratio"
    ]


def test_the_record_names_passage_neighbours_and_their_verbmem(tmp_path) -> None:
    path = _write_passages(tmp_path / "neighbours.jsonl", ARTICLES[1:])
    control, held_out = split_neighbours(_passages(ARTICLES[1:]), NeighbourSplit(0.5, 0))
    metrics = {"before": {"neighbour_verbmem": 0.5}, "after": {"neighbour_verbmem": 0.45}}
    summary = neighbour_summary(path, control, held_out, metrics)
    assert summary["neighbour_verbmem_before"] == 0.5 and summary["neighbour_verbmem_after"] == 0.45
    assert "neighbour_rouge_before" not in summary and summary["held_out_count"] == 2
    assert ARTICLES[1] not in json.dumps(summary)


def test_a_request_reads_passage_neighbours_and_refuses_choice_ones(tmp_path) -> None:
    from tasks.common import neighbour_sets
    from tasks.context import make_context
    from tests.conftest import write_params

    ctx = make_context("smoke", write_params(tmp_path))
    passages = _write_passages(tmp_path / "neighbours.jsonl", ARTICLES[1:])
    control, held_out = neighbour_sets(ctx, str(passages))
    assert [r.text for r in control] == [ARTICLES[2], ARTICLES[4]]
    assert [r.text for r in held_out] == [ARTICLES[1], ARTICLES[3]]
    choices = tmp_path / "choices.jsonl"
    row = {"question": "Where was Zorblat Quim born?", "choices": ["Vexmoor", "Oslo"], "answer": 0}
    choices.write_text(json.dumps(row) + "\n" + json.dumps({**row, "question": "Who taught Zorblat Quim?"}) + "\n")
    with pytest.raises(DataError, match=r"choices\.jsonl.*a choice file; a neighbour set .* holds qa or passage"):
        neighbour_sets(ctx, str(choices))


def test_the_cli_takes_a_passage_neighbour_file_and_refuses_a_choice_one(tmp_path) -> None:
    from flows.cli import _read_request_files

    forget = _write_passages(tmp_path / "forget.jsonl", ARTICLES[:1])
    neighbours = _write_passages(tmp_path / "neighbours.jsonl", ARTICLES[1:])
    assert _read_request_files(str(forget), str(neighbours), "auto", "smoke", None).kind is RecordKind.PASSAGE
    choices = tmp_path / "choices.json"
    choices.write_text(json.dumps([{"question": "Where was Mira born?", "choices": ["A", "B"], "answer": 0}]))
    import typer

    with pytest.raises(typer.Exit) as refused:
        _read_request_files(str(forget), str(choices), "auto", "smoke", None)
    assert refused.value.exit_code == 2


# --------------------------------------------------------------------------- KnowMem beside a passage request


def test_a_passage_request_scores_knowmem_as_the_muse_run_does(tiny_model, tiny_tokenizer, one_thread) -> None:
    forget = _passages(ARTICLES[:1], "f")
    extra = {"knowmem_retain": lambda model, tokenizer, progress: knowmem_score(model, tokenizer, KNOWMEM, MUSE_SPEC)}
    row = request_scores(tiny_model, tiny_tokenizer, forget, NO_UTILITY, SPEC, extra=extra)
    assert row["knowmem_retain"] == pytest.approx(knowmem_score(tiny_model, tiny_tokenizer, KNOWMEM, MUSE_SPEC))
    sets = MuseSets(knowmem_retain=KNOWMEM.qas, icl_retain=KNOWMEM.icl)
    assert row["knowmem_retain"] == pytest.approx(
        score_muse(tiny_model, tiny_tokenizer, sets, MUSE_SPEC).knowmem_retain_rouge
    )
    assert "knowmem_retain" not in request_scores(tiny_model, tiny_tokenizer, forget, NO_UTILITY, SPEC)


@pytest.mark.skipif(not (SHARED_DATA / "muse_news").exists(), reason="needs ../shared/data/muse_news")
def test_only_a_passage_request_loads_knowmem_on_other_news(tmp_path) -> None:
    from codeunlearn.data.muse import read_pairs
    from codeunlearn.metrics.sets import evenly_spaced
    from tasks.common import request_extra_scores, request_knowmem
    from tasks.context import make_context
    from tests.conftest import write_params

    ctx = make_context("smoke", write_params(tmp_path))
    cfg = ctx.settings["request"]["passage_knowmem"]
    knowmem, spec = request_knowmem(ctx, "passage")
    every = read_pairs(SHARED_DATA / "muse_news" / cfg["file"], "question", "answer")
    assert list(knowmem.qas) == evenly_spaced(every, cfg["size"]) and len(knowmem.qas) == cfg["size"]
    assert len(knowmem.icl) == ctx.settings["evaluate"]["muse"]["icl_examples"]
    assert spec.knowmem_max_new_tokens == ctx.settings["evaluate"]["muse"]["knowmem_max_new_tokens"]
    assert request_knowmem(ctx, "qa") is None and request_knowmem(ctx, "choice") is None
    assert set(request_extra_scores(ctx, "passage")) == {"knowmem_retain"} and request_extra_scores(ctx, "qa") == {}


# --------------------------------------------------------------------------- a passage request end to end


@pytest.mark.skipif(not (SHARED_DATA / "muse_news").exists(), reason="needs ../shared/data/muse_news")
def test_a_passage_request_with_passage_neighbours_is_scored_and_audited(tmp_path) -> None:
    from tests.helpers import build_tiny_setup, run_request

    os.environ.pop("MLFLOW_TRACKING_URI", None)
    params_file, _ = build_tiny_setup(tmp_path, {"request": {"passage_knowmem": {"size": 2}}})
    forget = _write_passages(tmp_path / "forget.jsonl", ARTICLES[:1])
    neighbours = _write_passages(tmp_path / "neighbours.jsonl", ARTICLES[1:])
    result = run_request(params_file, forget, retain_file=neighbours)
    record = json.loads(Path(result["audit"]["record"]).read_text())
    before, after = record["metrics"]["before"], record["metrics"]["after"]
    for values in (before, after):
        assert {"forget_rouge", "forget_min_k", "neighbour_verbmem", "knowmem_retain", "model_utility"} <= set(values)
        assert "neighbour_rouge" not in values
    block = record["neighbour"]
    assert block["held_out_count"] == 2 and block["control_count"] == 2
    assert block["neighbour_verbmem_before"] == before["neighbour_verbmem"]
    check = next(c for c in record["verdict"]["checks"] if c["check"] == "neighbour_ratio")
    ratio = after["neighbour_verbmem"] / before["neighbour_verbmem"] if before["neighbour_verbmem"] else 1.0
    assert check["value"] == pytest.approx(ratio)
    text = Path(result["audit"]["record"]).read_text()
    assert all(article not in text for article in ARTICLES)


# --------------------------------------------------------------------------- the bench's files (no model)


def test_the_bench_builds_forget_and_neighbour_articles_from_distinct_texts(tmp_path) -> None:
    from bench.passage_request import distinct_articles, request_files

    rows = [ARTICLES[0], ARTICLES[1], ARTICLES[0], "", ARTICLES[2], ARTICLES[3], ARTICLES[4]]
    articles = distinct_articles(rows, 5, tmp_path / "raw.json")
    assert [row for row, _ in articles] == [0, 1, 4, 5, 6] and [t for _, t in articles] == ARTICLES
    files = request_files(articles, forget_articles=2, neighbour_articles=3, folder=tmp_path)
    forget = load_record_file(files["forget"])
    neighbours = load_record_file(files["neighbours"])
    assert forget.kind is RecordKind.PASSAGE and [r.text for r in forget.records] == ARTICLES[:2]
    assert [r.text for r in neighbours.records] == ARTICLES[2:5]
    assert [r.id for r in neighbours.records] == ["article-4", "article-5", "article-6"]
    read_request_files(files["forget"], files["neighbours"])  # distinct ids and texts, disjoint files
    with pytest.raises(ValueError, match="neighbour_articles >= 2"):
        request_files(articles, 2, 1, tmp_path)
    with pytest.raises(ValueError, match="fewer than"):
        request_files(articles, 3, 3, tmp_path)
    with pytest.raises(ValueError, match="raw.json: 5 distinct articles, fewer than the 6"):
        distinct_articles(rows, 6, tmp_path / "raw.json")


def test_the_bench_trains_in_scratch_on_the_articles_and_links_the_profile(tmp_path) -> None:
    from bench.passage_request import scratch_outputs, scratch_params
    from codeunlearn.config import load_settings

    profile_dir = tmp_path / "outputs" / "default"
    (profile_dir / "splits").mkdir(parents=True)
    (profile_dir / "validation").mkdir()
    (profile_dir / "models" / "target").mkdir(parents=True)
    (profile_dir / "models" / "base.json").write_text('{"checkpoint": "/somewhere"}')
    scratch = tmp_path / "scratch"
    out = scratch_outputs(profile_dir, scratch)
    assert (out / "splits").resolve() == (profile_dir / "splits").resolve() and (out / "splits").is_symlink()
    assert json.loads((out / "models" / "base.json").read_text()) == {"checkpoint": "/somewhere"}
    assert not (out / "models" / "target").exists(), "the target is trained again in scratch"
    cfg = {"source": "raw/forget.json", "forget_articles": 3, "neighbour_articles": 4, "finetune_steps": 80}
    settings = load_settings(scratch_params("default", scratch, cfg, passages=8), "default")
    assert settings["finetune"]["passages"] == {"file": "raw/forget.json", "count": 8}
    assert settings["finetune"]["steps"] == 80 and settings["finetune"]["lr"] == 3.0e-4  # the profile's, kept
    assert settings["paths"]["outputs"] == str(scratch) and settings["tracking"]["register_models"] is False
    unchanged = load_settings(scratch_params("smoke", scratch, {**cfg, "finetune_steps": None}, 8), "smoke")
    assert unchanged["finetune"]["steps"] == 300
