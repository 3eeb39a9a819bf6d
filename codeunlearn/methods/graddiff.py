"""Gradient Difference: −NLL(forget) + retain_weight·NLL(retain) (open-unlearning's GradDiff, NLL retain term)."""

from __future__ import annotations

import torch

from codeunlearn.methods.base import register_method
from codeunlearn.methods.trainer import Batch, GradientUnlearning, UnlearnContext, answer_nll


def retain_term(ctx: UnlearnContext, retain: Batch | None, weight: float) -> dict[str, torch.Tensor]:
    """weight·NLL(retain answers), or no term at all when the weight is 0 (saves the forward pass)."""
    if retain is None or weight == 0:
        return {}
    return {"retain_loss": weight * answer_nll(ctx.model, retain)}


@register_method
class GradDiff(GradientUnlearning):
    name = "graddiff"
    method_keys = ("retain_weight",)

    def loss_terms(self, ctx: UnlearnContext, forget: Batch, retain: Batch | None) -> dict[str, torch.Tensor]:
        terms = {"forget_loss": -answer_nll(ctx.model, forget)}
        return terms | retain_term(ctx, retain, ctx.params.float("retain_weight"))
