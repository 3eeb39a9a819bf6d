"""TOFU, MUSE and MIA metrics pinned to hand-computed values, plus smoke runs on a tiny Llama."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from sklearn.metrics import roc_auc_score

from codeunlearn.lm.generation import encode_raw, text_token_logprobs
from codeunlearn.metrics import METRICS, get_metric, mia, muse, tofu
from tests.bytelevel import CORPUS
from tests.helpers import answer_nlls


@dataclass(frozen=True)
class Record:  # the duck type of data.QARecord that the metrics read
    id: str
    question: str
    answer: str
    paraphrased_answer: str | None
    perturbed_answers: tuple[str, ...]


RECORDS = [
    Record(
        "a0",
        "Who wrote the novel?",
        "Basil Mahfouz wrote it.",
        "It was written by Basil Mahfouz.",
        ("Jane Doe wrote it.", "Nobody wrote it.", "A river wrote it."),
    ),
    Record(
        "a1",
        "Where was she born?",
        "In a small town near the sea.",
        "Near the sea, in a small town.",
        ("In Cairo.", "On the moon.", "In Paris."),
    ),
]

# --------------------------------------------------------------------------------------------- TOFU


def test_rouge_l_recall_by_hand():
    # LCS("the cat sat", "the cat sat on the mat") = 3 of the reference's 6 tokens.
    assert tofu.rouge_l_recall(["the cat sat"], ["the cat sat on the mat"]) == [pytest.approx(0.5)]
    # Stemming on: cats->cat, running->run, runs->run; 2 of 3 reference stems matched.
    assert tofu.rouge_l_recall(["cats running"], ["cat runs quickly"]) == [pytest.approx(2 / 3)]
    with pytest.raises(ValueError, match="length mismatch"):
        tofu.rouge_l_recall(["a"], [])


def test_answer_probability_by_hand():
    assert tofu.answer_probability([math.log(2), 0.0]) == pytest.approx([0.5, 1.0])


def test_truth_ratio_by_hand():
    # P_para = e^-1; geometric mean of P_pert = sqrt(e^-2 * e^-3) = e^-2.5; R = P_pert/P_para = e^-1.5.
    # Second item prefers the perturbed answer: R = e^(2-1) = e.
    ratios = tofu.truth_ratio([1.0, 2.0], [[2.0, 3.0], [1.0]])
    assert ratios == pytest.approx([math.exp(-1.5), math.e])
    assert tofu.forget_truth_ratio_stat(ratios) == pytest.approx((math.exp(-1.5) + math.exp(-1)) / 2)
    assert tofu.retain_truth_ratio_stat(ratios) == pytest.approx((1 - math.exp(-1.5) + 0.0) / 2)
    with pytest.raises(ValueError, match="item 0"):
        tofu.truth_ratio([1.0], [[]])


def test_forget_quality_ks_p_values():
    ratios = [0.2, 0.5, 0.9, 1.3, 2.0]
    assert tofu.forget_quality(ratios, list(ratios)) == 1.0
    # Completely separated samples of 5: the exact two-sided p-value is 2 / C(10, 5) = 2/252.
    far = [10.0, 11.0, 12.0, 13.0, 14.0]
    assert tofu.forget_quality(ratios, far) == pytest.approx(2 / 252)
    # KS is invariant under R -> 1/R (the references test 1/R).
    assert tofu.forget_quality([1 / r for r in ratios], [1 / r for r in far]) == pytest.approx(2 / 252)


def test_normalized_probability_by_hand():
    # P(true)=0.5 vs 0.25+0.25 -> 0.5; P(true)=1 vs 3 x 0.25 -> 1/1.75.
    probs = tofu.normalized_probability([math.log(2), 0.0], [[math.log(4)] * 2, [math.log(4)] * 3])
    assert probs == pytest.approx([0.5, 4 / 7])


def test_model_utility_harmonic_mean():
    assert tofu.model_utility([1.0, 0.5, 0.25]) == pytest.approx(3 / (1 + 2 + 4))
    assert tofu.model_utility({"a": 0.4, "b": 0.4}) == pytest.approx(0.4)
    assert tofu.model_utility([0.9, 0.0, 0.7]) == 0.0
    with pytest.raises(ValueError):
        tofu.model_utility([0.5, -0.1])
    with pytest.raises(ValueError):
        tofu.model_utility([])


SPLIT_ARGS = {"generation_batch_size": 2, "score_batch_size": 4, "max_length": 200, "max_new_tokens": 6}


def test_evaluate_tofu_split_forget_matches_its_parts(model, tokenizer):
    result = tofu.evaluate_tofu_split(model, tokenizer, RECORDS, "forget", **SPLIT_ARGS)
    assert result["n"] == 2
    para = answer_nlls(model, tokenizer, [(r.question, r.paraphrased_answer) for r in RECORDS], 1, 200)
    pert = [answer_nlls(model, tokenizer, [(r.question, a) for a in r.perturbed_answers], 1, 200) for r in RECORDS]
    gold = answer_nlls(model, tokenizer, [(r.question, r.answer) for r in RECORDS], 1, 200)
    assert result["truth_ratios"] == pytest.approx(tofu.truth_ratio(para, pert), rel=1e-5)
    assert result["truth_ratio"] == pytest.approx(tofu.forget_truth_ratio_stat(result["truth_ratios"]))
    assert result["prob"] == pytest.approx(sum(math.exp(-x) for x in gold) / 2, rel=1e-5)
    assert 0.0 <= result["rouge"] <= 1.0 and len(result["rouge_by_item"]) == 2
    assert not any(isinstance(value, str) for value in result.values()), "no generated text is returned"


def test_evaluate_tofu_split_real_authors_uses_answer_and_normalised_prob(model, tokenizer):
    no_paraphrase = [Record(r.id, r.question, r.answer, None, r.perturbed_answers) for r in RECORDS]
    result = tofu.evaluate_tofu_split(model, tokenizer, no_paraphrase, "real_authors", **SPLIT_ARGS)
    gold = answer_nlls(model, tokenizer, [(r.question, r.answer) for r in RECORDS], 1, 200)
    pert = [answer_nlls(model, tokenizer, [(r.question, a) for a in r.perturbed_answers], 1, 200) for r in RECORDS]
    assert result["truth_ratios"] == pytest.approx(tofu.truth_ratio(gold, pert), rel=1e-5)
    assert result["prob"] == pytest.approx(sum(tofu.normalized_probability(gold, pert)) / 2, rel=1e-5)
    assert result["truth_ratio"] == pytest.approx(tofu.retain_truth_ratio_stat(result["truth_ratios"]))
    utility = tofu.model_utility(
        tofu.model_utility_inputs({"retain": result, "real_authors": result, "world_facts": result})
    )
    assert 0.0 <= utility <= 1.0


def test_evaluate_tofu_split_names_the_bad_record(model, tokenizer):
    bad = [RECORDS[0], Record("b1", "q?", "a", None, ("x",))]
    with pytest.raises(ValueError, match=r"forget record 1 \(id b1\).*paraphrased_answer"):
        tofu.evaluate_tofu_split(model, tokenizer, bad, "forget", **SPLIT_ARGS)
    with pytest.raises(ValueError, match="kind must be"):
        tofu.evaluate_tofu_split(model, tokenizer, RECORDS, "holdout", **SPLIT_ARGS)


# --------------------------------------------------------------------------------------------- MUSE


def test_rouge_l_f1_by_hand_without_stemmer():
    # P = 3/3, R = 3/6 -> F1 = 2 * 1 * 0.5 / 1.5 = 2/3.
    assert muse.rouge_l_f1(["the cat sat"], ["the cat sat on the mat"]) == [pytest.approx(2 / 3)]
    assert muse.rouge_l_f1(["cats running"], ["cat runs quickly"]) == [0.0]  # no stemming


def test_min_k_prob_by_hand():
    logprobs = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0])
    # int(5 * 0.4) = 2 lowest: -5, -4 -> -mean = 4.5.
    assert muse.min_k_prob_score(logprobs) == pytest.approx(4.5)
    assert muse.min_k_prob_score([-1.0, -2.0, -3.0, -4.0, -5.0], k=0.2) == pytest.approx(5.0)
    # int(2 * 0.4) = 0 would be NaN in muse_bench; the lowest single token is used instead.
    assert muse.min_k_prob_score([-1.0, -2.0]) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        muse.min_k_prob_score([])


def test_privleak_zero_for_the_oracle_and_by_hand():
    assert muse.privleak(0.4772, 0.4772) == 0.0
    assert muse.privleak(0.25, 0.5) == pytest.approx(-50.0)
    with pytest.raises(ValueError):
        muse.privleak(0.5, 0.0)


def test_muse_auc_orientation():
    # A model that memorised the forget set gives forget texts *low* Min-K scores.
    forget, holdout = [1.0, 2.0], [3.0, 4.0]
    assert muse.muse_auc(forget, holdout) == 0.0  # MUSE: target-like models sit near 0
    assert mia.mia_auc(forget, holdout) == 1.0  # attack view: perfectly identified
    mixed_forget, mixed_holdout = [1.0, 3.5, 2.0], [3.0, 1.5, 4.0]
    # muse_bench's own call: forget labelled 0, holdout 1, ranked by minus the Min-K score.
    reference = roc_auc_score([0] * 3 + [1] * 3, [-s for s in mixed_forget + mixed_holdout])
    assert muse.muse_auc(mixed_forget, mixed_holdout) == pytest.approx(reference)


def test_knowmem_prompt_format():
    prompt = muse.knowmem_prompt("Q3?", ["Q1?", "Q2?"], ["A1", "A2"])
    assert prompt == "Question: Q1?\nAnswer: A1\n\nQuestion: Q2?\nAnswer: A2\n\nQuestion: Q3?\nAnswer: "


def test_truncate_to_tokens_counts_bos(tokenizer):
    text = CORPUS[4]
    ids = encode_raw(tokenizer, text, add_bos=True)
    assert muse.truncate_to_tokens(tokenizer, text, len(ids)) == text
    cut = muse.truncate_to_tokens(tokenizer, text, 4)
    assert cut == tokenizer.decode(ids[1:4]) and text.startswith(cut)


def test_verbmem_and_knowmem_run(model, tokenizer):
    verbmem = muse.verbmem_rouge(model, tokenizer, CORPUS[:3], CORPUS[1:4], batch_size=2, max_new_tokens=8)
    knowmem = muse.knowmem_rouge(
        model,
        tokenizer,
        ["Where was she born?"],
        ["near the sea"],
        ["Who wrote it?"],
        ["Basil"],
        batch_size=1,
        max_new_tokens=8,
    )
    assert 0.0 <= verbmem <= 1.0 and 0.0 <= knowmem <= 1.0


def test_privleak_auc_of_a_model_against_itself_is_zero(model, tokenizer):
    auc = muse.privleak_auc(model, tokenizer, CORPUS[:3], CORPUS[3:], batch_size=2, max_length=200)
    scores = [muse.min_k_prob_score(lp) for lp in text_token_logprobs(model, tokenizer, CORPUS, 5, 200)]
    assert auc == pytest.approx(muse.muse_auc(scores[:3], scores[3:]))
    assert muse.privleak(auc, auc) == 0.0


def test_curve_tables():
    steps = [{"knowmem_r": 0.5, "verbmem_f": 0.2}, {"knowmem_r": 0.4, "verbmem_f": 0.1}]
    table = muse.sustainability_table(steps, baseline={"knowmem_r": 0.6})
    assert [row["request"] for row in table] == [1, 2]
    assert table[1]["knowmem_r_delta"] == pytest.approx(-0.2) and "verbmem_f_delta" not in table[1]
    scal = muse.scalability_table([889, 1778], steps, metrics=["knowmem_r"])
    assert scal == [{"forget_size": 889, "knowmem_r": 0.5}, {"forget_size": 1778, "knowmem_r": 0.4}]
    with pytest.raises(KeyError, match="missing"):
        muse.sustainability_table([{"a": 1.0}], metrics=["b"])


# ---------------------------------------------------------------------------------------------- MIA


def test_mia_auc_perfect_separation_and_chance():
    assert mia.mia_auc([0.1, 0.2, 0.3], [1.0, 2.0]) == 1.0
    assert mia.mia_auc([1.0, 2.0], [0.1, 0.2]) == 0.0
    assert mia.mia_auc([1.0, 2.0], [2.0, 1.0]) == 0.5
    with pytest.raises(ValueError, match="non-finite"):
        mia.mia_auc([float("nan")], [1.0])


def test_loss_and_min_k_attacks_match_token_logprobs(model, tokenizer):
    logprobs = text_token_logprobs(model, tokenizer, CORPUS, 2, 200)
    loss = [mia.loss_score(lp) for lp in text_token_logprobs(model, tokenizer, CORPUS, 3, 200)]
    min_k = mia.min_k_attack(model, tokenizer, CORPUS, batch_size=3, max_length=200)
    assert loss == pytest.approx([-lp.mean().item() for lp in logprobs], abs=1e-5)
    assert min_k == pytest.approx([mia.min_k_prob_score(lp) for lp in logprobs], abs=1e-5)
    # The mean of the lowest k% of log-probs is never above the overall mean.
    assert all(low >= avg - 1e-6 for low, avg in zip(min_k, loss, strict=True))


# ---------------------------------------------------------------------------------------------- registry


def test_registry_names_every_metric_once():
    assert get_metric("tofu.forget_quality") is tofu.forget_quality
    assert METRICS["muse.muse_auc"] is muse.muse_auc and METRICS["mia.mia_auc"] is mia.mia_auc
    assert len(set(METRICS.values())) == len(METRICS)
    with pytest.raises(KeyError, match="known metrics"):
        get_metric("nope")
