"""Train a codebook into a model once: the amortised cost that makes every request zero-shot.

Two modes (``CodebookSpec.mode``):

* ``residual``: the model is frozen; the codebook is fit to the target's own activations after block
  L on broad text (reconstruction + L1, dead-code revival), cached once. No model weight changes.
* ``bottleneck`` (the paper's): the codes replace the stream and the blocks above are trained with them
  on the TOFU answers (cross-entropy) plus a KL term to the frozen target's next-token distribution on
  broad text, so the blocks above keep the target's general behaviour.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from codeunlearn.lm.blocks import StopForward, capture_block_output, decoder_layers
from codeunlearn.lm.prompting import IGNORE_INDEX, EncodedQA, pad_batch
from codeunlearn.lm.training import (
    TrainSpec,
    batches_forever,
    encode_records,
    frozen_copy,
    seed_everything,
    to_device,
    train_answers,
)
from codeunlearn.methods.codeunlearn.codebook import CodebookBottleneck, CodebookSpec, attach_codebook


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


def collect_activations(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[Any],
    layer: int,
    batch_size: int,
    max_length: int,
    max_batches: int,
) -> torch.Tensor:
    """Residual-stream vectors after block ``layer`` on real tokens (padding dropped) of the first
    ``max_batches`` batches of ``records``: the activations a bottleneck's codes are seeded from."""
    rows = encode_records(tokenizer, records[: batch_size * max_batches], max_length)
    return collect_layer_activations(model, rows, layer, batch_size, tokenizer.pad_token_id, skip_first=False)


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
    general: Sequence[EncodedQA] = (),
    kl_weight: float = 0.0,
) -> tuple[CodebookBottleneck, list[dict[str, float]]]:
    """Attach a bottleneck seeded from real activations and train it jointly with the model.

    With ``freeze_below`` only the blocks above the codebook (and the codebook) train. With
    ``kl_weight`` > 0 every step also draws a batch of ``general`` text and adds the KL from the frozen
    model as it was before the codebook (the target) to the trained one: the blocks above keep the
    target's next-token distribution on text the fine-tune never showed them.
    Returns the bottleneck (left attached) and the training history, whose rows carry the live-code
    count and the number of revived codes, the two numbers that reveal code collapse.
    """
    if kl_weight > 0 and not general:
        raise ValueError("codebook.kl_weight > 0 needs broad text (codebook.corpus) to compute the KL on")
    teacher = frozen_copy(model) if kl_weight > 0 else None
    kl_term = (
        kl_to_teacher(teacher, general, train_spec.batch_size, tokenizer.pad_token_id, train_spec.seed)
        if teacher is not None
        else None
    )
    generator = seed_everything(train_spec.seed)
    activations = collect_activations(
        model, tokenizer, records, codebook_spec.layer, train_spec.batch_size, train_spec.max_length, init_batches
    )
    device = next(model.parameters()).device
    bottleneck = CodebookBottleneck(hidden_size(model), codebook_spec).to(device)
    bottleneck.init_from_activations(activations.to(device), generator)
    attach_codebook(model, bottleneck)

    def codebook_terms(trained: nn.Module, _batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Read the answer batch's terms before the KL's forward pass overwrites them.
        terms = {
            "reconstruction": loss.reconstruction_weight * bottleneck.reconstruction_loss,
            "code_l1": loss.l1_weight * bottleneck.code_l1,
        }
        if kl_term is not None:
            terms["kl"] = kl_weight * kl_term(trained)
        return terms

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
    del teacher
    return bottleneck, history


# ------------------------------------------------------------------------------ broad text


def text_chunks(tokenizer: Any, texts: Sequence[str], chunk_tokens: int, chunks_per_text: int) -> list[EncodedQA]:
    """Plain text as training rows: each text's first ``chunks_per_text`` windows of ``chunk_tokens`` tokens
    (BOS first where the tokenizer has one, as the model saw text in pre-training). No answer labels:
    these rows feed activations and the KL term, never the answer cross-entropy."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    width = chunk_tokens - len(bos)
    rows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, min(len(ids), width * chunks_per_text), width):
            window = [*bos, *ids[start : start + width]]
            if len(window) > len(bos) + 1:
                rows.append(EncodedQA(input_ids=window, labels=[IGNORE_INDEX] * len(window)))
    return rows


@torch.inference_mode()
def collect_layer_activations(
    model: nn.Module,
    rows: Sequence[EncodedQA],
    layer: int,
    batch_size: int,
    pad_token_id: int,
    progress: bool = False,
    skip_first: bool = True,
) -> torch.Tensor:
    """[tokens, dim] float32: block ``layer``'s output on every real token; with ``skip_first`` not on
    each row's first (the attention sink, whose norm is ~100x the median and which no request is about).
    Stops the forward pass at that block."""
    device = next(model.parameters()).device
    captured: list[torch.Tensor] = []
    with capture_block_output(model, layer, stop=True) as store:
        for start in tqdm(range(0, len(rows), batch_size), desc="activations", disable=not progress, leave=False):
            batch = to_device(pad_batch(rows[start : start + batch_size], pad_token_id), device)
            real = batch["attention_mask"].bool()
            if skip_first:
                real[:, 0] = False
            try:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            except StopForward:
                pass
            captured.append(store["hidden"][real].detach().float().cpu())
    return torch.cat(captured) if captured else torch.zeros((0, hidden_size(model)))


# ------------------------------------------------------------------------------ residual mode


@dataclass(frozen=True)
class ResidualFit:
    steps: int
    batch_tokens: int  # activation rows per Adam step
    lr: float
    seed: int
    log_every: int


def train_residual_codebook(
    activations: torch.Tensor,
    codebook_spec: CodebookSpec,
    fit: ResidualFit,
    loss: CodebookLoss,
    revival: Revival,
    progress: bool = True,
) -> tuple[CodebookBottleneck, list[dict[str, float]]]:
    """Fit the codes to frozen activations: each row's top-k codes should sum to it (relative squared
    error, as the bottleneck's reconstruction term) with an L1 on the chosen codes; codes unused for
    ``revival.every`` steps are re-seeded from the latest rows. Returns the bottleneck (not attached)
    and the history, whose rows carry the live-code count and the revived total."""
    if codebook_spec.mode != "residual":
        raise ValueError(f"train_residual_codebook needs codebook.mode 'residual', got {codebook_spec.mode!r}")
    if activations.shape[0] == 0:
        raise ValueError("no activations to fit the codebook to (the training corpus is empty)")
    generator = seed_everything(fit.seed)
    bottleneck = CodebookBottleneck(activations.shape[1], codebook_spec)
    bottleneck.init_from_activations(activations, generator)
    optimizer = torch.optim.Adam(bottleneck.parameters(), lr=fit.lr)
    history: list[dict[str, float]] = []
    revived_total = 0
    live = codebook_spec.num_codes
    bottleneck.train()
    for step in tqdm(range(fit.steps), desc="codebook (residual)", disable=not progress, leave=False):
        rows = activations[torch.randint(0, activations.shape[0], (fit.batch_tokens,), generator=generator)]
        reconstruction, ids = bottleneck.reconstruct(rows)
        squared_norm = rows.pow(2).sum(-1).clamp_min(torch.finfo(rows.dtype).tiny)
        relative_error = ((reconstruction - rows).pow(2).sum(-1) / squared_norm).mean()
        code_l1 = bottleneck.chosen_l1(ids)
        total = loss.reconstruction_weight * relative_error + loss.l1_weight * code_l1
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        bottleneck.usage += torch.bincount(ids.reshape(-1), minlength=codebook_spec.num_codes)
        bottleneck.last_input = rows
        if revival.every and step > 0 and step % revival.every == 0:
            live = bottleneck.live_codes()
            revived_total += bottleneck.revive_dead_codes(generator, revival.noise)
        if step % fit.log_every == 0 or step == fit.steps - 1:
            history.append(
                {
                    "step": step,
                    "loss": total.item(),
                    "reconstruction": relative_error.item(),
                    "code_l1": code_l1.item(),
                    "live_codes": float(live),
                    "revived_total": float(revived_total),
                }
            )
    bottleneck.eval()
    bottleneck.last_input = None
    bottleneck.usage.zero_()
    return bottleneck, history


# ------------------------------------------------------------------------------ bottleneck mode: KL


def next_token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions, averaged over real positions."""
    per_token = F.kl_div(
        F.log_softmax(student_logits.float(), -1),
        F.log_softmax(teacher_logits.float(), -1),
        log_target=True,
        reduction="none",
    ).sum(-1)
    weights = real.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp_min(1.0)


def kl_to_teacher(teacher: nn.Module, rows: Sequence[EncodedQA], batch_size: int, pad_token_id: int, seed: int):
    """An extra-loss term: each call draws the next batch of broad text and returns the student's KL
    to the frozen ``teacher`` (the target before the codebook went in) on it."""
    stream = batches_forever(rows, batch_size, pad_token_id, torch.Generator().manual_seed(seed))

    def term(model: nn.Module) -> torch.Tensor:
        device = next(model.parameters()).device
        batch = to_device(next(stream), device)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        with torch.no_grad():
            teacher_logits = teacher(**inputs).logits
        return next_token_kl(model(**inputs).logits, teacher_logits, batch["attention_mask"].bool())

    return term


# ------------------------------------------------------------------------------ either mode


@dataclass(frozen=True)
class CodebookRecipe:
    """Everything ``fit_codebook`` needs besides the model and the data (``codebook.*`` in params.yaml)."""

    spec: CodebookSpec
    train: TrainSpec  # bottleneck mode: the joint fine-tune (codebook_train); residual: seed, log_every
    loss: CodebookLoss
    revival: Revival
    init_batches: int
    freeze_below: bool
    kl_weight: float  # bottleneck mode
    residual: ResidualFit  # residual mode
    activation_batch_size: int  # rows per forward pass while caching activations (residual mode)


def fit_codebook(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[Any],
    general: Sequence[EncodedQA],
    recipe: CodebookRecipe,
    progress: bool = True,
) -> tuple[CodebookBottleneck, list[dict[str, float]]]:
    """Train the codebook of ``recipe.spec.mode`` into ``model`` and leave it attached.

    ``records`` are the target's training QAs, ``general`` broad text the fine-tune never showed it.
    Residual mode fits the codes to the frozen model's activations on both (no weight changes);
    bottleneck mode trains the blocks above on the QAs' answers plus the KL to the target on ``general``.
    """
    if recipe.spec.mode == "residual":
        rows = [*encode_records(tokenizer, records, recipe.train.max_length), *general]
        activations = collect_layer_activations(
            model, rows, recipe.spec.layer, recipe.activation_batch_size, tokenizer.pad_token_id, progress
        )
        bottleneck, history = train_residual_codebook(
            activations, recipe.spec, recipe.residual, recipe.loss, recipe.revival, progress
        )
        bottleneck.to(next(model.parameters()).device)
        attach_codebook(model, bottleneck)
        return bottleneck, [{**row, "activations": float(activations.shape[0])} for row in history]
    return train_codebook(
        model,
        tokenizer,
        records,
        recipe.spec,
        recipe.train,
        recipe.loss,
        recipe.revival,
        recipe.init_batches,
        progress=progress,
        freeze_below=recipe.freeze_below,
        general=general,
        kl_weight=recipe.kl_weight,
    )
