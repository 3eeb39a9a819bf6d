"""Stage checkpoints on disk: a Hugging Face model directory (safetensors), optionally with its codebook.

Written atomically (a temporary sibling directory renamed into place), so a run killed mid-write
never leaves a checkpoint that a resumed run would trust.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from codeunlearn.io import atomic_dir
from codeunlearn.methods.codeunlearn.codebook import (
    CODEBOOK_SPEC,
    CodebookBottleneck,
    attach_codebook,
    load_codebook,
    save_codebook,
)
from codeunlearn.models.load import Checkpoint, load_model_dir


def save_checkpoint(
    model: nn.Module, tokenizer: Any, out_dir: Path, bottleneck: CodebookBottleneck | None = None
) -> None:
    with atomic_dir(out_dir, if_exists="replace") as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if bottleneck is not None:
            save_codebook(bottleneck, staging)


def load_checkpoint(directory: Path, device: str | torch.device = "cpu", num_layers: int | None = None) -> Checkpoint:
    """Load a checkpoint (its first ``num_layers`` decoder blocks only, when given: ``load_model_dir``); a
    codebook saved beside the weights is attached again by forward hook."""
    checkpoint = load_model_dir(directory, device, num_layers)
    if (directory / CODEBOOK_SPEC).exists():
        checkpoint.bottleneck = load_codebook(directory).to(device)
        checkpoint.bottleneck.eval()
        attach_codebook(checkpoint.model, checkpoint.bottleneck)
    return checkpoint


def model_sha256(model: torch.nn.Module) -> str:
    """sha256 over the state dict: names sorted, each with dtype, shape and raw bytes.

    Independent of device and of parameter registration order, so the same weights hash the same after
    a save/load round trip; any changed value, dtype or shape changes it.
    """
    digest = hashlib.sha256()
    state = model.state_dict()
    with torch.no_grad():
        for name in sorted(state):
            tensor = state[name].detach().to("cpu").contiguous()
            # The header makes the byte stream unambiguous (no two state dicts share a concatenation).
            nbytes = tensor.numel() * tensor.element_size()
            header = f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0{nbytes}\n"
            digest.update(header.encode())
            # uint8 view: numpy has no bfloat16, and the raw bytes are what we want anyway.
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
