"""Representation Misdirection for Unlearning (RMU, Li et al. 2024), as open-unlearning/WMDP code it.

L = mean_forget[(1/L_f)·Σ_t mse(h_ℓ(t), c·u)] + α·mean_retain[(1/L_r)·Σ_t mse(h_ℓ(t), h_ℓ^frozen(t))]

* h_ℓ: the residual stream after decoder block ``layer`` (a forward hook on ``decoder_layers``);
  ``mse`` averages over hidden dims, so c and α are on that scale, as in the reference code.
* u: entries uniform in [0, 1), normalised to unit length, drawn from ``seed`` (fixed for the run).
* tokens: the answer tokens (labels != IGNORE_INDEX), as open-unlearning's RMU masks them.
* updated: only parameters of blocks ``update_layers`` whose in-block name fully matches
  ``param_regex`` (the WMDP recipe: ``mlp.down_proj.weight`` of layers ℓ−2..ℓ).

Both forward passes stop at block ℓ: nothing above it changes the loss. The frozen model is a copy
taken before the first step (open-unlearning's ``ref_model``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from codeunlearn.lm.blocks import block_output, parameters_matching
from codeunlearn.lm.prompting import IGNORE_INDEX
from codeunlearn.lm.training import frozen_copy
from codeunlearn.methods.base import register_method
from codeunlearn.methods.trainer import Batch, GradientUnlearning, UnlearnContext, eval_no_grad


def masked_activation_mse(acts: torch.Tensor, target: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Per-token MSE over hidden dims, averaged over each sequence's answer tokens, then over the batch."""
    mask = (batch.tensors["labels"] != IGNORE_INDEX).to(acts.dtype)
    per_token = F.mse_loss(acts, target.expand_as(acts), reduction="none").mean(dim=2)
    return ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)).mean()


def control_vector(dim: int, coeff: float, seed: int, device: torch.device) -> torch.Tensor:
    u = torch.rand(dim, generator=torch.Generator().manual_seed(seed))
    return (coeff * u / u.norm()).to(device)


@register_method
class RMU(GradientUnlearning):
    name = "rmu"
    method_keys = ("layer", "update_layers", "param_regex", "steering_coeff", "alpha")

    def uses_retain(self, ctx: UnlearnContext) -> bool:
        return ctx.params.float("alpha") > 0

    def setup(self, ctx: UnlearnContext) -> None:
        if self.uses_retain(ctx):
            ctx.state["reference"] = frozen_copy(ctx.model)

    def trainable_parameters(self, ctx: UnlearnContext) -> list[nn.Parameter]:
        chosen = parameters_matching(ctx.model, ctx.params.int_list("update_layers"), ctx.params.str("param_regex"))
        ctx.stats["updated_tensors"] = ",".join(name for name, _ in chosen)
        return [param for _, param in chosen]

    def _control(self, ctx: UnlearnContext, dim: int) -> torch.Tensor:
        # Drawn on first use because the hidden size is read off the activations, not the config.
        if "control" not in ctx.state:
            p = ctx.params
            ctx.state["control"] = control_vector(dim, p.float("steering_coeff"), p.int("seed"), ctx.device)
            ctx.artifacts["control_vector"] = ctx.state["control"].detach().cpu()
        return ctx.state["control"]

    def loss_terms(self, ctx: UnlearnContext, forget: Batch, retain: Batch | None) -> dict[str, torch.Tensor]:
        layer = ctx.params.int("layer")
        acts = block_output(ctx.model, layer, forget.tensors)
        terms = {"forget_loss": masked_activation_mse(acts, self._control(ctx, acts.shape[-1]), forget)}
        if retain is not None:
            current = block_output(ctx.model, layer, retain.tensors)
            with eval_no_grad(ctx.state["reference"]) as reference:
                frozen = block_output(reference, layer, retain.tensors)
            terms["retain_loss"] = ctx.params.float("alpha") * masked_activation_mse(current, frozen, retain)
        return terms
