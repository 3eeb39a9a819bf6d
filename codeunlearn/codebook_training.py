"""Train a codebook bottleneck into a model once: the amortised cost that makes every request zero-shot."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from codeunlearn.codebook import CodebookBottleneck, CodebookSpec, attach_codebook, decoder_layers
from codeunlearn.prompting import pad_batch
from codeunlearn.training import TrainSpec, encode_records, seed_everything, to_device, train_answers


@dataclass(frozen=True)
class CodebookLoss:
    reconstruction_weight: float
    l1_weight: float


@dataclass(frozen=True)
class Revival:
    every: int  # steps between revivals; 0 disables it
    noise: float


@contextmanager
def frozen_below(model: nn.Module, layer: int, enabled: bool) -> Iterator[list[nn.Parameter]]:
    """Freeze the input embeddings and blocks 0..layer for the duration; yields the parameters left trainable.

    The codebook quantizes what the lower blocks write, so keeping them fixed keeps its input distribution
    still while it trains, and the backward pass stops at the bottleneck (about a third less compute per
    step for a mid-depth codebook). A tied output head shares the embeddings and is frozen with them.
    """
    below = [*model.get_input_embeddings().parameters(), *decoder_layers(model)[: layer + 1].parameters()]
    frozen = {id(p) for p in below} if enabled else set()
    previous = {id(p): p.requires_grad for p in model.parameters()}
    try:
        for parameter in model.parameters():
            if id(parameter) in frozen:
                parameter.requires_grad_(False)
        yield [p for p in model.parameters() if p.requires_grad]
    finally:
        for parameter in model.parameters():
            parameter.requires_grad_(previous[id(parameter)])


def hidden_size(model: nn.Module) -> int:
    return int(model.config.hidden_size)


@torch.inference_mode()
def collect_activations(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[Any],
    layer: int,
    batch_size: int,
    max_length: int,
    max_batches: int,
) -> torch.Tensor:
    """Residual-stream vectors after block ``layer`` on real tokens (padding dropped)."""
    device = next(model.parameters()).device
    captured: list[torch.Tensor] = []
    current_mask: list[torch.Tensor] = []

    def grab(_module, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        captured.append(hidden[current_mask[-1]].detach().float().cpu())

    handle = decoder_layers(model)[layer].register_forward_hook(grab)
    try:
        encoded = encode_records(tokenizer, records, max_length)
        for index, start in enumerate(range(0, len(encoded), batch_size)):
            if index >= max_batches:
                break
            batch = to_device(pad_batch(encoded[start : start + batch_size], tokenizer.pad_token_id), device)
            current_mask.append(batch["attention_mask"].bool())
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        handle.remove()
    return torch.cat(captured)


def train_codebook(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[Any],
    codebook_spec: CodebookSpec,
    train_spec: TrainSpec,
    loss: CodebookLoss,
    revival: Revival,
    init_batches: int,
    progress: bool = True,
    freeze_below: bool = False,
) -> tuple[CodebookBottleneck, list[dict[str, float]]]:
    """Attach a bottleneck seeded from real activations and train it jointly with the model.

    With ``freeze_below`` only the blocks above the codebook (and the codebook) train.
    Returns the bottleneck (left attached) and the training history, whose rows carry the live-code
    count and the number of revived codes, the two numbers that reveal code collapse.
    """
    generator = seed_everything(train_spec.seed)
    activations = collect_activations(
        model, tokenizer, records, codebook_spec.layer, train_spec.batch_size, train_spec.max_length, init_batches
    )
    device = next(model.parameters()).device
    bottleneck = CodebookBottleneck(hidden_size(model), codebook_spec).to(device)
    bottleneck.init_from_activations(activations.to(device), generator)
    attach_codebook(model, bottleneck)

    def codebook_terms(_model: nn.Module, _batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            "reconstruction": loss.reconstruction_weight * bottleneck.reconstruction_loss,
            "code_l1": loss.l1_weight * bottleneck.code_l1,
        }

    # live_codes: codes used in the last revival window; revived_total: cumulative re-seeded codes.
    revival_log: dict[str, float] = {"live_codes": float(codebook_spec.num_codes), "revived_total": 0.0}

    def on_step(step: int, logged: dict[str, float]) -> None:
        if revival.every and step > 0 and step % revival.every == 0:
            revival_log["live_codes"] = float(bottleneck.live_codes())
            revival_log["revived_total"] += bottleneck.revive_dead_codes(generator, revival.noise)
        logged.update(revival_log)

    with frozen_below(model, codebook_spec.layer, freeze_below) as trainable:
        history = train_answers(
            model,
            tokenizer,
            records,
            train_spec,
            parameters=[*trainable, *bottleneck.parameters()],
            extra_loss=codebook_terms,
            on_step=on_step,
            progress=progress,
            description="codebook",
        )
    bottleneck.eval()
    return bottleneck, history
