"""A Triton-shaped model repository: ``REPO/NAME/<version>/`` with files and ``manifest.json``.

Versions are positive integers that count up; a new version is built in a hidden temporary
directory beside its final place and renamed at the end (``engine.atomic.staged_dir``), so a
reader never sees half an export. The manifest lists every file with its size and sha256.

This module is torch-free (stdlib only): the runtime uses the readers below to load a model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.atomic import staged_dir, write_json
from exporters.base import (
    ChecksumMismatch,
    ExportError,
    ManifestError,
    RepositoryError,
    VersionExists,
)

MANIFEST = "manifest.json"
TIMING_CACHE = "timing.cache"  # TensorRT's, kept per model beside the versions
MANIFEST_FORMAT = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_model_name(name: str) -> str:
    """Return ``name`` if it can be a model directory, else raise RepositoryError."""
    if not _NAME_RE.match(name):
        raise RepositoryError(
            f"model name {name!r} must start with a letter or digit and contain only "
            "letters, digits, '.', '_' and '-'"
        )
    return name


def versions(repo: Path, name: str) -> list[int]:
    """Return the complete versions of model ``name`` in ascending order (empty if none)."""
    model_dir = Path(repo) / name
    if not model_dir.is_dir():
        return []
    found = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(v for v in found if v > 0)


def list_models(repo: Path) -> dict[str, list[int]]:
    """Map every model in ``repo`` that has at least one version to its versions."""
    repo = Path(repo)
    if not repo.is_dir():
        raise RepositoryError(f"model repository {repo} does not exist")
    out = {}
    for model_dir in sorted(repo.iterdir()):
        if model_dir.is_dir() and not model_dir.name.startswith("."):
            found = versions(repo, model_dir.name)
            if found:
                out[model_dir.name] = found
    return out


def latest_version(repo: Path, name: str) -> int:
    """Return the newest version number of model ``name``; raise if it has none."""
    found = versions(repo, name)
    if not found:
        known = ", ".join(list_models(repo)) if Path(repo).is_dir() else ""
        raise RepositoryError(
            f"no model {name!r} in repository {repo}; models there: {known or '(none)'}"
        )
    return found[-1]


def version_dir(repo: Path, name: str, version: int | None = None) -> Path:
    """Return the directory of ``name``'s ``version`` (default: the latest); raise if absent."""
    version = latest_version(repo, name) if version is None else int(version)
    path = Path(repo) / name / str(version)
    if not path.is_dir():
        raise RepositoryError(
            f"model {name!r} has no version {version}; versions: {versions(repo, name)}"
        )
    return path


def read_manifest(version_path: Path) -> dict[str, Any]:
    """Read a version's ``manifest.json``; raise ManifestError if it is missing or corrupt."""
    path = Path(version_path) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(
            f"{version_path} is not a model version: {MANIFEST} is missing"
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path} cannot be read: {exc}") from None
    if not isinstance(manifest, dict) or "files" not in manifest:
        raise ManifestError(f"{path} is not an export manifest (no 'files' list)")
    return manifest


def verify_files(version_path: Path) -> dict[str, Any]:
    """Check every file the manifest lists against its sha256; return the manifest.

    Raises ChecksumMismatch naming each missing or altered file.
    """
    version_path = Path(version_path)
    manifest = read_manifest(version_path)
    problems = []
    for entry in manifest["files"]:
        path = version_path / entry["path"]
        if not path.is_file():
            problems.append(f"{entry['path']} is missing")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(
                f"{entry['path']} has sha256 {sha256_file(path)[:12]}..., "
                f"manifest says {entry['sha256'][:12]}..."
            )
    if problems:
        raise ChecksumMismatch(
            f"{version_path} does not match its manifest: "
            + "; ".join(problems)
            + ". Re-export the model or restore the files."
        )
    return manifest


def file_table(root: Path) -> list[dict[str, Any]]:
    """List every file under ``root`` except the manifest, with its size and sha256."""
    root = Path(root)
    return [
        {
            "path": p.relative_to(root).as_posix(),
            "bytes": p.stat().st_size,
            "sha256": sha256_file(p),
        }
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    ]


def write_manifest(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Add the file table of ``root`` to ``manifest``, write it as ``manifest.json``, return it."""
    manifest = {**manifest, "manifest_format": MANIFEST_FORMAT, "files": file_table(root)}
    write_json(Path(root) / MANIFEST, manifest)
    return manifest


def copy_artifact(src: Path, dest_dir: Path) -> None:
    """Copy a file or directory the architecture needs at serving time (e.g. its tokenizer)."""
    target = Path(dest_dir) / src.name
    if not src.exists():
        raise ExportError(
            f"the checkpoint lacks {src}, which serving needs; re-train or restore it"
        )
    if target.exists():
        raise ExportError(f"artifact {src.name} would overwrite an exported file of that name")
    if src.is_dir():
        shutil.copytree(src, target)
    else:
        shutil.copy2(src, target)


@contextlib.contextmanager
def staged_version(repo: Path, name: str, force: bool = False) -> Iterator[tuple[Path, int]]:
    """Yield (temporary directory, version number) for a new version of ``name``.

    The next version is latest + 1; with ``force`` the latest is rebuilt and swapped out only
    once the new one is complete. On any exception the temporary directory is removed and the
    repository is left as it was.
    """
    check_model_name(name)
    existing = versions(repo, name)
    version = existing[-1] if (force and existing) else (existing[-1] + 1 if existing else 1)
    final = Path(repo) / name / str(version)
    created = [d for d in (Path(repo), Path(repo) / name) if not d.exists()]
    try:
        with staged_dir(final, replace=force) as tmp:
            yield tmp, version
    except BaseException as exc:
        for d in reversed(created):  # a failed first export leaves no empty folders either
            with contextlib.suppress(OSError):
                d.rmdir()
        if isinstance(exc, FileExistsError) and final.exists() and not force:
            raise VersionExists(
                f"{final} appeared while exporting (another export wrote it); run again to "
                "add the next version, or pass --force to overwrite the latest"
            ) from None
        raise
