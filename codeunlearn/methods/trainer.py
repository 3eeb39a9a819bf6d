"""One gradient-unlearning loop shared by GA, GradDiff, NPO, RMU and GRIN (open-unlearning's shape).

Every step draws one forget batch and (when the method uses it) one retain batch, asks the method
for its loss terms, sums them and takes an AdamW step. A method subclasses ``GradientUnlearning``
and overrides ``loss_terms``; methods that need more (a frozen reference, a parameter subset, a
gradient mask) override the small hooks ``setup``, ``trainable_parameters``, ``after_backward`` and
``after_step``, never the loop itself, as open-unlearning's trainers override only ``compute_loss``.

Also here, because every gradient method needs them: the loop's params (``LoopSpec``), indexed
batches, the answer NLL (HF's ``labels=`` loss), and context managers that restrict gradients to a
parameter subset or score a model without them. Each method's own loss lives in its file (``npo.py``,
``rmu.py``, ...); the peak-memory stat is ``profiling.ResourceMeter``'s.

Deviation from open-unlearning: it trains a fixed number of epochs over the forget set with the
HF Trainer (paged AdamW, bf16, warmup); here a fixed number of steps with plain AdamW and linear
warmup, so a smoke run and a full run differ only in params.yaml numbers.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from codeunlearn.lm.generation import pad_token_id
from codeunlearn.lm.prompting import EncodedQA, pad_batch
from codeunlearn.lm.training import encode_records, linear_warmup, seed_everything, to_device
from codeunlearn.methods.base import MethodParams, UnlearningMethod, UnlearnJob, UnlearnResult, working_copy
from codeunlearn.profiling import ResourceMeter

LOOP_KEYS = ("steps", "batch_size", "lr", "weight_decay", "warmup_steps", "grad_clip", "max_length", "seed", "progress")


@dataclass(frozen=True)
class LoopSpec:
    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    grad_clip: float  # 0 disables clipping
    max_length: int
    seed: int
    progress: bool

    @classmethod
    def from_params(cls, params: MethodParams) -> LoopSpec:
        return cls(
            steps=params.int("steps"),
            batch_size=params.int("batch_size"),
            lr=params.float("lr"),
            weight_decay=params.float("weight_decay"),
            warmup_steps=params.int("warmup_steps"),
            grad_clip=params.float("grad_clip"),
            max_length=params.int("max_length"),
            seed=params.int("seed"),
            progress=params.bool("progress"),
        )


# ------------------------------------------------------------------------------------------ models


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def requires_grad_only(model: nn.Module, trainable: Sequence[nn.Parameter]) -> Iterator[None]:
    """Gradients for ``trainable`` only (no wasted backward work); the flags come back afterwards."""
    before = [(p, p.requires_grad) for p in model.parameters()]
    chosen = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    try:
        yield
    finally:
        for p, flag in before:
            p.requires_grad_(flag)


@contextmanager
def eval_no_grad(model: nn.Module) -> Iterator[nn.Module]:
    # no_grad rather than inference_mode: the outputs become constants inside a later autograd
    # graph, which inference tensors are not allowed to be.
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------------------ batches


@dataclass(frozen=True)
class Batch:
    indices: list[int]  # rows of the encoded split, so per-example constants can be looked up
    tensors: dict[str, torch.Tensor]


def indexed_batches(
    encoded: Sequence[EncodedQA], batch_size: int, pad_token_id: int, generator: torch.Generator, device: torch.device
) -> Iterator[Batch]:
    """Shuffled epochs from a seeded generator (as ``training.batches_forever``), with row indices."""
    while True:
        order = torch.randperm(len(encoded), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            yield Batch(rows, to_device(pad_batch([encoded[i] for i in rows], pad_token_id), device))


def fixed_batches(
    encoded: Sequence[EncodedQA], batch_size: int, pad_token_id: int, device: torch.device
) -> Iterator[Batch]:
    """One ordered pass, for precomputing per-example constants."""
    for start in range(0, len(encoded), batch_size):
        rows = list(range(start, min(start + batch_size, len(encoded))))
        yield Batch(rows, to_device(pad_batch([encoded[i] for i in rows], pad_token_id), device))


# ------------------------------------------------------------------------------------------- losses


def answer_nll(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over every answer token of the batch (HF's ``labels=`` loss; open-unlearning's NLL)."""
    t = batch.tensors
    return model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], labels=t["labels"]).loss


# ---------------------------------------------------------------------------------------- the loop


