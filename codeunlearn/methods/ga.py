"""Gradient Ascent (GA): maximise the forget answers' NLL, nothing else (open-unlearning's GradAscent).

Unbounded by design: run long enough it destroys the model. The retain split is not used.
"""

from __future__ import annotations

import torch

from codeunlearn.methods.base import register_method
from codeunlearn.methods.trainer import Batch, GradientUnlearning, UnlearnContext, answer_nll


@register_method
class GradientAscent(GradientUnlearning):
    name = "ga"

    def uses_retain(self, ctx: UnlearnContext) -> bool:
        return False

    def loss_terms(self, ctx: UnlearnContext, forget: Batch, retain: Batch | None) -> dict[str, torch.Tensor]:
        return {"forget_loss": -answer_nll(ctx.model, forget)}
