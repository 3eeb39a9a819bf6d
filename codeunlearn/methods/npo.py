"""Negative Preference Optimization (Zhang et al. 2024), as open-unlearning implements it.

L = −(2/β)·E_forget[log σ(−β·(log πθ(y|x) − log πref(y|x)))] + retain_weight·NLL(retain),
with log π(y|x) the *summed* log-likelihood of the answer tokens and πref the model before
unlearning. retain_weight 0 gives plain NPO; > 0 gives NPO_GDR / NPO-RT.

Deviation (numerically equivalent): open-unlearning runs a frozen reference model on every forget
batch; here the reference log-likelihoods are computed once per forget example before the first
step (the reference is frozen and the forget set fixed), which saves a model copy and a forward
pass per step. They differ only by float rounding from padding to another batch width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from codeunlearn.lm.prompting import IGNORE_INDEX, EncodedQA
from codeunlearn.methods.base import register_method
from codeunlearn.methods.graddiff import retain_term
from codeunlearn.methods.trainer import (
    Batch,
    GradientUnlearning,
    UnlearnContext,
    eval_no_grad,
    fixed_batches,
    model_device,
)


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


REFERENCE_NLL = "reference_nll"


def prepare_reference(ctx: UnlearnContext) -> None:
    """Store the forget examples' sequence NLL under the model as it is now (call before any change)."""
    ctx.state[REFERENCE_NLL] = reference_sequence_nll(ctx.model, ctx.forget, ctx.spec.batch_size, ctx.pad)


def npo_forget_term(ctx: UnlearnContext, forget: Batch, beta: float) -> torch.Tensor:
    reference = ctx.state[REFERENCE_NLL][forget.indices]
    return npo_loss(sequence_nll(ctx.model, forget), reference, beta)


@register_method
class NPO(GradientUnlearning):
    name = "npo"
    method_keys = ("beta", "retain_weight")

    def uses_retain(self, ctx: UnlearnContext) -> bool:
        return ctx.params.float("retain_weight") > 0

    def setup(self, ctx: UnlearnContext) -> None:
        prepare_reference(ctx)

    def loss_terms(self, ctx: UnlearnContext, forget: Batch, retain: Batch | None) -> dict[str, torch.Tensor]:
        terms = {"forget_loss": npo_forget_term(ctx, forget, ctx.params.float("beta"))}
        return terms | retain_term(ctx, retain, ctx.params.float("retain_weight"))