@dataclass
class UnlearnContext:
    """What a method's hooks see: the working model, encoded splits, params and its own state."""

    model: nn.Module
    tokenizer: Any
    params: MethodParams
    spec: LoopSpec
    device: torch.device
    forget: list[EncodedQA]
    retain: list[EncodedQA]
    pad: int
    state: dict[str, Any] = field(default_factory=dict)  # method-specific: reference NLLs, masks, vectors
    stats: dict[str, float | int | str] = field(default_factory=dict)  # method-specific extra stats
    artifacts: dict[str, Any] = field(default_factory=dict)


class GradientUnlearning(UnlearningMethod):
    """Base of every gradient method: subclasses set ``name`` and ``method_keys`` and override ``loss_terms``."""

    method_keys: tuple[str, ...] = ()

    # -- hooks a subclass may override --------------------------------------------------------

    def uses_retain(self, ctx: UnlearnContext) -> bool:
        """Whether the loop should draw a retain batch each step."""
        return True

    def setup(self, ctx: UnlearnContext) -> None:
        """Before the first step, on the working model (precompute constants, masks, noise)."""

    def trainable_parameters(self, ctx: UnlearnContext) -> list[nn.Parameter]:
        return [p for p in ctx.model.parameters() if p.requires_grad]

    def after_backward(self, ctx: UnlearnContext) -> None:
        """Between backward and the optimizer step (e.g. masking gradients)."""

    def after_step(self, ctx: UnlearnContext) -> None:
        """After the optimizer step (e.g. undoing weight decay outside a mask)."""

    @abstractmethod
    def loss_terms(self, ctx: UnlearnContext, forget: Batch, retain: Batch | None) -> dict[str, torch.Tensor]:
        """Named terms, each already weighted; the loss is their sum."""

    # -- the shared driver --------------------------------------------------------------------

    def run(self, job: UnlearnJob) -> UnlearnResult:
        p, forget, model, tokenizer = job.params, job.forget, job.model, job.tokenizer
        p.require(LOOP_KEYS + self.method_keys)
        spec = LoopSpec.from_params(p)
        if not forget:
            raise ValueError(f"{self.name}: the forget set is empty")
        device = model_device(model)
        with ResourceMeter() as memory:
            started = time.perf_counter()
            seed_everything(spec.seed)
            working = working_copy(model, p)
            ctx = UnlearnContext(
                model=working,
                tokenizer=tokenizer,
                params=p,
                spec=spec,
                device=device,
                forget=encode_records(tokenizer, forget, spec.max_length),
                retain=encode_records(tokenizer, job.retain, spec.max_length),
                pad=pad_token_id(tokenizer),
            )
            if self.uses_retain(ctx) and not ctx.retain:
                raise ValueError(f"{self.name}: needs retain records and got none")
            self.setup(ctx)
            trainable = self.trainable_parameters(ctx)
            with requires_grad_only(working, trainable):
                final = self._train(ctx, trainable)
            elapsed = time.perf_counter() - started
        stats: dict[str, float | int | str] = {
            "unlearn_s": elapsed,
            "steps": spec.steps,
            "trainable_params": sum(t.numel() for t in trainable),
            **{f"final_{name}": value for name, value in final.items()},
            **memory.memory_stats,
            **ctx.stats,
        }
        return UnlearnResult(model=working, stats=stats, artifacts=ctx.artifacts)

    def _train(self, ctx: UnlearnContext, trainable: list[nn.Parameter]) -> dict[str, float]:
        spec = ctx.spec
        optimizer = torch.optim.AdamW(trainable, lr=spec.lr, weight_decay=spec.weight_decay)
        scheduler = linear_warmup(optimizer, spec.warmup_steps)
        # Separate generators: the forget order must not depend on how many retain records exist.
        forget_stream = indexed_batches(
            ctx.forget, spec.batch_size, ctx.pad, torch.Generator().manual_seed(spec.seed), ctx.device
        )
        retain_stream = None
        if self.uses_retain(ctx):
            retain_generator = torch.Generator().manual_seed(spec.seed + 1)
            retain_stream = indexed_batches(ctx.retain, spec.batch_size, ctx.pad, retain_generator, ctx.device)
        final: dict[str, float] = {}
        ctx.model.train()
        bar = tqdm(range(spec.steps), desc=self.name, disable=not spec.progress, leave=False)
        for step in bar:
            terms = self.loss_terms(ctx, next(forget_stream), next(retain_stream) if retain_stream else None)
            loss = sum(terms.values(), torch.zeros((), device=ctx.device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{self.name}: loss became {loss.item()} at step {step}; lower lr or steps")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.after_backward(ctx)
            if spec.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, spec.grad_clip)
            optimizer.step()
            scheduler.step()
            self.after_step(ctx)
            final = {"loss": loss.item(), **{name: term.item() for name, term in terms.items()}}
            bar.set_postfix(loss=f"{final['loss']:.3f}")
        ctx.model.eval()
        return final
