"""The MUSE-News run of the evaluate stage: loading, prompt fitting, one model's row, the oracle reference."""

from __future__ import annotations

import json
import math

import pytest
import torch

from codeunlearn.data.records import DataError
from codeunlearn.eval.muse import (
    KEYS,
    MuseScores,
    MuseSets,
    MuseSpec,
    load_muse_sets,
    muse_row,
    prompt_budget,
    score_muse,
)
from codeunlearn.lm.generation import encode_raw, keep_last_tokens
from codeunlearn.metrics import muse
from tests.conftest import SHARED_DATA, report_inputs

SPEC = MuseSpec(batch_size=2, score_batch_size=4, max_new_tokens=6, knowmem_max_new_tokens=4, privleak_max_length=64)


pytestmark = pytest.mark.usefixtures("one_thread")


# Articles alternate between the two splits, so neither is systematically likelier under a random model.
ARTICLES = [
    f"{who} {what} on day {day}."
    for day in range(6)
    for who, what in (
        ("Zorblat Quim", "sailed to Vexmoor harbour"),
        ("Mira Tolland", "planted ferns in the village"),
        ("A lighthouse keeper", "wrote grim ballads"),
        ("Her grandmother", "won the Silver Fern medal"),
    )
]


def write_muse(root, n: int = 6) -> None:
    """A miniature MUSE-News layout: n items per split, 3 ICL pairs."""
    files = {
        "verbmem/forget.json": [{"prompt": f"Story {i} began when", "gt": f"the harbour {i} froze."} for i in range(n)],
        "knowmem/forget_qa.json": [{"question": f"Who won race {i}?", "answer": f"Rider {i}"} for i in range(n)],
        "knowmem/forget_qa_icl.json": [{"question": f"Icl {i}?", "answer": f"A{i}"} for i in range(3)],
        "knowmem/retain2_qa.json": [{"question": f"Where is town {i}?", "answer": f"North {i}"} for i in range(n)],
        "knowmem/retain2_qa_icl.json": [{"question": f"Ricl {i}?", "answer": f"R{i}"} for i in range(3)],
        "privleak/forget.json": ARTICLES[0::2][:n],
        "privleak/holdout.json": ARTICLES[1::2][:n],
    }
    for name, items in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(items))


def test_load_takes_evenly_spaced_subsets_and_skips_negative_sizes(tmp_path):
    write_muse(tmp_path)
    sets = load_muse_sets(tmp_path, verbmem_size=3, knowmem_size=0, privleak_size=2, icl_examples=2)
    assert sets.counts() == {
        "verbmem": 3,
        "knowmem_forget": 6,
        "knowmem_retain": 6,
        "icl_examples": 2,
        "privleak_forget": 2,
        "privleak_holdout": 2,
    }
    # linspace(0, 5, 3) -> rows 0, 2 (2.5 rounds to even), 5.
    assert [prompt for prompt, _ in sets.verbmem] == ["Story 0 began when", "Story 2 began when", "Story 5 began when"]
    assert sets.icl_retain == (("Ricl 0?", "R0"), ("Ricl 1?", "R1"))
    assert set(sets.sha256) == {"verbmem", "knowmem_forget", "knowmem_retain", "privleak_forget", "privleak_holdout"}
    skipped = load_muse_sets(tmp_path, verbmem_size=-1, knowmem_size=-1, privleak_size=-1)
    assert set(skipped.counts().values()) == {0} and skipped.sha256 == {}


def test_a_malformed_file_names_the_file_row_and_field(tmp_path):
    write_muse(tmp_path)
    (tmp_path / "knowmem" / "forget_qa.json").write_text(
        json.dumps([{"question": "q?", "answer": "a"}, {"question": "q2"}])
    )
    with pytest.raises(DataError) as err:
        load_muse_sets(tmp_path, 1, 1, 1)
    message = str(err.value)
    assert "forget_qa.json" in message and "answer" in message and "1" in message
    (tmp_path / "privleak" / "holdout.json").unlink()
    with pytest.raises(DataError, match="holdout.json"):
        load_muse_sets(tmp_path, 1, -1, 1)


