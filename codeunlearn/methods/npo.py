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

import torch

from codeunlearn.methods.base import register_method
from codeunlearn.methods.graddiff import retain_term
from codeunlearn.methods.gradient import (
    Batch,
    GradientUnlearning,
    UnlearnContext,
    npo_loss,
    reference_sequence_nll,
    sequence_nll,
)

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
