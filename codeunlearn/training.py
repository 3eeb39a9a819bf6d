"""One supervised loop for every fine-tune: target, oracle, codebook training and gradient baselines.

Loss on answer tokens only (TOFU's protocol); a method adds its own terms through ``extra_loss``
instead of writing another loop.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from codeunlearn.prompting import EncodedQA, encode_qa, pad_batch

ExtraLoss = Callable[[nn.Module, dict[str, torch.Tensor]], dict[str, torch.Tensor]]
StepCallback = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class TrainSpec:
    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    max_length: int
    grad_clip: float
    seed: int
    log_every: int


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def encode_records(tokenizer: Any, records: Sequence[Any], max_length: int) -> list[EncodedQA]:
    return [encode_qa(tokenizer, r.question, r.answer, max_length) for r in records]


def answer_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over answer tokens (labels are IGNORE_INDEX elsewhere)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    return out.loss


def batches_forever(encoded: Sequence[EncodedQA], batch_size: int, pad_token_id: int, generator: torch.Generator):
    """Shuffled epochs, drawn from a seeded generator so a run is replayable."""
    while True:
        order = torch.randperm(len(encoded), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            yield pad_batch([encoded[i] for i in order[start : start + batch_size]], pad_token_id)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: tensor.to(device) for name, tensor in batch.items()}


def linear_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))


def train_answers(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[Any],
    spec: TrainSpec,
    *,
    parameters: Sequence[nn.Parameter] | None = None,
    extra_loss: ExtraLoss | None = None,
    on_step: StepCallback | None = None,
    progress: bool = True,
    description: str = "train",
) -> list[dict[str, float]]:
    """Train ``model`` on the answers of ``records``; returns the logged history (one dict per log step)."""
    device = next(model.parameters()).device
    generator = seed_everything(spec.seed)
    encoded = encode_records(tokenizer, records, spec.max_length)
    params = list(parameters) if parameters is not None else [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    scheduler = linear_warmup(optimizer, spec.warmup_steps)
    stream = batches_forever(encoded, spec.batch_size, tokenizer.pad_token_id, generator)
    history: list[dict[str, float]] = []
    model.train()
    bar = tqdm(range(spec.steps), desc=description, disable=not progress, leave=False)
    for step in bar:
        batch = to_device(next(stream), device)
        ce = answer_loss(model, batch)
        terms = extra_loss(model, batch) if extra_loss is not None else {}
        loss = ce + sum(terms.values(), torch.zeros((), device=device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)
        optimizer.step()
        scheduler.step()
        logged = {"loss": loss.item(), "ce": ce.item(), **{name: term.item() for name, term in terms.items()}}
        if on_step is not None:
            on_step(step, logged)
        if step % spec.log_every == 0 or step == spec.steps - 1:
            history.append({"step": step, **logged})
            bar.set_postfix(ce=f"{logged['ce']:.3f}")
    model.eval()
    return history
