"""GRIN (Anjarlekar & Pombra 2025, arXiv 2508.06467): gradient-ratio influence, noise, masked fine-tune.

1. On the model before unlearning, accumulate per-weight |g_forget| and |g_retain| over
   ``score_batches`` forget and retain batches (answer NLL gradients).
2. Score each eligible weight: GRI = |g_f| / (|g_r| + eps). Eligible: parameters whose full name
   fully matches ``param_regex``.
3. Select the top ``fraction`` of all eligible weights by score (one global top-k, not per tensor).
4. Add Gaussian noise ``noise_std``·std(tensor) to the selected weights.
5. Fine-tune only the selected weights with the NPO or GradDiff loss (``loss: npo|graddiff``):
   gradients outside the mask are zeroed before each step, and entries outside the mask are reset
   after each step so that AdamW's decoupled weight decay cannot move them either.

No code or hyperparameters were published (see eval-anchors §5), so these choices are ours and
documented here: |g| is accumulated per batch (sum of per-batch magnitudes, so a weight that
matters for any one batch scores, instead of gradients cancelling across batches); the noise scale
is relative to each tensor's own std; the NPO reference is the model before noise (the model the
request starts from). The selection mask is returned as an artifact (``mask``: name -> bool tensor).
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from codeunlearn.methods.base import register_method
from codeunlearn.methods.graddiff import retain_term
from codeunlearn.methods.npo import npo_forget_term, prepare_reference
from codeunlearn.methods.trainer import (
    Batch,
    GradientUnlearning,
    UnlearnContext,
    answer_nll,
    indexed_batches,
    requires_grad_only,
)

LOSSES = ("npo", "graddiff")


def eligible_parameters(model: nn.Module, pattern: str) -> list[tuple[str, nn.Parameter]]:
    regex = re.compile(pattern)
    chosen = [(name, p) for name, p in model.named_parameters() if regex.fullmatch(name)]
    if not chosen:
        raise ValueError(f"grin: no parameter name matches param_regex {pattern!r}")
    return chosen


def gradient_magnitudes(model: nn.Module, params: list[nn.Parameter], batches: list[Batch]) -> list[torch.Tensor]:
    """Sum over batches of |∂ NLL / ∂ w| for every weight of ``params``."""
    totals = [torch.zeros_like(p) for p in params]
    was_training = model.training
    model.eval()  # no dropout: the score must not depend on a random mask
    with requires_grad_only(model, params):
        for batch in batches:
            model.zero_grad(set_to_none=True)
            answer_nll(model, batch).backward()
            for total, p in zip(totals, params, strict=True):
                if p.grad is not None:
                    total += p.grad.abs()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return totals


def top_fraction_mask(scores: list[torch.Tensor], fraction: float) -> list[torch.Tensor]:
    """Boolean masks selecting the global top ``fraction`` of all scores (at least one weight)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"grin: fraction must be in (0, 1], got {fraction}")
    flat = torch.cat([s.flatten() for s in scores])
    k = max(1, math.ceil(fraction * flat.numel()))
    selected = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    selected[torch.topk(flat, k, sorted=False).indices] = True
    return [m.view_as(s) for m, s in zip(selected.split([s.numel() for s in scores]), scores, strict=True)]


def add_masked_noise(params: list[nn.Parameter], masks: list[torch.Tensor], scale: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p, mask in zip(params, masks, strict=True):
            # Drawn on the CPU from one generator so the noise is the same on every device.
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.device, p.dtype)
            p.add_(noise * (scale * p.float().std()).to(p.dtype) * mask)


@register_method
class GRIN(GradientUnlearning):
    name = "grin"
    method_keys = ("score_batches", "fraction", "eps", "noise_std", "param_regex", "loss", "beta", "retain_weight")

    def uses_retain(self, ctx: UnlearnContext) -> bool:
        # Retain data are always needed for the scores; a retain batch per step only with a retain term.
        return ctx.params.float("retain_weight") > 0

    def setup(self, ctx: UnlearnContext) -> None:
        p = ctx.params
        if p.choice("loss", LOSSES) == "npo":
            prepare_reference(ctx)  # before noise: the reference is the model the request starts from
        named = eligible_parameters(ctx.model, p.str("param_regex"))
        params = [param for _, param in named]
        masks = top_fraction_mask(self._scores(ctx, params), p.float("fraction"))
        add_masked_noise(params, masks, p.float("noise_std"), p.int("seed") + 3)
        kept = [(name, param, mask) for (name, param), mask in zip(named, masks, strict=True) if mask.any()]
        ctx.state["masked"] = [(param, mask) for _, param, mask in kept]
        if ctx.spec.weight_decay > 0:
            ctx.state["anchors"] = [param.detach().clone() for _, param, _ in kept]
        ctx.artifacts["weight_mask"] = {name: mask.cpu() for name, _, mask in kept}
        selected = int(sum(mask.sum().item() for mask in masks))
        ctx.stats.update(
            eligible_weights=sum(param.numel() for param in params),
            selected_weights=selected,
            trainable_params=selected,  # the loop would count whole tensors; only the masked weights move
            selected_tensors=len(kept),
        )

    def _scores(self, ctx: UnlearnContext, params: list[nn.Parameter]) -> list[torch.Tensor]:
        if not ctx.retain:
            raise ValueError("grin: needs retain records for the gradient-ratio scores")
        n, seed, size = ctx.params.int("score_batches"), ctx.spec.seed, ctx.spec.batch_size
        draw = [
            indexed_batches(records, size, ctx.pad, torch.Generator().manual_seed(seed + offset), ctx.device)
            for offset, records in ((10, ctx.forget), (11, ctx.retain))
        ]
        forget_g = gradient_magnitudes(ctx.model, params, [next(draw[0]) for _ in range(n)])
        retain_g = gradient_magnitudes(ctx.model, params, [next(draw[1]) for _ in range(n)])
        eps = ctx.params.float("eps")
        return [f / (r + eps) for f, r in zip(forget_g, retain_g, strict=True)]

    def trainable_parameters(self, ctx: UnlearnContext) -> list[nn.Parameter]:
        return [param for param, _ in ctx.state["masked"]]

    def after_backward(self, ctx: UnlearnContext) -> None:
        for param, mask in ctx.state["masked"]:
            if param.grad is not None:
                param.grad.mul_(mask)

    def after_step(self, ctx: UnlearnContext) -> None:
        if "anchors" not in ctx.state:
            return
        with torch.no_grad():
            for (param, mask), anchor in zip(ctx.state["masked"], ctx.state["anchors"], strict=True):
                param.copy_(torch.where(mask, param, anchor))

    def loss_terms(self, ctx: UnlearnContext, forget: Batch, retain: Batch | None) -> dict[str, torch.Tensor]:
        p = ctx.params
        if p.str("loss") == "npo":
            forget_loss = npo_forget_term(ctx, forget, p.float("beta"))
        else:
            forget_loss = -answer_nll(ctx.model, forget)
        return {"forget_loss": forget_loss} | retain_term(ctx, retain, p.float("retain_weight"))
