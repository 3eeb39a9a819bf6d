"""The evaluation suite on a tiny untrained Llama: every key, oracle self-reference, attacks, report."""

from __future__ import annotations

import math

import pytest
import torch

from codeunlearn.attacks.quantize import QuantizationSpec, quant_name, quantization_attack, quantization_specs
from codeunlearn.attacks.relearn import relearn_attack, split_halves
from codeunlearn.data.records import QARecord
from codeunlearn.lm.generation import answer_token_logprobs
from codeunlearn.lm.training import TrainSpec
from codeunlearn.methods.codeunlearn.codebook import CodebookBottleneck, CodebookSpec, attach_codebook
from codeunlearn.metrics.scoring import (
    evaluate_model,
    flatten_metrics,
    forget_retain_rouge,
    mean_nll,
    score_model,
    split_rouge,
    split_rouges,
    summarize,
)
from codeunlearn.metrics.sets import EvalSets, EvalSpec
from codeunlearn.metrics.tofu import evaluate_tofu_split
from codeunlearn.report.run import render_report
from tests.conftest import report_inputs
from tests.helpers import answer_nlls, train_spec

SPEC = EvalSpec(max_new_tokens=6, batch_size=16, score_batch_size=16, max_length=64)


def relearn_spec(steps: int) -> TrainSpec:
    """The relearning attacker's fine-tune, logging its last step only (as the pipeline's)."""
    return train_spec(steps, lr=1e-2, batch_size=2, max_length=64, log_every=steps)


