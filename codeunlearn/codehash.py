"""The source a module runs: its file and every project module it imports, transitively, and their hash.

Static (``ast``), so nothing is imported to find it, and every ``import`` statement counts, those inside
functions included: a lazily imported module is still code the stage can run. A package's ``__init__``
runs before any of its submodules, so it counts too. Results are cached per process; the source of a
running process does not change under it.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# The project's own top-level packages; anything else (torch, prefect, the standard library) is a
# pinned dependency, versioned by the environment, not by this repository.
PROJECT_PACKAGES = ("codeunlearn", "tasks")


def module_file(name: str, root: Path = REPO_ROOT) -> Path | None:
    """The file that defines module ``name`` under ``root``, or None when it is not a project module."""
    if name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_names(source: str, module: str, is_package: bool) -> set[str]:
    """Every module name an import statement in ``source`` may load (``from a import b``: ``a`` and ``a.b``)."""
    names: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{node.module}" if node.module else anchor
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _with_parents(name: str) -> list[str]:
    """``a.b.c`` -> ``a``, ``a.b``, ``a.b.c``: importing a submodule runs each enclosing package first."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


@functools.cache
def module_closure(name: str, root: Path = REPO_ROOT, opaque: tuple[str, ...] = ()) -> tuple[Path, ...]:
    """The files of ``name`` and of every project module it imports, transitively, sorted.

    An ``opaque`` module's file counts but its imports are not followed: a registry package whose
    ``__init__`` imports every plug-in to register it, where the caller runs only the plug-ins it names.
    """
    seen: dict[str, Path] = {}
    pending = _with_parents(name)
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        path = module_file(current, root)
        if path is None:
            continue
        seen[current] = path
        if current in opaque:
            continue
        imported = _imported_names(path.read_text(), current, path.name == "__init__.py")
        pending.extend(parent for found in imported for parent in _with_parents(found) if parent not in seen)
    if name not in seen:
        raise ModuleNotFoundError(f"{name}: no such project module under {root}")
    return tuple(sorted(set(seen.values())))


@functools.cache
def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_hash(paths: tuple[Path, ...], root: Path = REPO_ROOT) -> str:
    """One sha256 over each file's path (relative to ``root``) and content digest, in the given order."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{path.relative_to(root).as_posix()}\0{file_digest(path)}\n".encode())
    return digest.hexdigest()