@pytest.mark.skipif(not (SHARED_DATA / "muse_news").exists(), reason="needs ../shared/data/muse_news")
def test_the_shared_muse_news_files_load_whole():
    sets = load_muse_sets(SHARED_DATA / "muse_news", 0, 0, 0)
    assert sets.counts() == {
        "verbmem": 100,
        "knowmem_forget": 100,
        "knowmem_retain": 100,
        "icl_examples": 10,
        "privleak_forget": 100,
        "privleak_holdout": 100,
    }


def test_keep_last_tokens_keeps_bos_and_the_end():
    assert keep_last_tokens([1, 10, 11, 12, 13], 3, bos_token_id=1) == [1, 12, 13]
    assert keep_last_tokens([10, 11, 12, 13], 2, bos_token_id=1) == [12, 13]
    assert keep_last_tokens([1, 10], 5, bos_token_id=1) == [1, 10]
    with pytest.raises(ValueError):
        keep_last_tokens([1, 2], 0, bos_token_id=1)


def test_prompt_budget_fits_the_models_context(tiny_model):
    context = tiny_model.config.max_position_embeddings  # 128
    assert prompt_budget(tiny_model, 28, None) == context - 28
    assert prompt_budget(tiny_model, 28, 50) == 50
    assert prompt_budget(tiny_model, 28, 500) == context - 28
    with pytest.raises(ValueError, match="no room"):
        prompt_budget(tiny_model, context, None)


def test_muse_row_by_hand():
    # Min-K scores: forget items are all likelier (lower) than holdout items -> MUSE AUC 0.
    scores = MuseScores(0.25, 0.5, 0.75, forget_min_k=[1.0, 3.5], holdout_min_k=[3.0, 4.0])
    # Pairs (forget, holdout): (1, 3) (1, 4) (3.5, 3) (3.5, 4): holdout scores lower in 1 of 4 -> AUC 0.25.
    assert scores.privleak_auc == pytest.approx(0.25)
    row = muse_row(scores, oracle_auc=0.5)
    assert row == pytest.approx(
        {
            "muse_verbmem_rouge": 0.25,
            "muse_knowmem_forget_rouge": 0.5,
            "muse_knowmem_retain_rouge": 0.75,
            "muse_privleak_auc": 0.25,
            "muse_privleak": -50.0,
        }
    )
    assert "muse_privleak" not in muse_row(scores, oracle_auc=None)
    assert "muse_privleak" not in muse_row(scores, oracle_auc=0.0)  # undefined ratio: left out
    assert muse_row(MuseScores(), 0.5) == {}


def test_a_tiny_model_gets_every_key_and_the_oracle_privleak_zero(tmp_path, tiny_model, tiny_tokenizer):
    write_muse(tmp_path)
    sets = load_muse_sets(tmp_path, 3, 2, 4, icl_examples=2)
    scores = score_muse(tiny_model, tiny_tokenizer, sets, SPEC)
    row = muse_row(scores, scores.privleak_auc)
    assert set(row) == set(KEYS)
    assert row["muse_privleak"] == 0.0
    assert all(math.isfinite(v) for v in row.values())
    assert all(0.0 <= row[k] <= 1.0 for k in KEYS if k != "muse_privleak")
    assert len(scores.forget_min_k) == len(scores.holdout_min_k) == 4
    # Same model, same items: deterministic.
    again = score_muse(tiny_model, tiny_tokenizer, sets, SPEC)
    assert muse_row(again, scores.privleak_auc) == row


