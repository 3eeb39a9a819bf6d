"""The answer-only loss every fine-tune shares, on a tiny Llama built in code (no downloads)."""

from __future__ import annotations

import pytest
import torch

from codeunlearn.lm.prompting import encode_qa, pad_batch
from codeunlearn.lm.training import answer_loss, answer_loss_sum, answer_token_count
from tests.bytelevel import tiny_llama, tiny_tokenizer

PAIRS = [
    ("Who wrote the novel?", "Basil Mahfouz wrote it in Cairo."),
    ("Where was she born, in the small town near the sea?", "In a small town."),
    ("cat", "A cat sat on the mat by the river."),
]


@pytest.fixture(scope="module")
def batch_and_model():
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer)
    batch = pad_batch([encode_qa(tokenizer, q, a, 200) for q, a in PAIRS], tokenizer.pad_token_id)
    return batch, model


def test_answer_loss_is_the_full_models_label_loss(batch_and_model):
    # The LM head runs only from the first answer position; the loss and its gradient must be those of
    # the whole sequence with prompt labels ignored (transformers' own causal-LM loss).
    batch, model = batch_and_model
    reference = model(**batch).loss
    reference.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss = answer_loss(model, batch)
    loss.backward()
    assert loss.item() == pytest.approx(reference.item(), abs=1e-6)
    for got, want in zip((p.grad for p in model.parameters()), expected, strict=True):
        assert torch.allclose(got, want, atol=1e-6)
    model.zero_grad()
    summed = answer_loss_sum(model, batch).item()
    assert summed == pytest.approx(reference.item() * answer_token_count(batch), rel=1e-5)
