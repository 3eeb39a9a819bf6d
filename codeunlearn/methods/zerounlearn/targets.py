"""ZeroUnlearn step 1 (see ``method``): the forget prompts and the target residual z* each should end in.

A vector added to the residual stream after the last edited block, at each prompt's key position, is
optimised so the model continues the prompt with the target text; z* = h + that vector.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from codeunlearn.lm.blocks import decoder_layers
from codeunlearn.lm.prompting import IGNORE_INDEX, EncodedQA, answer_text, encode_prompt, pad_batch
from codeunlearn.methods.base import MethodParams
from codeunlearn.methods.trainer import model_device, requires_grad_only


@dataclass(frozen=True)
class Prompts:
    """Forget prompts followed by the target text; ``key_index`` is each prompt's last token."""

    encoded: list[EncodedQA]
    key_index: list[int]


def target_ids(tokenizer: Any, target_text: str) -> list[int]:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    text = [] if not target_text.strip() else tokenizer(answer_text(target_text), add_special_tokens=False)["input_ids"]
    ids = [*text, *eos]
    if not ids:
        raise ValueError("zerounlearn: target_text is empty and the tokenizer has no EOS token to target")
    return ids


def forget_prompts(tokenizer: Any, forget: Sequence[Any], target: list[int], max_length: int) -> Prompts:
    encoded, key_index = [], []
    for record in forget:
        # Cut the prompt, not the target, when too long: the target is what the edit must produce.
        prompt = encode_prompt(tokenizer, record.question)[: max(1, max_length - len(target))]
        encoded.append(EncodedQA(input_ids=[*prompt, *target], labels=[IGNORE_INDEX] * len(prompt) + target))
        key_index.append(len(prompt) - 1)
    return Prompts(encoded, key_index)


def index_chunks(n: int, size: int) -> Iterator[list[int]]:
    for start in range(0, n, size):
        yield list(range(start, min(start + size, n)))


@contextmanager
def residual_edit(block: nn.Module, rows: list[int], positions: list[int], delta: torch.Tensor | None):
    """Add ``delta[i]`` to the block's output at (rows[i], positions[i]); record the unedited values there."""
    store: dict[str, torch.Tensor] = {}

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        hidden = output if isinstance(output, torch.Tensor) else output[0]
        store["at_keys"] = hidden[rows, positions]
        if delta is None:
            return None
        index = (torch.tensor(rows, device=hidden.device), torch.tensor(positions, device=hidden.device))
        edited = hidden + torch.zeros_like(hidden).index_put(index, delta.to(hidden.dtype))
        return edited if isinstance(output, torch.Tensor) else (edited, *output[1:])

    handle = block.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def forward_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def optimise_targets(
    model: nn.Module, z_layer: int, prompts: Prompts, p: MethodParams, pad: int
) -> tuple[torch.Tensor, float]:
    """z* (d_model, n) per forget prompt, and the final mean target-token NLL."""
    device = model_device(model)
    block = decoder_layers(model)[z_layer]
    targets, nlls = [], []
    chunks = list(index_chunks(len(prompts.encoded), p.int("batch_size")))
    was_training = model.training
    model.eval()
    with requires_grad_only(model, []):
        for rows in tqdm(chunks, desc="zerounlearn targets", disable=not p.bool("progress"), leave=False):
            z, nll = _optimise_chunk(model, block, prompts, rows, p, pad, device)
            targets.append(z)
            nlls.append(nll * len(rows))
    model.train(was_training)
    return torch.cat(targets).T, sum(nlls) / len(prompts.encoded)


def _optimise_chunk(
    model: nn.Module,
    block: nn.Module,
    prompts: Prompts,
    rows: list[int],
    p: MethodParams,
    pad: int,
    device: torch.device,
) -> tuple[torch.Tensor, float]:
    batch = {k: v.to(device) for k, v in pad_batch([prompts.encoded[i] for i in rows], pad).items()}
    local, positions = list(range(len(rows))), [prompts.key_index[i] for i in rows]
    labels = batch["labels"][:, 1:]
    n_target = (labels != IGNORE_INDEX).sum(dim=1)
    with torch.no_grad(), residual_edit(block, local, positions, None) as store:
        forward_logits(model, batch)
    init = store["at_keys"].detach()
    init_norm = init.norm(dim=1, keepdim=True)
    delta = torch.zeros_like(init, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=p.float("target_lr"))
    nll = torch.full((len(rows),), float("nan"))
    for _ in range(p.int("target_steps")):
        with residual_edit(block, local, positions, delta):
            logits = forward_logits(model, batch)[:, :-1].float()
        token_nll = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
        )
        nll = token_nll.sum(dim=1) / n_target
        decay = p.float("target_weight_decay") * delta.norm(dim=1) / init_norm.squeeze(1).pow(2)
        # Summed over rows, not averaged, so each prompt's δ gets the gradient it would get alone.
        loss = (nll + decay).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # project back into the ball of radius clamp_norm_factor·‖h‖
            limit = p.float("clamp_norm_factor") * init_norm
            delta.mul_(torch.clamp(limit / delta.norm(dim=1, keepdim=True).clamp_min(1e-12), max=1.0))
    return (init + delta.detach()).double(), float(nll.detach().mean())
