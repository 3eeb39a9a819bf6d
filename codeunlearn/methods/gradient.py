"""One gradient-unlearning loop shared by GA, GradDiff, NPO, RMU and GRIN (open-unlearning's shape).

Every step draws one forget batch and (when the method uses it) one retain batch, asks the method
for its loss terms, sums them and takes an AdamW step. A method subclasses ``GradientUnlearning``
and overrides ``loss_terms``; methods that need more (a frozen reference, a parameter subset, a
gradient mask) override the small hooks ``setup``, ``trainable_parameters``, ``after_backward`` and
``after_step``, never the loop itself, as open-unlearning's trainers override only ``compute_loss``.

Also here, because every method file needs them: ``MethodParams`` (params access whose KeyError
names the method and the key: no default hides in code), ``PeakMemory`` (the ``peak_mem_mb`` stat),
``working_copy`` (the caller's model is never mutated unless ``in_place: true``), the answer and
sequence NLLs, and a forward hook that captures (and can stop at) one decoder block's output.

Deviation from open-unlearning: it trains a fixed number of epochs over the forget set with the
HF Trainer (paged AdamW, bf16, warmup); here a fixed number of steps with plain AdamW and linear
warmup, so a smoke run and a full run differ only in params.yaml numbers.
"""

from __future__ import annotations

import copy
import resource
import sys
import time
from abc import abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from codeunlearn.lm.prompting import IGNORE_INDEX, EncodedQA, pad_batch
from codeunlearn.lm.training import encode_records, linear_warmup, seed_everything, to_device
from codeunlearn.methods.base import UnlearningMethod, UnlearnResult

_MB = 1024 * 1024

# ------------------------------------------------------------------------------------------ params


class MethodParams:
    """Read-only view of a method's params block; a missing key names the method and the key."""

    def __init__(self, method: str, params: Mapping[str, Any]):
        self.method = method
        self._params = params

    def __getitem__(self, key: str) -> Any:
        if key not in self._params:
            raise KeyError(
                f"unlearning method {self.method!r}: params has no {key!r} "
                f"(set it under methods.{self.method} in params.yaml)"
            )
        return self._params[key]

    def __contains__(self, key: str) -> bool:
        return key in self._params

    def require(self, keys: Sequence[str]) -> None:
        """Fail before any work when a key is missing, not halfway through a run."""
        for key in keys:
            self[key]

    def int(self, key: str) -> int:
        return int(self[key])

    def float(self, key: str) -> float:
        return float(self[key])

    def bool(self, key: str) -> bool:
        value = self[key]
        if not isinstance(value, bool):
            raise ValueError(f"unlearning method {self.method!r}: params {key!r} must be true or false, got {value!r}")
        return value

    def str(self, key: str) -> str:
        return str(self[key])

    def choice(self, key: str, options: Sequence[str]) -> str:
        value = self.str(key)
        if value not in options:
            raise ValueError(
                f"unlearning method {self.method!r}: params {key!r} = {value!r}; expected one of {', '.join(options)}"
            )
        return value

    def int_list(self, key: str) -> list[int]:
        value = self[key]
        return [int(v) for v in (value if isinstance(value, list | tuple) else [value])]

    def in_place(self) -> bool:
        # The one optional key: base.UnlearningMethod defines "not in place" as the contract.
        return bool(self._params.get("in_place", False))


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


# ------------------------------------------------------------------------------------ memory, copies


def _max_rss_mb() -> float:
    # ru_maxrss is kilobytes on Linux and bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / _MB if sys.platform == "darwin" else rss / 1024


class PeakMemory:
    """Peak memory of a block, in MB, as ``peak_mem_mb``.

    CUDA: ``torch.cuda.max_memory_allocated`` over the block (peak stats reset on entry), i.e. the
    absolute peak of tensor memory including the weights already resident. CPU: growth of the
    process's resident high-water mark (``ru_maxrss``) during the block. That growth is a lower
    bound: if the process peaked higher earlier (e.g. while fine-tuning the target), a method that
    stays below that mark reads 0. ``max_rss_mb`` (the absolute mark) is reported beside it.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.stats: dict[str, float] = {}

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._rss_before = _max_rss_mb()
        return self

    def __exit__(self, *exc: object) -> None:
        max_rss = _max_rss_mb()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / _MB
        else:
            peak = max_rss - self._rss_before
        self.stats = {"peak_mem_mb": float(peak), "max_rss_mb": float(max_rss)}


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def working_copy(model: nn.Module, params: MethodParams) -> nn.Module:
    """The model the method may edit: a deep copy unless the caller opted into ``in_place``."""
    return model if params.in_place() else copy.deepcopy(model)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A detached, eval-mode copy that no optimizer can touch (NPO/RMU's reference model)."""
    reference = copy.deepcopy(model)
    reference.eval()
    reference.requires_grad_(False)
    return reference


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


def pad_id(tokenizer: Any) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad batches with")


# ------------------------------------------------------------------------------------------- losses


def answer_nll(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over every answer token of the batch (HF's ``labels=`` loss; open-unlearning's NLL)."""
    t = batch.tensors
    return model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], labels=t["labels"]).loss


def sequence_nll(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Summed answer-token NLL per sequence, shape (batch,): −log π(y|x) as NPO uses it."""
    t = batch.tensors
    logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits[:, :-1].float()
    labels = t["labels"][:, 1:]
    token_nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    return token_nll.sum(dim=1)


def reference_sequence_nll(model: nn.Module, encoded: Sequence[EncodedQA], batch_size: int, pad: int) -> torch.Tensor:
    """Sequence NLL of every example under the model as it is now (before any update).

    The NPO reference model is frozen and the forget set is fixed, so its log-likelihoods are
    constants: computing them once replaces a frozen model copy and a forward pass per step.
    """
    device = model_device(model)
    out = torch.empty(len(encoded), device=device)
    with eval_no_grad(model):
        for batch in fixed_batches(encoded, batch_size, pad, device):
            out[batch.indices] = sequence_nll(model, batch)
    return out


def npo_loss(current_nll: torch.Tensor, reference_nll: torch.Tensor, beta: float) -> torch.Tensor:
    """−(2/β)·mean log σ(−β·(log πθ − log πref)), with log π = −(summed answer NLL)."""
    log_ratio = reference_nll - current_nll  # log πθ(y|x) − log πref(y|x)
    return -(2.0 / beta) * F.logsigmoid(-beta * log_ratio).mean()


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

    def unlearn(
        self,
        model: nn.Module,
        tokenizer: Any,
        forget: Sequence[Any],
        retain: Sequence[Any],
        params: Mapping[str, Any],
    ) -> UnlearnResult:
        p = MethodParams(self.name, params)
        p.require(LOOP_KEYS + self.method_keys)
        spec = LoopSpec.from_params(p)
        if not forget:
            raise ValueError(f"{self.name}: the forget set is empty")
        device = model_device(model)
        with PeakMemory(device) as memory:
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
                retain=encode_records(tokenizer, retain, spec.max_length),
                pad=pad_id(tokenizer),
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
            **memory.stats,
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
