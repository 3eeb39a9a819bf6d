"""ZeroUnlearn steps 2-4 (see ``method``): one layer's weight edit, from its keys, values and the retain keys.

The closed-form variant solves for a multiplicative D (W <- D.W); the gradient variant trains an
additive update confined to the retain keys' near-null space.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from codeunlearn.lm.blocks import decoder_layers
from codeunlearn.lm.prompting import EncodedQA, pad_batch
from codeunlearn.methods.base import MethodParams
from codeunlearn.methods.trainer import eval_no_grad, fixed_batches, model_device
from codeunlearn.methods.zerounlearn.targets import Prompts, forward_logits, index_chunks, residual_edit


def edit_module(model: nn.Module, layer: int, module_name: str) -> nn.Linear:
    module = decoder_layers(model)[layer].get_submodule(module_name)
    if not isinstance(module, nn.Linear):
        raise ValueError(f"zerounlearn: layers.{layer}.{module_name} is {type(module).__name__}, not nn.Linear")
    return module


@contextmanager
def capture_inputs(module: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    store: dict[str, torch.Tensor] = {}

    def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        store["input"] = inputs[0]

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def keys_and_residual(
    model: nn.Module, module: nn.Module, z_layer: int, prompts: Prompts, batch_size: int, pad: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """K (d_in, n): module inputs at the key positions; Z (d_model, n): residual after ``z_layer`` there."""
    device = model_device(model)
    keys, residual = [], []
    block = decoder_layers(model)[z_layer]
    with eval_no_grad(model):
        for rows in index_chunks(len(prompts.encoded), batch_size):
            batch = {k: v.to(device) for k, v in pad_batch([prompts.encoded[i] for i in rows], pad).items()}
            local, positions = list(range(len(rows))), [prompts.key_index[i] for i in rows]
            with capture_inputs(module) as k_store, residual_edit(block, local, positions, None) as z_store:
                forward_logits(model, batch)
            keys.append(k_store["input"][local, positions].double())
            residual.append(z_store["at_keys"].double())
    return torch.cat(keys).T, torch.cat(residual).T


def retain_key_covariance(
    model: nn.Module, module: nn.Module, retain: Sequence[EncodedQA], batch_size: int, pad: int
) -> torch.Tensor:
    """C_r = mean over every non-pad retain token of k·kᵀ (d_in × d_in, float64)."""
    device = model_device(model)
    total, count = None, 0
    with eval_no_grad(model):
        for batch in fixed_batches(retain, batch_size, pad, device):
            with capture_inputs(module) as store:
                forward_logits(model, batch.tensors)
            keys = store["input"][batch.tensors["attention_mask"].bool()].double()
            total = keys.T @ keys if total is None else total + keys.T @ keys
            count += keys.shape[0]
    if total is None:
        raise ValueError("zerounlearn: needs retain records for the retain-key covariance")
    return total / count


def sensitive_basis(values: torch.Tensor, rank: int) -> torch.Tensor:
    """Orthonormal basis (d_out × r) of the top-``rank`` directions of the original values W·K."""
    u, _, _ = torch.linalg.svd(values, full_matrices=False)
    return u[:, : max(1, min(rank, u.shape[1]))]


def projection(basis: torch.Tensor, delta: float) -> torch.Tensor:
    """P = (1+δ)·I − V·Vᵀ: removes the sensitive directions, scales the rest by 1+δ (reference eps)."""
    return (1 + delta) * torch.eye(basis.shape[0], dtype=basis.dtype, device=basis.device) - basis @ basis.T


def closed_form_weight(
    w: torch.Tensor,
    keys: torch.Tensor,
    targets: torch.Tensor,
    retain_cov: torch.Tensor,
    p_matrix: torch.Tensor,
    p: MethodParams,
) -> torch.Tensor:
    """D·W with D = P(VKᵀ + ρW)Wᵀ[W(KKᵀ + ρI)Wᵀ]⁻¹ (all float64)."""
    lam_r, lam_f, rho = p.float("retain_weight"), p.float("forget_weight"), p.float("regularization")
    kkt = lam_r * retain_cov + lam_f * keys @ keys.T
    vkt = lam_r * w @ retain_cov + lam_f * targets @ keys.T
    a = p_matrix @ (vkt + rho * w) @ w.T
    b = w @ (kkt + rho * torch.eye(kkt.shape[0], dtype=kkt.dtype, device=kkt.device)) @ w.T
    d = torch.linalg.solve(b.T, a.T).T  # D·B = A
    return d @ w


def null_projector(retain_cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """Projector onto the eigenvectors of C_r whose eigenvalue is ≤ threshold·(largest eigenvalue)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(retain_cov)
    near_null = eigenvectors[:, eigenvalues <= threshold * eigenvalues.max()]
    return near_null @ near_null.T