TOFU_KEYS = {
    f"{split}_{metric}"
    for split in ("forget", "retain", "real_authors", "world_facts")
    for metric in ("rouge", "prob", "truth_ratio")
}
SUITE_KEYS = TOFU_KEYS | {
    "forget_quality",
    "model_utility",
    "retain_utility",
    "mia_min_k_auc",
    "mia_loss_auc",
    "privleak",
    "privleak_loss",
}
QUANT_ROW_KEYS = {
    "forget_rouge",
    "retain_rouge",
    "forget_prob",
    "forget_truth_ratio",
    "forget_quality",
    "retain_prob",
    "bits",
    "group_size",
    "recovery",
    "retain_change",
    "weight_error",
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _perturbed(record) -> QARecord:
    words = record.answer.rstrip(".").split()
    return QARecord(
        id=record.id,
        question=record.question,
        answer=record.answer,
        subject=record.subject,
        paraphrased_answer="In short, " + record.answer,
        perturbed_answers=(
            " ".join(reversed(words)) + ".",
            " ".join(words[:-1] + ["nowhere"]) + ".",
            "Nobody knows that.",
        ),
    )


@pytest.fixture(scope="module")
def sets(tiny_qa) -> EvalSets:
    forget = [_perturbed(r) for r in tiny_qa["forget"]]
    retain = [_perturbed(r) for r in tiny_qa["retain"]]
    world = [
        QARecord(id=f"w{i}", question=q, answer=a, perturbed_answers=p)
        for i, (q, a, p) in enumerate(
            [
                ("Where was Mira Tolland born?", "a village", ("a harbour", "a city", "a desert")),
                ("What does Zorblat Quim write?", "ballads", ("mysteries", "novels", "poems")),
            ]
        )
    ]
    holdout = [
        QARecord(id=f"h{i}", question=q, answer=a)
        for i, (q, a) in enumerate(
            [
                ("Who taught Mira Tolland?", "A teacher named Ilse taught her."),
                ("What award did Mira Tolland win?", "She won the Amber Anchor prize."),
                ("Where was Zorblat Quim born?", "He was born in a mountain village."),
            ]
        )
    ]
    return EvalSets(forget=forget, retain=retain, real_authors=world, world_facts=world[::-1], holdout=holdout)


@pytest.fixture()
def other_model(tiny_tokenizer):
    from codeunlearn.models.tiny import TinyModelSpec, build_tiny_llama

    spec = TinyModelSpec(
        hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, max_positions=128, vocab_size=300, seed=1
    )
    torch.manual_seed(1)
    return build_tiny_llama(spec, tiny_tokenizer)


def test_suite_returns_every_key_with_finite_values(tiny_model, tiny_tokenizer, sets):
    metrics, scores = evaluate_model(tiny_model, tiny_tokenizer, sets, SPEC)
    assert set(metrics) == SUITE_KEYS
    assert all(math.isfinite(v) for v in metrics.values())
    for name in ("forget_rouge", "forget_prob", "retain_prob", "model_utility", "mia_min_k_auc"):
        assert 0.0 <= metrics[name] <= 1.0, name
    assert {kind: result["n"] for kind, result in scores.splits.items()} == {
        "forget": 4,
        "retain": 4,
        "real_authors": 2,
        "world_facts": 2,
    }
    assert len(scores.mia["forget_min_k"]) == 4 and len(scores.mia["holdout_loss"]) == 3


def test_sets_scored_together_match_each_scored_alone(tiny_model, tiny_tokenizer, sets):
    spec = SPEC.generation
    together = split_rouges(tiny_model, tiny_tokenizer, [sets.forget, sets.retain[:3], sets.forget[:1]], spec)
    alone = [split_rouge(tiny_model, tiny_tokenizer, s, spec) for s in (sets.forget, sets.retain[:3], sets.forget[:1])]
    assert together == pytest.approx(alone)
    assert forget_retain_rouge(tiny_model, tiny_tokenizer, sets.forget, sets.retain, spec) == pytest.approx(
        {"forget_rouge": alone[0], "retain_rouge": split_rouge(tiny_model, tiny_tokenizer, sets.retain, spec)}
    )


def test_optional_sets_are_skipped_and_their_keys_absent(tiny_model, tiny_tokenizer, sets):
    metrics, _ = evaluate_model(tiny_model, tiny_tokenizer, EvalSets(sets.forget, sets.retain), SPEC)
    assert "model_utility" not in metrics and "mia_min_k_auc" not in metrics
    assert {"forget_rouge", "retain_rouge", "forget_quality", "retain_utility"} <= set(metrics)


def test_oracle_compared_with_itself_has_forget_quality_one_and_privleak_zero(tiny_model, tiny_tokenizer, sets):
    scores = score_model(tiny_model, tiny_tokenizer, sets, SPEC)
    metrics = summarize(scores, scores)
    assert metrics["forget_quality"] == 1.0
    assert metrics["privleak"] == 0.0
    assert metrics["privleak_loss"] == 0.0


def test_another_model_is_measured_against_the_oracle(tiny_model, other_model, tiny_tokenizer, sets):
    oracle = score_model(tiny_model, tiny_tokenizer, sets, SPEC)
    other = summarize(score_model(other_model, tiny_tokenizer, sets, SPEC), oracle)
    assert 0.0 <= other["forget_quality"] <= 1.0
    assert other["privleak"] != 0.0  # a different model scores the same texts differently
    with pytest.raises(ValueError, match="same items"):
        summarize(score_model(other_model, tiny_tokenizer, EvalSets(sets.forget[:2], sets.retain), SPEC), oracle)


def test_one_pass_matches_the_tested_per_split_metrics(tiny_model, tiny_tokenizer, sets):
    scores = score_model(tiny_model, tiny_tokenizer, sets, SPEC)
    for kind in ("forget", "real_authors"):
        reference = evaluate_tofu_split(
            tiny_model,
            tiny_tokenizer,
            getattr(sets, kind),
            kind,
            generation_batch_size=16,
            score_batch_size=16,
            max_length=64,
            max_new_tokens=6,
        )
        mine = scores.splits[kind]
        assert mine["rouge"] == pytest.approx(reference["rouge"])
        assert mine["prob_by_item"] == pytest.approx(reference["prob_by_item"], rel=1e-5)
        assert mine["truth_ratios"] == pytest.approx(reference["truth_ratios"], rel=1e-4)


def test_answer_token_logprobs_do_not_depend_on_the_batch_size(tiny_model, tiny_tokenizer, sets):
    pairs = [(r.question, r.answer) for r in sets.forget] + [(r.question, r.paraphrased_answer) for r in sets.retain]
    logprobs = answer_token_logprobs(tiny_model, tiny_tokenizer, pairs, batch_size=3, max_length=64)
    reference = answer_nlls(tiny_model, tiny_tokenizer, pairs, batch_size=5, max_length=64)
    assert [mean_nll(lp) for lp in logprobs] == pytest.approx(reference, rel=1e-5)
    assert all(lp.dim() == 1 and len(lp) > 0 and (lp <= 0).all() for lp in logprobs)


def test_same_model_same_metrics(tiny_model, tiny_tokenizer, sets):
    first, _ = evaluate_model(tiny_model, tiny_tokenizer, sets, SPEC)
    second, _ = evaluate_model(tiny_model, tiny_tokenizer, sets, SPEC)
    assert first == second


def test_records_without_perturbed_data_are_named(tiny_model, tiny_tokenizer, tiny_qa, sets):
    with pytest.raises(ValueError, match=r"forget record 0 .*paraphrased_answer"):
        score_model(tiny_model, tiny_tokenizer, EvalSets(tiny_qa["forget"], sets.retain), SPEC)


def test_quantization_attack_rows_and_records(tiny_model, tiny_tokenizer, sets):
    oracle = score_model(tiny_model, tiny_tokenizer, sets, SPEC)
    full = summarize(oracle, oracle)
    specs = quantization_specs(
        {"rtn": {"bits": [8, 4], "group_sizes": [16]}, "torchao": {"bits": [4], "group_sizes": [16, 24]}}
    )
    assert [quant_name(s) for s in specs] == ["rtn_w8_g16", "rtn_w4_g16", "torchao_w4_g16", "torchao_w4_g24"]
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    rows, records = quantization_attack(tiny_model, tiny_tokenizer, sets, SPEC, specs, full, oracle)
    assert set(rows) == {"rtn_w8_g16", "rtn_w4_g16", "torchao_w4_g16"}
    for name, row in rows.items():
        assert set(row) == QUANT_ROW_KEYS, name
        assert row["recovery"] == pytest.approx(row["forget_rouge"] - full["forget_rouge"])
        assert records[name]["quantizer"] == name.split("_")[0]
        assert (records[name]["bits"], records[name]["group_size"]) == (row["bits"], row["group_size"])
    assert rows["rtn_w8_g16"]["weight_error"] < rows["rtn_w4_g16"]["weight_error"]
    assert "in_features divisible" in records["torchao_w4_g24"]["skipped"]  # 32 % 24 != 0: recorded, not fatal
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())


