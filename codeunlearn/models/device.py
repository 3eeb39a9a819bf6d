"""Which torch device a run uses."""

from __future__ import annotations

import torch


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present, else CPU; anything else must be a torch device string."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from exc
