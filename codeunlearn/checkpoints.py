"""Stage checkpoints on disk: a Hugging Face model directory (safetensors), optionally with its codebook.

Written atomically (a temporary sibling directory renamed into place), so a run killed mid-write
never leaves a checkpoint that a resumed run would trust.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from codeunlearn.codebook import CODEBOOK_SPEC, CodebookBottleneck, attach_codebook, load_codebook, save_codebook


@dataclass
class Checkpoint:
    model: nn.Module
    tokenizer: Any
    bottleneck: CodebookBottleneck | None = None


def save_checkpoint(
    model: nn.Module, tokenizer: Any, out_dir: Path, bottleneck: CodebookBottleneck | None = None
) -> None:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if bottleneck is not None:
            save_codebook(bottleneck, staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def load_checkpoint(directory: Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint; a codebook saved beside the weights is attached again by forward hook."""
    if not (directory / "config.json").exists():
        raise FileNotFoundError(f"{directory}: not a model checkpoint (config.json missing)")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    bottleneck = None
    if (directory / CODEBOOK_SPEC).exists():
        bottleneck = load_codebook(directory).to(device)
        bottleneck.eval()
        attach_codebook(model, bottleneck)
    return Checkpoint(model=model, tokenizer=tokenizer, bottleneck=bottleneck)
