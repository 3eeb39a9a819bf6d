"""Greedy generation and teacher-forced scoring: the two model calls every metric is built from.

All functions put the model in eval mode under ``torch.inference_mode()`` and restore its previous
training flag afterwards, so a metric can be called in the middle of a training loop. Decoding is
greedy with a fresh ``GenerationConfig`` (no sampling, one beam, no repetition penalty), so a
checkpoint's own generation defaults cannot change a metric. Batches are left-padded for
generation (every row's next token sits in the same column; ``generate`` derives position ids
from the attention mask) and right-padded for scoring, and results do not depend on the batch size
beyond float rounding.

Deviation from the references: muse_bench and legacy TOFU generate one prompt at a time; here
prompts are batched. Greedy answers equal the unbatched ones unless two logits tie to within float
rounding (tested: batch 1 and batch 4 give identical answers on a tiny Llama). Decoding skips
special tokens but does not apply ``clean_up_tokenization_spaces`` (see ``generate_from_ids``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from codeunlearn.lm.prompting import (
    IGNORE_INDEX,
    EncodedQA,
    encode_prompt,
    encode_qa,
    first_answer_position,
    left_pad_prompts,
    pad_batch,
    warn_truncated,
)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no autograd for the duration; the caller's training flag comes back afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield model
    finally:
        model.train(was_training)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _require_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id (as open-unlearning pads generation with EOS)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad batches with")


def _eos_token_ids(model: nn.Module, tokenizer) -> list[int]:
    # Chat checkpoints often end turns with a token the tokenizer does not call EOS (and vice
    # versa); stopping on either keeps the answer to the model's own turn.
    ids: list[int] = []
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for candidate in (tokenizer.eos_token_id, config_eos):
        if candidate is None:
            continue
        for token in candidate if isinstance(candidate, list | tuple) else [candidate]:
            if token not in ids:
                ids.append(int(token))
    return ids


def _batches(n: int, batch_size: int, progress: bool, desc: str) -> Iterator[range]:
    starts = range(0, n, batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, total=len(starts)):
        yield range(start, min(start + batch_size, n))


def generate_from_ids(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    batch_size: int,
    progress: bool = False,
    desc: str = "generating",
) -> list[str]:
    """Greedy continuations of already-tokenized prompts, decoded without special tokens (not stripped)."""
    _require_positive(max_new_tokens=max_new_tokens, batch_size=batch_size)
    if any(len(p) == 0 for p in prompts):
        raise ValueError("cannot generate from an empty prompt (no BOS and no text)")
    pad_id = pad_token_id(tokenizer)
    eos_ids = _eos_token_ids(model, tokenizer)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_id,
        eos_token_id=eos_ids or None,
    )
    device = _device(model)
    texts: list[str] = []
    with evaluating(model):
        for rows in _batches(len(prompts), batch_size, progress, desc):
            batch = left_pad_prompts([prompts[i] for i in rows], pad_id)
            width = batch["input_ids"].shape[1]
            output = model.generate(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                generation_config=config,
            )
            # TOFU and MUSE ask for clean_up_tokenization_spaces=True; transformers 5 ignores it for
            # BPE tokenizers (with a warning), and it only removes spaces before punctuation, which
            # rouge_score's tokenizer discards anyway. Off, so every tokenizer decodes the same way.
            texts.extend(
                tokenizer.batch_decode(output[:, width:], skip_special_tokens=True, clean_up_tokenization_spaces=False)
            )
    return texts


def generate_answers(
    model: nn.Module,
    tokenizer,
    questions: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    progress: bool = False,
) -> list[str]:
    """Greedy answers to questions in the project's prompt format (``prompting.encode_prompt``), stripped.

    TOFU's protocol: the chat template where the tokenizer has one; TOFU generates up to 200 new tokens.
    """
    prompts = [encode_prompt(tokenizer, question) for question in questions]
    answers = generate_from_ids(model, tokenizer, prompts, max_new_tokens, batch_size, progress, "answering")
    return [answer.strip() for answer in answers]


def truncate_at_stop_strings(text: str, stop_strings: Sequence[str]) -> str:
    """Keep the text before the first occurrence of each stop string, applied in order (muse_bench's
    ``get_prefix_before_words_occur``)."""
    for stop in stop_strings:
        text = text.split(stop)[0]
    return text


def encode_raw(tokenizer, text: str, add_bos: bool) -> list[int]:
    """Token ids of raw text with no chat template; BOS first when asked and the tokenizer has one.

    Mirrors ``tokenizer(text, add_special_tokens=True)`` for Llama-style tokenizers (what muse_bench
    calls) without depending on whether a given tokenizer's post-processor adds BOS.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if add_bos and bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


