"""Atomic writes and file hashes: a killed run leaves either the old file (or directory) or the new one,
never half of one, and a later run can tell a dead run's scratch space from a live one's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

HASH_CHUNK_BYTES = 1 << 20


def atomic_write_bytes(path: Path, payload: bytes, *, exclusive: bool = False, read_only: bool = False) -> None:
    """Write ``payload`` to a temporary sibling, fsync it, then move it into place.

    ``exclusive``: hard-link instead of rename, which fails (FileExistsError) if ``path`` exists, so
    neither a crash nor a race replaces a file that must be written once. ``read_only``: mode 0444.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        if read_only:
            os.chmod(tmp_name, 0o444)
        if exclusive:
            os.link(tmp_name, path)
        else:
            os.replace(tmp_name, path)
    finally:
        Path(tmp_name).unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found (did the stage that writes it run?)")
    return json.loads(path.read_text())


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------ directories and scratch space


def scratch_name(prefix: str) -> str:
    """A unique hidden name; host and pid in it let a later run tell a dead run's leftovers from live ones."""
    return f"{prefix}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex}"


def remove_dead_scratch(parent: Path, prefix: str) -> None:
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


@contextmanager
def atomic_dir(final: Path, if_exists: Literal["replace", "keep", "error"]) -> Iterator[Path]:
    """Yield an empty sibling directory; on success rename it to ``final``, on any error remove it.

    A sibling (same file system) makes the rename atomic. ``if_exists`` says what to do when ``final``
    appeared meanwhile: "keep" the other writer's result (it is equivalent, e.g. a cache), "replace" it,
    or raise.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    for kind in ("tmp", "old"):
        remove_dead_scratch(final.parent, f".{final.name}.{kind}")
    tmp = final.parent / scratch_name(f".{final.name}.tmp")
    tmp.mkdir()  # plain mkdir, not mkdtemp, so the umask (not 0700) sets the published permissions
    try:
        yield tmp
        if final.exists():
            if if_exists == "error":
                raise FileExistsError(f"{final} already exists")
            if if_exists == "keep":
                shutil.rmtree(tmp, ignore_errors=True)
                return
            old = final.parent / scratch_name(f".{final.name}.old")
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
