"""Generation and teacher-forced scoring on a tiny Llama built in code (no downloads)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from codeunlearn.lm.generation import (
    answer_token_logprobs,
    encode_raw,
    generate_answers,
    generate_continuations,
    text_token_logprobs,
    truncate_at_stop_strings,
)
from codeunlearn.lm.prompting import IGNORE_INDEX, encode_qa
from tests.bytelevel import CORPUS
from tests.helpers import answer_nlls

QUESTIONS = [
    "Who wrote the novel?",
    "Where was she born, in the small town near the sea?",
    "Paris?",
    "What is the capital of France, and why?",
    "cat",
]


def test_generate_answers_is_batch_invariant(model, tokenizer):
    one = generate_answers(model, tokenizer, QUESTIONS, max_new_tokens=10, batch_size=1)
    four = generate_answers(model, tokenizer, QUESTIONS, max_new_tokens=10, batch_size=4)
    assert one == four
    assert len(set(one)) > 1, "the tiny model should answer different prompts differently"
    assert all(answer == answer.strip() for answer in one)


def test_generate_answers_restores_training_mode(model, tokenizer):
    model.train()
    generate_answers(model, tokenizer, QUESTIONS[:2], max_new_tokens=2, batch_size=2)
    assert model.training
    model.eval()
    generate_answers(model, tokenizer, QUESTIONS[:2], max_new_tokens=2, batch_size=2)
    assert not model.training


def test_generation_is_greedy_and_deterministic(model, tokenizer):
    first = generate_continuations(model, tokenizer, CORPUS, max_new_tokens=6, batch_size=3)
    second = generate_continuations(model, tokenizer, CORPUS, max_new_tokens=6, batch_size=2)
    assert first == second
    # Greedy means the first new token is the argmax of the prompt's last-position logits.
    ids = encode_raw(tokenizer, CORPUS[0], add_bos=True)
    with torch.no_grad():
        top = model(torch.tensor([ids])).logits[0, -1].argmax().item()
    single = generate_continuations(model, tokenizer, CORPUS[:1], max_new_tokens=1, batch_size=1)[0]
    assert single == tokenizer.decode([top], skip_special_tokens=True)


def test_encode_raw_adds_bos_once(tokenizer):
    ids = encode_raw(tokenizer, "Paris", add_bos=True)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert encode_raw(tokenizer, "Paris", add_bos=False)[0] != tokenizer.bos_token_id


def test_stop_strings_cut_like_muse():
    stops = ("\n\n", "\nQuestion", "Question:")
    assert truncate_at_stop_strings(" in Cairo\n\nQuestion: next", stops) == " in Cairo"
    assert truncate_at_stop_strings("Cairo\nQuestion 2", stops) == "Cairo"
    assert truncate_at_stop_strings("Cairo Question: x", stops) == "Cairo "
    assert truncate_at_stop_strings("Cairo", stops) == "Cairo"


def test_answer_nll_matches_a_hand_loop(model, tokenizer):
    pairs = [(question, "in Cairo") for question in QUESTIONS]
    batched = answer_nlls(model, tokenizer, pairs, batch_size=3, max_length=200)
    singles = answer_nlls(model, tokenizer, pairs, batch_size=1, max_length=200)
    assert batched == pytest.approx(singles, abs=1e-5)
    item = encode_qa(tokenizer, *pairs[1], max_length=200)
    with torch.no_grad():
        logits = model(torch.tensor([item.input_ids])).logits[0, :-1]
    labels = torch.tensor(item.labels[1:])
    expected = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX).item()
    assert batched[1] == pytest.approx(expected, abs=1e-5)


def test_answer_token_logprobs_match_a_full_log_softmax(model, tokenizer):
    # Prompts of different lengths share a batch: the LM head starts at the shortest prompt's first
    # answer position, so the longer prompts' extra positions are computed and must not leak in.
    pairs = [(question, "in Cairo, by the river") for question in QUESTIONS]
    logprobs = answer_token_logprobs(model, tokenizer, pairs, batch_size=len(pairs), max_length=200)
    for pair, values in zip(pairs, logprobs, strict=True):
        item = encode_qa(tokenizer, *pair, max_length=200)
        with torch.no_grad():
            full = F.log_softmax(model(torch.tensor([item.input_ids])).logits[0, :-1], dim=-1)
        expected = full.gather(1, torch.tensor(item.input_ids[1:]).unsqueeze(1)).squeeze(1)
        answer = torch.tensor(item.labels[1:]) != IGNORE_INDEX
        assert values.shape == (int(answer.sum()),)
        assert torch.allclose(values, expected[answer], atol=1e-5)


def test_answer_token_logprobs_reject_fully_truncated_answers(model, tokenizer):
    with pytest.raises(ValueError, match="pair 0"):
        answer_token_logprobs(model, tokenizer, [("a long question " * 20, "x")], batch_size=1, max_length=8)


def test_text_token_logprobs_score_every_token_after_bos(model, tokenizer):
    logprobs = text_token_logprobs(model, tokenizer, CORPUS, batch_size=2, max_length=200)
    for text, values in zip(CORPUS, logprobs, strict=True):
        ids = encode_raw(tokenizer, text, add_bos=True)
        assert values.shape == (len(ids) - 1,)
        assert torch.all(values <= 0)
    ids = encode_raw(tokenizer, CORPUS[2], add_bos=True)
    with torch.no_grad():
        full = F.log_softmax(model(torch.tensor([ids])).logits[0, :-1], dim=-1)
    expected = full.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
    assert torch.allclose(logprobs[2], expected, atol=1e-5)
    logprobs[0].add_(1.0)  # ordinary tensors, not inference-mode ones
