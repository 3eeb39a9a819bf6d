"""One supervised loop for every fine-tune: target, oracle, codebook training and gradient baselines.

Loss on answer tokens only (TOFU's protocol); a method adds its own terms through ``extra_loss``
instead of writing another loop. Given an ``accelerate.Accelerator``, the same loop runs data-parallel:
every process draws the global batch the single-process loop would draw and trains on its slice of it.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from codeunlearn.lm.prompting import IGNORE_INDEX, EncodedQA, encode_qas, first_answer_position, pad_batch

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

    @classmethod
    def from_block(cls, block: Mapping[str, Any], seed: int, **overrides: Any) -> TrainSpec:
        """A params.yaml training block (``finetune``, ``codebook_train``, ...): its TrainSpec fields, the
        run's seed, then ``overrides``; other keys of the block (e.g. ``finetune.passages``) are not the loop's."""
        fields = {name: block[name] for name in cls.__dataclass_fields__ if name in block}
        return cls(**{**fields, "seed": seed, **overrides})


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def encode_records(tokenizer: Any, records: Sequence[Any], max_length: int) -> list[EncodedQA]:
    return encode_qas(tokenizer, records, max_length)


def answer_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 logits, next-token labels) from the batch's first answer position on.

    The LM head runs only from the earliest position whose next token is an answer token
    (``logits_to_keep``): prompt positions carry no loss, and with a 49k vocabulary the head is a
    fifth of a pretrained model's forward and backward pass.
    """
    first = first_answer_position(batch["labels"])
    keep = batch["input_ids"].shape[1] - first
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep)
    return out.logits[:, :-1].float(), batch["labels"][:, first + 1 :]


def _answer_cross_entropy(model: nn.Module, batch: dict[str, torch.Tensor], reduction: str) -> torch.Tensor:
    logits, labels = answer_logits(model, batch)
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction=reduction
    )


def answer_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over answer tokens (labels are IGNORE_INDEX elsewhere)."""
    return _answer_cross_entropy(model, batch, "mean")


def answer_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed cross-entropy over answer tokens: the numerator of ``answer_loss`` (same shift, float32 logits)."""
    return _answer_cross_entropy(model, batch, "sum")


def answer_token_count(batch: dict[str, torch.Tensor]) -> int:
    """Answer tokens ``answer_loss`` averages over (labels after the causal shift)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def shard_batch(batch: dict[str, torch.Tensor], index: int, count: int) -> dict[str, torch.Tensor]:
    """Process ``index`` of ``count``'s contiguous rows of a global batch (``torch.tensor_split``'s sizes).

    A process left without a row (a last batch smaller than ``count``) gets one row with every label
    ignored: it contributes nothing to the loss but still joins the gradient all-reduce.
    """
    rows = batch["input_ids"].shape[0]
    base, extra = divmod(rows, count)
    start = index * base + min(index, extra)
    stop = start + base + (1 if index < extra else 0)
    if stop > start:
        return {name: tensor[start:stop] for name, tensor in batch.items()}
    empty = {name: tensor[:1].clone() for name, tensor in batch.items()}
    empty["labels"].fill_(IGNORE_INDEX)
    return empty


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
    accelerator: Any | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` on the answers of ``records``; returns the logged history (one dict per log step).

    With ``accelerator`` (an ``accelerate.Accelerator``, e.g. under ``accelerate launch``), ``model`` is
    wrapped for data parallelism and trained in place; ``spec.batch_size`` stays the global batch. Each
    process draws the same seeded global batch and takes its contiguous rows; its summed answer loss is
    divided by the global batch's answer-token count, so the averaged gradient and the logged ``ce`` are
    the single-process ones (up to float summation order). ``extra_loss`` terms are per-process means,
    averaged over processes. Every process returns the same history and calls ``on_step`` with it.
    """
    if accelerator is not None:
        return _train_answers_data_parallel(
            model, tokenizer, records, spec, accelerator, parameters, extra_loss, on_step, progress, description
        )
    device = next(model.parameters()).device
    params, optimizer, scheduler, stream = _optimizer_and_batches(model, tokenizer, records, spec, parameters)
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
        _record_step(step, logged, spec, history, bar, on_step)
    model.eval()
    return history


def _optimizer_and_batches(
    model: nn.Module, tokenizer: Any, records: Sequence[Any], spec: TrainSpec, parameters: Sequence[nn.Parameter] | None
):
    """Seeded setup both loops share: trained parameters, AdamW, the warm-up schedule, the batch stream."""
    generator = seed_everything(spec.seed)
    encoded = encode_records(tokenizer, records, spec.max_length)
    params = list(parameters) if parameters is not None else [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    scheduler = linear_warmup(optimizer, spec.warmup_steps)
    stream = batches_forever(encoded, spec.batch_size, tokenizer.pad_token_id, generator)
    return params, optimizer, scheduler, stream


def _record_step(
    step: int,
    logged: dict[str, float],
    spec: TrainSpec,
    history: list[dict[str, float]],
    bar: Any,
    on_step: StepCallback | None,
) -> None:
    if on_step is not None:
        on_step(step, logged)
    if step % spec.log_every == 0 or step == spec.steps - 1:
        history.append({"step": step, **logged})
        bar.set_postfix(ce=f"{logged['ce']:.3f}")


def _train_answers_data_parallel(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[Any],
    spec: TrainSpec,
    accelerator: Any,
    parameters: Sequence[nn.Parameter] | None,
    extra_loss: ExtraLoss | None,
    on_step: StepCallback | None,
    progress: bool,
    description: str,
) -> list[dict[str, float]]:
    """``train_answers`` under an ``accelerate.Accelerator``: same batches, schedule and logging."""
    world, rank = accelerator.num_processes, accelerator.process_index
    params, optimizer, scheduler, stream = _optimizer_and_batches(model, tokenizer, records, spec, parameters)
    # The schedule counts global steps, so it is not passed to prepare() (which would step it once per process).
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device
    history: list[dict[str, float]] = []
    model.train()
    bar = tqdm(
        range(spec.steps), desc=description, disable=not progress or not accelerator.is_local_main_process, leave=False
    )
    for step in bar:
        global_batch = next(stream)
        tokens = max(1, answer_token_count(global_batch))
        batch = to_device(shard_batch(global_batch, rank, world), device)
        ce_sum = answer_loss_sum(wrapped, batch)
        terms = extra_loss(model, batch) if extra_loss is not None else {}
        # DDP averages gradients over processes: scaling by ``world`` makes the CE part the global token mean.
        loss = ce_sum * (world / tokens) + sum(terms.values(), torch.zeros((), device=device))
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, spec.grad_clip)
        optimizer.step()
        scheduler.step()
        totals = accelerator.reduce(torch.stack([ce_sum.detach(), *(t.detach() for t in terms.values())]), "sum")
        ce = totals[0].item() / tokens
        term_means = {name: totals[i + 1].item() / world for i, name in enumerate(terms)}
        logged = {"loss": ce + sum(term_means.values()), "ce": ce, **term_means}
        _record_step(step, logged, spec, history, bar, on_step)
    model.eval()
    return history


def frozen_copy(model: nn.Module) -> nn.Module:
    """A detached, eval-mode copy that no optimizer can touch (NPO/RMU's reference model)."""
    reference = copy.deepcopy(model)
    reference.eval()
    reference.requires_grad_(False)
    return reference
