"""The multiple-choice evaluator and the passage scores, on a toy whose log-likelihoods are known: a
tiny Llama with a zero LM head gives every token log p = -log V, so an option's log-likelihood is
-(its token count) x log V and a passage's Min-K% is log V."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from codeunlearn.data.forget_files import ChoiceRecord, choices_from_perturbed
from codeunlearn.data.tofu import load_tofu_file
from codeunlearn.lm.prompting import encode_qas
from codeunlearn.metrics.choice import (
    choice_accuracy,
    choice_accuracy_norm,
    option_byte_lengths,
    option_loglikelihoods,
)
from codeunlearn.metrics.passage import continuation_pairs, passage_min_k, passage_verbmem, token_windows
from tests.conftest import SHARED_DATA

PASSAGE = "Zorblat Quim was born in Vexmoor harbour. Zorblat Quim writes grim sailing ballads."


@pytest.fixture()
def uniform_model(tiny_model):
    with torch.no_grad():
        tiny_model.lm_head.weight.zero_()
    return tiny_model


def _tokens(tokenizer, option: str) -> int:
    return len(tokenizer(" " + option, add_special_tokens=False)["input_ids"])


def test_accuracy_by_hand() -> None:
    scores = [[-1.0, -2.0], [-3.0, -1.0, -2.0], [-2.0, -2.0]]
    assert choice_accuracy(scores, [0, 0, 1]) == pytest.approx(1 / 3)  # the tie goes to the first option
    # Per byte: [-0.5, -0.4] picks 1; [-0.3, -0.5, -0.2] picks 2; [-1, -0.5] picks 1.
    assert choice_accuracy_norm(scores, [[2, 5], [10, 2, 10], [2, 4]], [1, 2, 1]) == 1.0
    with pytest.raises(ValueError):
        choice_accuracy([[0.0, 1.0]], [])


def test_option_loglikelihoods_on_the_uniform_toy(uniform_model, tiny_tokenizer, one_thread) -> None:
    short, long = "sailor", "sailor sailor sailor"
    assert _tokens(tiny_tokenizer, long) > _tokens(tiny_tokenizer, short)
    records = [
        ChoiceRecord("a", "Who is Zorblat Quim?", (short, long), 0),
        ChoiceRecord("b", "Who is Zorblat Quim?", (short, long), 1),
        ChoiceRecord("c", "Who is Mira Tolland?", (long, short), 1),
    ]
    loglik = option_loglikelihoods(uniform_model, tiny_tokenizer, records, batch_size=4, max_length=64)
    log_v = math.log(uniform_model.config.vocab_size)
    for record, scores in zip(records, loglik, strict=True):
        expected = [-_tokens(tiny_tokenizer, option) * log_v for option in record.choices]
        assert scores == pytest.approx(expected, rel=1e-5)  # no EOS: the option's own tokens only
    assert choice_accuracy(loglik, [r.answer for r in records]) == pytest.approx(2 / 3)
    lengths = option_byte_lengths(records)
    assert lengths[0] == [len(" sailor"), len(" sailor sailor sailor")]
    assert 0.0 <= choice_accuracy_norm(loglik, lengths, [r.answer for r in records]) <= 1.0


def test_world_facts_as_choices_score_on_a_tiny_model(tiny_model, tiny_tokenizer, one_thread) -> None:
    facts = load_tofu_file(SHARED_DATA / "tofu" / "world_facts_perturbed.json")[:6]
    records = choices_from_perturbed(facts, seed=0)
    loglik = option_loglikelihoods(tiny_model, tiny_tokenizer, records, batch_size=8, max_length=96)
    answers = [r.answer for r in records]
    picked = [max(range(len(scores)), key=lambda i, s=scores: (s[i], -i)) for scores in loglik]
    expected = sum(pick == answer for pick, answer in zip(picked, answers, strict=True))
    assert choice_accuracy(loglik, answers) == pytest.approx(expected / len(records))


def test_continuation_pairs_cover_the_passage(tiny_tokenizer) -> None:
    ids = tiny_tokenizer(PASSAGE, add_special_tokens=False)["input_ids"]
    assert len(ids) % 7 != 0, "the toy needs a short last window"
    pairs = continuation_pairs(tiny_tokenizer, [PASSAGE], prompt_tokens=4, continuation_tokens=3)
    assert len(pairs) == len(token_windows(ids, 7))
    assert PASSAGE.startswith("".join(prompt + truth for prompt, truth in pairs[:-1]))
    assert PASSAGE.endswith(pairs[-1][0] + pairs[-1][1]), "the last window ends where the passage ends"


def test_passage_min_k_scores_every_window(uniform_model, tiny_tokenizer, one_thread) -> None:
    scores = passage_min_k(uniform_model, tiny_tokenizer, [PASSAGE, "Mira Tolland"], window_tokens=5, batch_size=4)
    assert scores == pytest.approx([math.log(uniform_model.config.vocab_size)] * 2, rel=1e-5)


def test_passage_verbmem_of_a_model_that_says_nothing(uniform_model, tiny_tokenizer, one_thread) -> None:
    # Uniform logits: greedy decoding picks token 0, the pad token, which decodes to nothing.
    assert passage_verbmem(uniform_model, tiny_tokenizer, [PASSAGE], 4, 4, batch_size=4) == 0.0


def test_truncation_is_counted_in_a_warning(tiny_tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    records = [type("R", (), {"question": "Who is Zorblat Quim?", "answer": PASSAGE})()] * 3
    with caplog.at_level(logging.WARNING):
        encode_qas(tiny_tokenizer, records, 8, "select.max_length")
    assert "3 of 3 records cut at select.max_length=8 tokens" in caplog.text
    assert "Zorblat" not in caplog.text