def test_relearning_returns_recovery_and_leaves_the_model_alone(tiny_model, tiny_tokenizer, sets):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    spec = relearn_spec(3)
    result = relearn_attack(tiny_model, tiny_tokenizer, sets.forget, spec, SPEC.generation)
    assert result["recovery"] == pytest.approx(result["heldout_rouge_after"] - result["heldout_rouge_before"])
    assert result["attack_records"] == 2 and result["heldout_records"] == 2 and result["steps"] == 3
    assert math.isfinite(result["final_loss"])
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())


def test_relearning_a_masked_codebook_model_keeps_the_codebook_and_mask(tiny_model, tiny_tokenizer, sets):
    torch.manual_seed(0)
    bottleneck = CodebookBottleneck(32, CodebookSpec(num_codes=16, k=2, layer=0)).eval()
    attach_codebook(tiny_model, bottleneck)
    bottleneck.disabled[torch.tensor([1, 5, 9])] = True
    codes = bottleneck.codes.detach().clone()
    spec = relearn_spec(2)
    relearn_attack(tiny_model, tiny_tokenizer, sets.forget, spec, SPEC.generation)
    assert torch.equal(bottleneck.codes, codes) and bottleneck.codes.grad is None
    assert bottleneck.codes.requires_grad  # frozen only during the attack
    assert bottleneck.disabled.nonzero().flatten().tolist() == [1, 5, 9]
    assert not torch.isin(bottleneck.last_ids, torch.tensor([1, 5, 9])).any()


def test_split_halves_interleaves():
    attack, heldout = split_halves(list(range(7)))
    assert attack == [0, 2, 4, 6] and heldout == [1, 3, 5]
    with pytest.raises(ValueError, match="at least 2"):
        split_halves([0])


def test_flatten_metrics_keeps_numbers_only():
    flat = flatten_metrics({"a": 1.0, "q": {"rtn_w4_g64": {"bits": 4, "recovery": 0.1}}, "s": "text", "b": True})
    assert flat == {"a": 1.0, "q.rtn_w4_g64.bits": 4.0, "q.rtn_w4_g64.recovery": 0.1}


def test_report_renders_every_table_and_no_forget_text(tiny_model, other_model, tiny_tokenizer, sets):
    oracle_metrics, oracle = evaluate_model(tiny_model, tiny_tokenizer, sets, SPEC)
    other_metrics, _ = evaluate_model(other_model, tiny_tokenizer, sets, SPEC, oracle)
    specs = [QuantizationSpec("rtn", 4, 16), QuantizationSpec("torchao", 4, 24)]
    relearn = relearn_spec(2)
    details = {
        "quantization": {},
        "relearn": {"spec": relearn.__dict__},
        "timing_s": {"total": 3.0, "oracle": 1.0},
        "sets": {"forget": 4, "retain": 4, "real_authors": 2, "world_facts": 2, "holdout": 3},
    }
    metrics = {}
    for name, model, row in (("oracle", tiny_model, oracle_metrics), ("codeunlearn", other_model, other_metrics)):
        row["quant"], details["quantization"][name] = quantization_attack(
            model, tiny_tokenizer, sets, SPEC, specs, row, oracle
        )
        row["relearn"] = relearn_attack(model, tiny_tokenizer, sets.forget, relearn, SPEC.generation)
        metrics[name] = row
    metrics["codeunlearn"].update({"masked_usage_forget": 0.2, "masked_usage_retain": 0.02})
    metrics["random_codes"] = {**other_metrics, "masked_usage_forget": 0.03, "masked_usage_retain": 0.03}
    text = render_report(report_inputs(metrics, details), plots={"Quantization": "../eval/quantization.png"})
    for heading in (
        "### Forgetting (TOFU)",
        "### Utility (TOFU)",
        "### Membership inference",
        "### Quantization attack",
        "### Relearning attack",
        "### Code usage",
    ):
        assert heading in text
    assert "| codeunlearn / rtn_w4_g16 | rtn | 4 | 16 |" in text
    assert "`torchao_w4_g24` skipped" in text
    assert "![Quantization](../eval/quantization.png)" in text
    assert text.index("| oracle |") < text.index("| codeunlearn |") < text.index("| random_codes |")
    for record in sets.forget:
        assert record.answer not in text and record.question not in text
        assert record.paraphrased_answer not in text
        assert all(p not in text for p in record.perturbed_answers)


def test_report_of_an_old_metrics_file_says_not_available():
    text = render_report(report_inputs({"target": {"forget_rouge": 0.9, "retain_rouge": 0.8}}, {}), plots={})
    assert "| target | 0.900 | n/a |" in text
    assert "### Quantization attack" not in text
