"""How a question becomes a prompt, and a QA pair becomes training tokens.

One place for the prompt format so that training, code statistics, generation and every metric
see exactly the same token sequence for the same question.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
PLAIN_PROMPT_TEMPLATE = "Question: {question}\nAnswer:"


def build_prompt(tokenizer, question: str) -> str:
    """The model's own chat template where it has one (TOFU's protocol), a plain QA frame otherwise."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
    return PLAIN_PROMPT_TEMPLATE.format(question=question)


def answer_text(answer: str) -> str:
    # A leading space keeps the answer's first word a word-initial token for BPE tokenizers.
    return " " + answer.strip()


@dataclass(frozen=True)
class EncodedQA:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens: the loss sees answer tokens only
    truncated: bool = False  # tokens were cut at max_length

    @property
    def prompt_length(self) -> int:
        return sum(1 for label in self.labels if label == IGNORE_INDEX)


def encode_prompt(tokenizer, question: str) -> list[int]:
    ids = tokenizer(build_prompt(tokenizer, question), add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos) and not getattr(tokenizer, "chat_template", None):
        ids = [bos, *ids]
    return ids


def encode_qa(tokenizer, question: str, answer: str, max_length: int, add_eos: bool = True) -> EncodedQA:
    """Prompt tokens then answer tokens then EOS (unless ``add_eos`` is false: a multiple-choice option
    is scored without it), truncated to max_length; labels on the answer only."""
    prompt_ids = encode_prompt(tokenizer, question)
    answer_ids = tokenizer(answer_text(answer), add_special_tokens=False)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None:
        answer_ids = [*answer_ids, tokenizer.eos_token_id]
    full = prompt_ids + answer_ids
    input_ids = full[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_length]
    return EncodedQA(input_ids=input_ids, labels=labels, truncated=len(full) > max_length)


def warn_truncated(count: int, total: int, max_length: int, setting: str) -> None:
    """No silent truncation: a warning with how many of ``total`` records (or texts) were cut at
    ``max_length`` tokens, naming the ``setting`` to raise. Counts only, never text."""
    if count:
        message = "%d of %d records cut at %s=%d tokens: raise it to keep them whole"
        log.warning(message, count, total, setting, max_length)


def encode_passage(tokenizer, text: str, max_length: int) -> list[EncodedQA]:
    """A document to forget as consecutive windows of at most ``max_length`` tokens, each after BOS (as
    text was seen in pre-training) with every token but BOS labelled: a passage is chunked, never cut."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    width = max_length - len(bos)
    if width < 2:
        raise ValueError(f"max_length={max_length} leaves fewer than 2 passage tokens per window")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = [ids[start : start + width] for start in range(0, len(ids), width)]
    return [
        EncodedQA(input_ids=[*bos, *window], labels=[IGNORE_INDEX] * len(bos) + list(window))
        for window in windows
        if len(bos) + len(window) >= 2  # one token after nothing has nothing to predict it from
    ]


def encode_qas(tokenizer, records: Sequence, max_length: int, setting: str = "max_length") -> list[EncodedQA]:
    """Training and counting rows of every record: ``encode_qa`` of a QA (anything with ``question`` and
    ``answer``), warning about cut ones; ``encode_passage``'s windows of a passage (anything with ``text``)."""
    encoded: list[EncodedQA] = []
    for record in records:
        if hasattr(record, "text"):
            encoded.extend(encode_passage(tokenizer, record.text, max_length))
        else:
            encoded.append(encode_qa(tokenizer, record.question, record.answer, max_length))
    warn_truncated(sum(e.truncated for e in encoded), len(encoded), max_length, setting)
    return encoded


def pad_batch(encoded: Sequence[EncodedQA], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids, labels (IGNORE_INDEX on padding) and attention_mask."""
    width = max(len(e.input_ids) for e in encoded)
    input_ids = torch.full((len(encoded), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, item in enumerate(encoded):
        n = len(item.input_ids)
        input_ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def first_answer_position(labels: torch.Tensor) -> int:
    """The earliest position whose next token is an answer token in any row of a padded batch (0 if none).

    Logits before it predict prompt tokens only, which no loss or score reads.
    """
    columns = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero()
    return int(columns[0]) if len(columns) else 0


def left_pad_prompts(prompts: Sequence[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompt batch for generation, so every row's next token is at the same column."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