def gradient_weight(
    w: torch.Tensor,
    keys: torch.Tensor,
    targets: torch.Tensor,
    retain_cov: torch.Tensor,
    basis: torch.Tensor,
    p: MethodParams,
) -> tuple[torch.Tensor, float, int]:
    """W + D̂·P_null after ``steps`` Adam steps; also the final loss and the null-space dimension."""
    p_null = null_projector(retain_cov, p.float("null_threshold"))
    d_hat = torch.zeros_like(w, requires_grad=True)
    optimizer = torch.optim.Adam([d_hat], lr=p.float("lr"))
    weights = p.float("sensitive_weight"), p.float("value_weight"), p.float("update_weight")
    loss = torch.zeros((), dtype=w.dtype)
    for _ in range(p.int("steps")):
        update = d_hat @ p_null
        out = (w + update) @ keys
        loss = (
            weights[0] * (basis.T @ out).pow(2).sum()
            + weights[1] * (out - targets).pow(2).sum()
            + weights[2] * update.pow(2).sum()
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    rank = int(torch.linalg.matrix_rank(p_null).item()) if p_null.numel() else 0
    return (w + d_hat.detach() @ p_null), float(loss.detach()), rank


@dataclass(frozen=True)
class LayerData:
    """What one layer's edit needs, read off the model as edited so far (all float64)."""

    module: nn.Linear
    w: torch.Tensor  # (d_out, d_in)
    keys: torch.Tensor  # K: (d_in, n) at the forget key positions
    values: torch.Tensor  # W·K: (d_out, n), the original (sensitive) values
    z_now: torch.Tensor  # residual after the last edited block at the key positions: (d_model, n)
    basis: torch.Tensor  # V: (d_out, r), top directions of W·K
    retain_cov: torch.Tensor  # C_r: (d_in, d_in)

    @classmethod
    def collect(
        cls,
        model: nn.Module,
        module: nn.Linear,
        z_layer: int,
        prompts: Prompts,
        retain: Sequence[EncodedQA],
        p: MethodParams,
        pad: int,
    ) -> LayerData:
        size = p.int("batch_size")
        keys, z_now = keys_and_residual(model, module, z_layer, prompts, size, pad)
        w = module.weight.detach().double()
        values = w @ keys
        return cls(
            module=module,
            w=w,
            keys=keys,
            values=values,
            z_now=z_now,
            basis=sensitive_basis(values, p.int("rank")),
            retain_cov=retain_key_covariance(model, module, retain, size, pad),
        )


def edit_weight(
    data: LayerData, targets: torch.Tensor, p: MethodParams, variant: str
) -> tuple[torch.Tensor, dict[str, float | int]]:
    """The layer's new weight, and stats of the edit."""
    stats: dict[str, float | int] = {"sensitive_rank": int(data.basis.shape[1])}
    if variant == "closed_form":
        p_matrix = projection(data.basis, p.float("delta"))
        return closed_form_weight(data.w, data.keys, targets, data.retain_cov, p_matrix, p), stats
    new_w, final_loss, null_dim = gradient_weight(data.w, data.keys, targets, data.retain_cov, data.basis, p)
    return new_w, stats | {"final_loss": final_loss, "null_space_dim": null_dim}
