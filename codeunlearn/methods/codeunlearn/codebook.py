"""The discrete codebook bottleneck (Tamkin et al.'s codebook features, as used by CodeUnlearn).

Two modes (``CodebookSpec.mode``):

* ``bottleneck`` (the paper's): every token's residual-stream vector is replaced by the sum of the k
  codes most cosine-similar to it, so all information downstream of the chosen block flows through a
  small set of discrete ids. Disabling a code sets its similarity to -inf before top-k, so the
  next-nearest code takes its place (codebook-features' ``keep_k_codes=True``).
* ``residual`` (an SAE with its error term, as DSG and SAE unlearning work use it): the codes only
  read the stream; h' = h + (recon_masked(h) - recon(h)) = h - c * (sum of the disabled codes among
  the token's top k), with c the mask's strength. With nothing disabled the block's output is
  returned untouched, so the model is the target bit for bit; the first real token of a sequence
  (the attention sink, whose norm is ~100x the median) is never edited.

Either way the mask is a buffer, never a weight change.

An optional gate (DSG, arXiv 2504.08192) applies the mask only to sequences on which the request's
codes fire: per sequence, the running fraction of tokens whose unmasked top-k holds one of the
gate's watched codes (the most forget-enriched ones); once it exceeds the mask's calibrated
threshold, the sequence is masked (see ``running_gate``).

The bottleneck attaches to any Hugging Face decoder-only model with a forward hook on one decoder
block; transformers' internals are never copied or patched.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.hooks import RemovableHandle

from codeunlearn.lm.blocks import decoder_layers

MODES = ("bottleneck", "residual")


@dataclass(frozen=True)
class CodebookSpec:
    num_codes: int
    k: int
    layer: int
    use_layernorm: bool = True
    combine: str = "sum"  # "sum" (CodeUnlearn) or "mean" (codebook-features' snap output)
    mode: str = "bottleneck"  # "bottleneck" (the codes replace the stream) or "residual" (they only edit it)


class CodebookBottleneck(nn.Module):
    def __init__(self, dim: int, spec: CodebookSpec) -> None:
        super().__init__()
        if spec.k > spec.num_codes:
            raise ValueError(f"k={spec.k} exceeds num_codes={spec.num_codes}")
        if spec.combine not in ("sum", "mean"):
            raise ValueError(f"combine must be 'sum' or 'mean', got {spec.combine!r}")
        if spec.mode not in MODES:
            raise ValueError(f"codebook.mode must be one of {MODES}, got {spec.mode!r}")
        if spec.mode == "residual" and spec.use_layernorm:
            # The edit subtracts codes from the stream itself: they must live in its units, not a LayerNorm's.
            raise ValueError("codebook.mode 'residual' needs codebook.use_layernorm: false")
        self.spec = spec
        self.dim = dim
        self.codes = nn.Parameter(torch.randn(spec.num_codes, dim) / dim**0.5)
        self.norm = nn.LayerNorm(dim) if spec.use_layernorm else nn.Identity()
        self.register_buffer("disabled", torch.zeros(spec.num_codes, dtype=torch.bool), persistent=False)
        # Residual mode: how many times a disabled code's contribution is subtracted (the mask's strength).
        self.strength = 1.0
        # Per-code selection counts since the last reset: drives dead-code revival and live-code metrics.
        self.register_buffer("usage", torch.zeros(spec.num_codes, dtype=torch.long), persistent=False)
        self.last_ids: torch.Tensor | None = None
        self.last_input: torch.Tensor | None = None
        self.reconstruction_loss = torch.tensor(0.0)
        self.code_l1 = torch.tensor(0.0)
        self.gate: GateSpec | None = None
        # The attention mask of the model call in progress (set by attach_codebook's model pre-hook)
        # and each row's running gate counts, carried across the steps of a cached generation.
        self.token_mask: torch.Tensor | None = None
        self._gate_carry: GateCarry | None = None

    def similarities(self, normed: torch.Tensor, masked: bool = True) -> torch.Tensor:
        sims = F.normalize(normed, dim=-1) @ F.normalize(self.codes, dim=-1).T
        return sims.masked_fill(self.disabled, float("-inf")) if masked else sims

    @property
    def residual(self) -> bool:
        return self.spec.mode == "residual"

    def select_ids(self, normed: torch.Tensor) -> torch.Tensor:
        """Each token's k code ids: the mask applied everywhere, or, with a gate, where the gate is open."""
        if self.gate is None or not bool(self.disabled.any()):
            self.token_mask, self._gate_carry = None, None
            return self.similarities(normed).topk(self.spec.k, dim=-1).indices
        sims = self.similarities(normed, masked=False)
        free_ids = sims.topk(self.spec.k, dim=-1).indices
        masked_ids = sims.masked_fill(self.disabled, float("-inf")).topk(self.spec.k, dim=-1).indices
        gated, _ = self._mask_on(free_ids)
        return torch.where(gated.unsqueeze(-1), masked_ids, free_ids)

    def _mask_on(self, free_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([batch, tokens] bool: does the mask act at each token (the gate, if any), [batch, tokens] bool:
        is the token the first real one of its sequence). Consumes the call's attention mask."""
        token_mask, self.token_mask = self.token_mask, None
        fires = torch.zeros(free_ids.shape[:2], dtype=torch.bool, device=free_ids.device)
        if self.gate is not None:
            fires = self.gate.watched(self.spec.num_codes, free_ids.device)[free_ids].any(-1)
        valid, carry, continuing = self._gate_inputs(fires, token_mask)
        first = valid & (valid.long().cumsum(-1) == 1) & (not continuing)
        if self.gate is None:
            self._gate_carry = None
            return torch.ones_like(fires), first
        gated, self._gate_carry = running_gate(fires, valid, self.gate, carry)
        return gated, first

    def _gate_inputs(
        self, fires: torch.Tensor, token_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, GateCarry | None, bool]:
        """Which tokens are real (not padding), the counts to continue from, and whether this call extends
        a sequence (a cached generation step) rather than starting one."""
        batch, length = fires.shape
        if token_mask is not None and token_mask.shape[0] == batch and token_mask.shape[1] >= length:
            valid = token_mask[:, -length:].to(device=fires.device, dtype=torch.bool)
            continuing = token_mask.shape[1] > length
        else:
            valid = torch.ones_like(fires)
            continuing = length == 1
        carry = self._gate_carry
        if not continuing or carry is None or carry.fired.shape[0] != batch:
            carry = None
        return valid, carry, continuing

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.residual:
            return self._edit(hidden)
        normed = self.norm(hidden)
        ids = self.select_ids(normed)
        chosen = F.embedding(ids, self.codes)
        quantized = chosen.sum(-2) if self.spec.combine == "sum" else chosen.mean(-2)
        # Straight-through: the forward value is the codes, the gradient reaches the input unchanged,
        # and the codes still receive the downstream gradient through `quantized`.
        output = quantized + (normed - normed.detach())
        self.last_ids = ids.detach()
        if self.training:
            # The auxiliary losses and revival statistics exist for training only; inference skips them.
            # Relative squared error per token (the fraction of the vector the codes miss): raw-unit MSE
            # is dominated by a pretrained model's outlier dimensions and swamps the language-model loss.
            target = normed.detach()
            squared_norm = target.pow(2).sum(-1).clamp_min(torch.finfo(target.dtype).tiny)
            self.reconstruction_loss = ((quantized - target).pow(2).sum(-1) / squared_norm).mean()
            self.code_l1 = chosen.abs().sum(-1).mean()
            self.last_input = normed.detach()
            self.usage += torch.bincount(ids.reshape(-1), minlength=self.spec.num_codes)
        return output.to(hidden.dtype)

    def _edit(self, hidden: torch.Tensor) -> torch.Tensor:
        """Residual mode: subtract ``strength`` x the disabled codes among each token's top k, where the
        mask acts; with nothing disabled the stream passes untouched (the target, bit for bit)."""
        if not bool(self.disabled.any()):
            self.token_mask, self._gate_carry, self.last_ids = None, None, None
            return hidden
        free_ids = self.similarities(hidden, masked=False).topk(self.spec.k, dim=-1).indices
        on, first = self._mask_on(free_ids)
        removed = self.disabled[free_ids] & (on & ~first).unsqueeze(-1)
        delta = (F.embedding(free_ids, self.codes) * removed.unsqueeze(-1)).sum(-2)
        self.last_ids = free_ids.detach()
        return hidden - (self.strength * delta).to(hidden.dtype)

    def reconstruct(self, activations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the sum of each row's top-k codes, their ids): the codebook's reading of frozen activations."""
        with torch.no_grad():
            ids = self.similarities(self.norm(activations), masked=False).topk(self.spec.k, dim=-1).indices
        # embedding_bag's backward scatters into the codes ~10x faster on CPU than F.embedding's.
        return F.embedding_bag(ids, self.codes, mode=self.spec.combine), ids

    def chosen_l1(self, ids: torch.Tensor) -> torch.Tensor:
        """Mean over chosen (token, code) pairs of the code's L1 norm, from the ids' counts: the same value
        and gradient as gathering every chosen code, without the [tokens, k, dim] copy."""
        counts = torch.bincount(ids.reshape(-1), minlength=self.spec.num_codes).to(self.codes.dtype)
        return (counts * self.codes.abs().sum(-1)).sum() / ids.numel()

    @torch.no_grad()
    def init_from_activations(self, activations: torch.Tensor, generator: torch.Generator) -> None:
        """Seed every code with a real (normalised) activation so no code starts out of reach."""
        normed = self.norm(activations.reshape(-1, self.dim))
        picks = torch.randint(0, normed.shape[0], (self.spec.num_codes,), generator=generator)
        scale = 1.0 if self.spec.combine == "mean" else 1.0 / self.spec.k
        self.codes.copy_(normed[picks] * scale)

    @torch.no_grad()
    def revive_dead_codes(self, generator: torch.Generator, noise: float) -> int:
        """Re-seed codes unused since the last call from the latest activations; returns how many."""
        dead = (self.usage == 0) & ~self.disabled
        n_dead = int(dead.sum())
        if n_dead and self.last_input is not None:
            pool = self.last_input.reshape(-1, self.dim)
            picks = torch.randint(0, pool.shape[0], (n_dead,), generator=generator)
            scale = 1.0 if self.spec.combine == "mean" else 1.0 / self.spec.k
            fresh = pool[picks] * scale
            fresh = (
                fresh
                + noise
                * fresh.norm(dim=-1, keepdim=True)
                * torch.randn(fresh.shape, generator=generator)
                / self.dim**0.5
            )
            self.codes[dead] = fresh.to(self.codes.dtype)
        self.usage.zero_()
        return n_dead

    def live_codes(self) -> int:
        return int((self.usage > 0).sum())


@dataclass(frozen=True)
class GateSpec:
    threshold: float  # the mask applies once a sequence's running fire rate exceeds this
    min_tokens: int  # ... and only after this many real tokens, so one early token cannot trip it
    watch_ids: tuple[int, ...]  # the codes whose firing counts (DSG watches its top features only)

    def watched(self, num_codes: int, device: torch.device | None = None) -> torch.Tensor:
        flags = torch.zeros(num_codes, dtype=torch.bool, device=device)
        flags[torch.tensor(self.watch_ids, dtype=torch.long, device=device)] = True
        return flags


@dataclass(frozen=True)
class GateCarry:
    fired: torch.Tensor  # [batch] real tokens so far on which a disabled code fired
    seen: torch.Tensor  # [batch] real tokens so far
    open: torch.Tensor  # [batch] bool: the gate has opened (it stays open for the rest of the sequence)


def running_gate(
    fires: torch.Tensor, valid: torch.Tensor, gate: GateSpec, carry: GateCarry | None = None
) -> tuple[torch.Tensor, GateCarry]:
    """[batch, tokens] bool: is the mask on at each token of this forward call.

    A call decides as a whole (DSG's sequence-level gate): if the running rate trips anywhere in it,
    every token of the call is masked, since a token masked only from the trip onwards would leave
    the earlier tokens' unmasked states for the later blocks to read the knowledge from. A cached
    generation step is a call of one token, so a prompt is decided at prefill and the answer token
    by token; once open, the gate stays open for the rest of the sequence.
    """
    fires = fires & valid
    fired = fires.long().cumsum(-1)
    seen = valid.long().cumsum(-1)
    opened = torch.zeros(fires.shape[0], dtype=torch.bool, device=fires.device)
    if carry is not None:
        fired = fired + carry.fired.unsqueeze(-1)
        seen = seen + carry.seen.unsqueeze(-1)
        opened = carry.open
    rate = fired / seen.clamp_min(1)
    trips = (rate > gate.threshold) & (seen >= gate.min_tokens) & valid
    is_open = (opened | trips.any(-1)).unsqueeze(-1).expand_as(trips)
    return is_open, GateCarry(fired=fired[:, -1], seen=seen[:, -1], open=is_open[:, -1])


def peak_fire_rate(fires: torch.Tensor, valid: torch.Tensor, min_tokens: int) -> torch.Tensor:
    """[batch]: each sequence's highest running fire rate once ``min_tokens`` real tokens are in (0 if never)."""
    fired = (fires & valid).long().cumsum(-1)
    seen = valid.long().cumsum(-1)
    rate = (fired / seen.clamp_min(1)).masked_fill(~valid | (seen < min_tokens), 0.0)
    return rate.max(-1).values


def _replace_hidden(output, bottleneck: CodebookBottleneck):
    if isinstance(output, torch.Tensor):
        return bottleneck(output)
    return (bottleneck(output[0]), *output[1:])


_ATTACHED: weakref.WeakKeyDictionary[nn.Module, CodebookBottleneck] = weakref.WeakKeyDictionary()


def attached_codebook(model: nn.Module) -> CodebookBottleneck | None:
    """The bottleneck ``attach_codebook`` routed this model through, if any."""
    return _ATTACHED.get(model)


class CodebookHandles:
    """The hooks attach_codebook registered; ``remove()`` detaches the codebook completely."""

    def __init__(self, *handles: RemovableHandle) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _attention_mask(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def attach_codebook(model: nn.Module, bottleneck: CodebookBottleneck) -> CodebookHandles:
    """Route the residual stream after block ``spec.layer`` through the bottleneck (nothing bypasses it).

    A pre-hook on the model hands each call's attention mask to the bottleneck, so a gate counts real
    tokens only and knows a cached generation step from a new sequence.
    """
    layers = decoder_layers(model)
    layer = bottleneck.spec.layer
    if not 0 <= layer < len(layers):
        raise ValueError(f"codebook layer {layer} out of range: the model has {len(layers)} blocks")

    def note_attention_mask(_model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        bottleneck.token_mask = _attention_mask(args, kwargs)

    handles = CodebookHandles(
        model.register_forward_pre_hook(note_attention_mask, with_kwargs=True),
        layers[layer].register_forward_hook(lambda _module, _args, output: _replace_hidden(output, bottleneck)),
    )
    _ATTACHED[model] = bottleneck
    return handles


def codebook_sha256(bottleneck: CodebookBottleneck) -> str:
    """Identity of a trained codebook: its spec and weights; the disabled mask is deliberately excluded."""
    digest = hashlib.sha256(json.dumps(asdict(bottleneck.spec), sort_keys=True).encode())
    for name, tensor in sorted(bottleneck.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


CODEBOOK_WEIGHTS = "codebook.safetensors"
CODEBOOK_SPEC = "codebook.json"


def save_codebook(bottleneck: CodebookBottleneck, out_dir: Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in bottleneck.state_dict().items()}
    save_file(tensors, str(out_dir / CODEBOOK_WEIGHTS))
    sha = codebook_sha256(bottleneck)
    meta = {"spec": asdict(bottleneck.spec), "dim": bottleneck.dim, "sha256": sha}
    (out_dir / CODEBOOK_SPEC).write_text(json.dumps(meta, indent=2))
    return sha


def load_codebook(directory: Path) -> CodebookBottleneck:
    spec_path = directory / CODEBOOK_SPEC
    if not spec_path.exists():
        raise FileNotFoundError(f"{spec_path}: no codebook spec (expected {CODEBOOK_SPEC} next to the weights)")
    meta = json.loads(spec_path.read_text())
    bottleneck = CodebookBottleneck(meta["dim"], CodebookSpec(**meta["spec"]))
    bottleneck.load_state_dict(load_file(str(directory / CODEBOOK_WEIGHTS)))
    if codebook_sha256(bottleneck) != meta["sha256"]:
        raise ValueError(f"{directory / CODEBOOK_WEIGHTS}: weights do not match the sha256 in {spec_path}")
    return bottleneck