def keep_last_tokens(ids: Sequence[int], max_tokens: int, bos_token_id: int | None) -> list[int]:
    """The prompt cut from the left to its last ``max_tokens`` tokens, a leading BOS kept in place.

    A continuation depends most on the text right before it, so a prompt longer than a model's
    context keeps its end (muse_bench feeds whole prompts to a 4k-context Llama-2).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    ids = list(ids)
    if len(ids) <= max_tokens:
        return ids
    if bos_token_id is not None and ids[0] == bos_token_id:
        return [bos_token_id, *ids[len(ids) - max_tokens + 1 :]] if max_tokens > 1 else [bos_token_id]
    return ids[len(ids) - max_tokens :]


def generate_continuations(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    add_bos: bool = True,
    stop_strings: Sequence[str] = (),
    progress: bool = False,
    max_prompt_tokens: int | None = None,
) -> list[str]:
    """Greedy continuations of raw prompts (MUSE VerbMem / KnowMem), cut at ``stop_strings``.

    As in muse_bench the text is neither stripped nor re-formatted; ROUGE's tokenizer ignores the
    surrounding whitespace anyway. ``max_prompt_tokens`` (None: whole prompts) keeps each prompt's
    last tokens (``keep_last_tokens``).
    """
    ids = [encode_raw(tokenizer, prompt, add_bos) for prompt in prompts]
    if max_prompt_tokens is not None:
        ids = [keep_last_tokens(item, max_prompt_tokens, tokenizer.bos_token_id) for item in ids]
    texts = generate_from_ids(model, tokenizer, ids, max_new_tokens, batch_size, progress, "continuing")
    return [truncate_at_stop_strings(text, stop_strings) for text in texts]


def _token_logprobs(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, first: int = 0
) -> torch.Tensor:
    """log p(token t+1 | tokens <= t) for positions t >= ``first``: shape (batch, seq - 1 - first), float32.

    Only those positions go through the LM head (``logits_to_keep``), and log p is the target's logit
    minus the logsumexp, with no full log-softmax: with a 49k vocabulary the head and the softmax
    cost a third of a scoring pass, and the prompt tokens before ``first`` need neither.
    """
    keep = input_ids.shape[1] - first
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits[:, :-1].float()
    picked = torch.gather(logits, 2, input_ids[:, first + 1 :].unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def _answer_logprobs(
    model: nn.Module, chunk: Sequence[EncodedQA], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """One right-padded batch scored teacher-forced: (log p per position from the first answer position
    on, the mask of those positions whose next token is an answer token), both (batch, positions)."""
    batch = pad_batch(chunk, pad_id)
    first = first_answer_position(batch["labels"])
    logprobs = _token_logprobs(model, batch["input_ids"].to(device), batch["attention_mask"].to(device), first)
    return logprobs, (batch["labels"][:, first + 1 :] != IGNORE_INDEX).to(device)


def encode_answers(
    tokenizer, pairs: Sequence[tuple[str, str]], max_length: int, setting: str = "max_length", add_eos: bool = True
) -> list[EncodedQA]:
    """``encode_qa`` of each pair; cut pairs are counted in a warning, and a pair left with no answer
    token is an error, each naming the ``setting`` to raise."""
    encoded = [encode_qa(tokenizer, question, answer, max_length, add_eos) for question, answer in pairs]
    warn_truncated(sum(item.truncated for item in encoded), len(encoded), max_length, setting)
    for index, item in enumerate(encoded):
        if all(label == IGNORE_INDEX for label in item.labels):
            raise ValueError(
                f"pair {index}: no answer token survives max_length={max_length} "
                f"(prompt is {item.prompt_length} tokens); raise {setting}"
            )
    return encoded


def answer_token_logprobs(
    model: nn.Module,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    batch_size: int,
    max_length: int,
    progress: bool = False,
    setting: str = "max_length",
    add_eos: bool = True,
) -> list[torch.Tensor]:
    """log p of every answer token (EOS included unless ``add_eos`` is false) of each (question, answer),
    teacher-forced.

    The token sequence training sees (``prompting.encode_qa``), kept per token so that the NLL
    (``mean_nll``), Min-K% and LOSS read the same pass.
    """
    _require_positive(batch_size=batch_size, max_length=max_length)
    encoded = encode_answers(tokenizer, pairs, max_length, setting, add_eos)
    device = _device(model)
    pad_id = pad_token_id(tokenizer)
    # Batches of similar lengths: right padding is computed and thrown away (13% of the default profile's
    # scoring in input order). Results go back to input order.
    order = sorted(range(len(encoded)), key=lambda index: len(encoded[index].input_ids))
    by_index: dict[int, torch.Tensor] = {}
    with evaluating(model):
        for rows in _batches(len(order), batch_size, progress, "scoring answers"):
            indices = [order[row] for row in rows]
            logprobs, answer = _answer_logprobs(model, [encoded[index] for index in indices], pad_id, device)
            for row, index in enumerate(indices):
                by_index[index] = logprobs[row][answer[row]].cpu().clone()
    return [by_index[index] for index in range(len(encoded))]


def mean_nll(logprobs: torch.Tensor) -> float:
    """Mean NLL of one item's answer tokens (``answer_token_logprobs``): TOFU's ``avg_gt_loss``, the summed
    token cross-entropy on the labelled tokens divided by their count."""
    return float(-(logprobs.sum() / logprobs.numel()))


def text_token_logprobs(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    batch_size: int,
    max_length: int,
    add_bos: bool = True,
    progress: bool = False,
) -> list[torch.Tensor]:
    """Per-token log-probabilities of raw texts (every token after the first), for Min-K% / LOSS MIAs.

    muse_bench's ``compute_ppl``: the text is encoded with BOS and each token after it is scored.
    Texts longer than ``max_length`` tokens are cut, with a warning counting them (muse_bench scores
    whole texts; set max_length to the model's context length to match it, or score windows with
    ``token_logprobs``).
    """
    _require_positive(batch_size=batch_size, max_length=max_length)
    encoded = [encode_raw(tokenizer, text, add_bos) for text in texts]
    warn_truncated(sum(len(ids) > max_length for ids in encoded), len(encoded), max_length, "max_length")
    return token_logprobs(model, tokenizer, [ids[:max_length] for ids in encoded], batch_size, progress)


def token_logprobs(
    model: nn.Module, tokenizer, encoded: Sequence[Sequence[int]], batch_size: int, progress: bool = False
) -> list[torch.Tensor]:
    """log p of every token after the first of each token-id sequence, teacher-forced, in input order."""
    _require_positive(batch_size=batch_size)
    for index, ids in enumerate(encoded):
        if len(ids) < 2:
            raise ValueError(f"text {index}: needs at least two tokens to score one, got {len(ids)}")
    device = _device(model)
    pad_id = pad_token_id(tokenizer)
    out: list[torch.Tensor] = []
    with evaluating(model):
        for rows in _batches(len(encoded), batch_size, progress, "scoring texts"):
            chunk = [encoded[i] for i in rows]
            width = max(len(ids) for ids in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, ids in enumerate(chunk):
                input_ids[row, : len(ids)] = torch.tensor(list(ids))
                attention_mask[row, : len(ids)] = 1
            logprobs = _token_logprobs(model, input_ids.to(device), attention_mask.to(device)).cpu()
            out.extend(logprobs[row, : len(ids) - 1] for row, ids in enumerate(chunk))
    # Cloned outside inference mode so callers get ordinary tensors they may modify in place.
    return [tensor.clone() for tensor in out]


DEFAULT_MAX_NEW_TOKENS = 32


def greedy_answer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> str:
    """The model's greedy answer to one question, prompted exactly as training and metrics prompt it."""
    prompt_ids = encode_prompt(tokenizer, question)
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    with torch.no_grad():
        # A fresh GenerationConfig: a checkpoint's own sampling or repetition defaults must not change it.
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        output = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config
        )
    return tokenizer.decode(output[0, len(prompt_ids) :], skip_special_tokens=True).strip()