def test_prompts_longer_than_the_context_keep_their_end(tiny_model, tiny_tokenizer):
    long_prompt = " ".join(["Vexmoor harbour froze again"] * 80)
    assert len(encode_raw(tiny_tokenizer, long_prompt, True)) > tiny_model.config.max_position_embeddings
    sets = MuseSets(verbmem=((long_prompt, "the harbour froze."),))
    scores = score_muse(tiny_model, tiny_tokenizer, sets, SPEC)
    assert scores.verbmem_rouge is not None and scores.knowmem_forget_rouge is None
    # Equal to cutting the prompt by hand to the budget (context - new tokens).
    budget = tiny_model.config.max_position_embeddings - SPEC.max_new_tokens
    by_hand = muse.verbmem_rouge(
        tiny_model,
        tiny_tokenizer,
        [long_prompt],
        ["the harbour froze."],
        1,
        SPEC.max_new_tokens,
        max_prompt_tokens=budget,
    )
    assert scores.verbmem_rouge == pytest.approx(by_hand)


def test_the_suite_scores_the_oracle_first_and_rates_others_against_it(tmp_path, tiny_model, tiny_tokenizer):
    from codeunlearn.eval.suite import MuseRun
    from codeunlearn.models.tiny import TinyModelSpec, build_tiny_llama

    write_muse(tmp_path)
    sets = load_muse_sets(tmp_path, 2, 2, 4, icl_examples=1)
    run = MuseRun(sets=sets, spec=SPEC, models=("oracle", "target"))
    checkpoint = type("Checkpoint", (), {"model": tiny_model, "tokenizer": tiny_tokenizer})
    oracle = run.run("oracle", checkpoint, progress=False)
    assert oracle["row"]["muse_privleak"] == 0.0 and run.oracle_auc == oracle["row"]["muse_privleak_auc"]
    torch.manual_seed(3)
    other = build_tiny_llama(TinyModelSpec(32, 64, 2, 2, 128, 300, seed=3), tiny_tokenizer)
    target = run.run("target", type("Checkpoint", (), {"model": other, "tokenizer": tiny_tokenizer}), False)
    auc = target["row"]["muse_privleak_auc"]
    assert target["row"]["muse_privleak"] == pytest.approx(muse.privleak(auc, run.oracle_auc))
    assert set(target["per_item"]) == {"forget_min_k", "holdout_min_k"}
    described = run.describe()
    assert described["sets"]["privleak_forget"] == 4 and "Zorblat" not in json.dumps(described)


def test_report_has_a_muse_table_that_says_what_the_numbers_mean(tmp_path):
    from codeunlearn.report.run import render_report

    row = {"forget_rouge": 0.9, "retain_rouge": 0.8}
    muse_row_ = {
        "muse_verbmem_rouge": 0.125,
        "muse_knowmem_forget_rouge": 0.25,
        "muse_knowmem_retain_rouge": 0.5,
        "muse_privleak_auc": 0.5,
        "muse_privleak": 0.0,
    }
    metrics = {"oracle": {**row, **muse_row_}, "codeunlearn": {**row, **muse_row_, "muse_privleak": -12.5}}
    details = {
        "muse": {
            "sets": {"verbmem": 4, "knowmem_forget": 4, "knowmem_retain": 4, "icl_examples": 2},
            "spec": {"max_new_tokens": 32, "max_prompt_tokens": 192, "privleak_max_length": 256},
            "timing_s": {"oracle": 1.2},
        }
    }
    text = render_report(report_inputs(metrics, details), plots={})
    assert "### MUSE-News" in text
    assert "| oracle | 0.125 | 0.250 | 0.500 | 0.500 | 0.000 |" in text
    assert "| codeunlearn | 0.125 | 0.250 | 0.500 | 0.500 | -12.500 |" in text
    assert "None of these models was trained on MUSE-News" in text
    assert "4 VerbMem prompts" in text and "MUSE time per model: oracle 1.2 s" in text
    without = render_report(report_inputs({"oracle": row}, {}), plots={})
    assert "### MUSE-News" not in text.replace("### MUSE-News", "", 1) and "### MUSE-News" not in without
