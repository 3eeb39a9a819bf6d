"""The decoder blocks of a Hugging Face causal LM: finding them, and reading one block's output by forward hook.

Every hook in this project (the codebook, activation caching, RMU's and ZeroUnlearn's edits) attaches to
the blocks ``decoder_layers`` finds; transformers' internals are never copied or patched.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder blocks of a Hugging Face causal LM, whatever the architecture calls it."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        module: nn.Module | None = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList):
            return module
    raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}")


class StopForward(Exception):
    """Raised by a capture hook once it has what it needs, to skip the rest of the forward pass."""


def _hidden_of(output: Any) -> torch.Tensor:
    # Decoder blocks return a tensor in transformers 5 and a tuple (hidden, ...) in older versions.
    return output if isinstance(output, torch.Tensor) else output[0]


@contextmanager
def capture_block_output(model: nn.Module, layer: int, stop: bool) -> Iterator[dict[str, torch.Tensor]]:
    """Capture the residual stream after decoder block ``layer`` (key "hidden") on each forward.

    With ``stop`` the forward ends right there (catch StopForward around the call); the blocks
    above ``layer`` cannot affect the captured value, so running them would be wasted work.
    """
    layers = decoder_layers(model)
    if not -len(layers) <= layer < len(layers):
        raise ValueError(f"layer {layer} is out of range: the model has {len(layers)} decoder blocks")
    store: dict[str, torch.Tensor] = {}

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        store["hidden"] = _hidden_of(output)
        if stop:
            raise StopForward

    handle = layers[layer].register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def block_output(model: nn.Module, layer: int, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Hidden states after block ``layer`` for a batch: (batch, seq, hidden), with autograd if enabled."""
    t = batch
    with capture_block_output(model, layer, stop=True) as store:
        try:
            model(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
        except StopForward:
            pass
    return store["hidden"]


def parameters_matching(model: nn.Module, layers: Sequence[int], pattern: str) -> list[tuple[str, nn.Parameter]]:
    """Parameters of the given decoder blocks whose name inside the block fully matches ``pattern``.

    Names are relative to the block (``mlp.down_proj.weight``), so one pattern fits every HF
    decoder-only architecture whose blocks ``decoder_layers`` finds.
    """
    blocks = decoder_layers(model)
    regex = re.compile(pattern)
    chosen: list[tuple[str, nn.Parameter]] = []
    for layer in layers:
        if not -len(blocks) <= layer < len(blocks):
            raise ValueError(f"layer {layer} is out of range: the model has {len(blocks)} decoder blocks")
        for name, param in blocks[layer].named_parameters():
            if regex.fullmatch(name):
                chosen.append((f"layers.{layer % len(blocks)}.{name}", param))
    if not chosen:
        raise ValueError(f"no parameter of decoder blocks {list(layers)} matches {pattern!r}")
    return chosen
