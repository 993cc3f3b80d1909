"""The model repository format: ``REPO/NAME/<version>/`` with files and ``manifest.json``.

Triton-shaped: versions are positive integers that count up; a new version is built in a hidden
temporary directory beside its final place and renamed at the end (``engine.atomic.staged_dir``),
so a reader never sees half an export. The manifest lists every file with its size and sha256.

It belongs to neither side: exporters write versions through :func:`staged_version` and
:func:`write_manifest`, the runtime and the server read them through :func:`verify_files` and
the typed :class:`Manifest`. Torch-free (stdlib only).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from engine.atomic import staged_dir, write_json
from engine.errors import EngineError

MANIFEST = "manifest.json"
TIMING_CACHE = "timing.cache"  # TensorRT's, kept per model beside the versions
MANIFEST_FORMAT = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class RepositoryError(EngineError):
    """A model repository is missing, malformed, or holds no such model or version."""


class VersionExists(RepositoryError):
    """The version directory to write already exists (another export got there first)."""


class ManifestError(RepositoryError):
    """A version's ``manifest.json`` is missing or cannot be read."""


class ChecksumMismatch(RepositoryError):
    """A file in a version directory is missing or its sha256 differs from the manifest."""


@dataclass(frozen=True)
class FileEntry:
    """One file of a version: its path inside the version, size and sha256."""

    path: str
    bytes: int
    sha256: str


@dataclass
class Manifest:
    """What a version holds and how it was made; written as ``manifest.json``.

    The typed fields are what every format writes and what readers rely on. Sections that only
    one format writes (``opset``, ``tensorrt``, ``weights``, ``timings_s``...) stay in
    ``sections`` under their JSON keys, so a newer exporter can add one without a reader change.
    """

    name: str
    version: int
    format: str  # onnx, tensorrt, torch
    task: str  # generate, classify, sample_images
    architecture: str
    serving: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"
    max_seq: int | None = None
    graphs: dict[str, dict[str, Any]] = field(default_factory=dict)
    main_graph: str | None = None
    validation: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    plugin: dict[str, Any] = field(default_factory=dict)
    checkpoint: dict[str, Any] = field(default_factory=dict)  # where the weights came from
    libraries: dict[str, Any] = field(default_factory=dict)
    export_options: dict[str, Any] = field(default_factory=dict)
    files: list[FileEntry] = field(default_factory=list)
    sections: dict[str, Any] = field(default_factory=dict)
    manifest_format: int = MANIFEST_FORMAT

    _REQUIRED = ("name", "version", "format", "task", "architecture")
    _MAPPINGS = (
        "serving",
        "graphs",
        "validation",
        "plugin",
        "checkpoint",
        "libraries",
        "export_options",
    )

    def __post_init__(self) -> None:
        for key in self._MAPPINGS:  # JSON null reads as "none recorded"
            if getattr(self, key) is None:
                setattr(self, key, {})

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "manifest") -> Manifest:
        """Build from parsed JSON; a missing or mistyped core field raises ManifestError."""
        if not isinstance(data, dict):
            raise ManifestError(f"{where} is not a JSON object")
        missing = [k for k in cls._REQUIRED if k not in data]
        if missing:
            raise ManifestError(f"{where} lacks {', '.join(missing)}; re-export the model")
        known = {f.name for f in fields(cls)} - {"files", "sections"}
        try:
            files = [
                FileEntry(str(f["path"]), int(f["bytes"]), str(f["sha256"]))
                for f in data.get("files", [])
            ]
            core = {k: data[k] for k in known if k in data}
            core["version"] = int(core["version"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"{where} has a malformed field: {exc}") from None
        sections = {k: v for k, v in data.items() if k not in known and k != "files"}
        return cls(**core, files=files, sections=sections)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: core fields, the file table, and every section at the top level."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["files"] = [asdict(f) for f in self.files]
        return {**out.pop("sections"), **out}

    def graph(self, variant: str) -> dict[str, Any]:
        """The entry of one exported graph; RepositoryError naming the ones it has."""
        if variant not in self.graphs:
            raise RepositoryError(
                f"{self.name} version {self.version} has no {variant!r} graph (it has "
                f"{', '.join(self.graphs) or 'none'}); re-export it with a current exporter"
            )
        return self.graphs[variant]


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


def read_manifest(version_path: Path) -> Manifest:
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
    return Manifest.from_dict(manifest, str(path))


def verify_files(version_path: Path) -> Manifest:
    """Check every file the manifest lists against its sha256; return the manifest.

    Raises ChecksumMismatch naming each missing or altered file.
    """
    version_path = Path(version_path)
    manifest = read_manifest(version_path)
    problems = []
    for entry in manifest.files:
        path = version_path / entry.path
        if not path.is_file():
            problems.append(f"{entry.path} is missing")
        elif (digest := sha256_file(path)) != entry.sha256:
            problems.append(
                f"{entry.path} has sha256 {digest[:12]}..., manifest says {entry.sha256[:12]}..."
            )
    if problems:
        raise ChecksumMismatch(
            f"{version_path} does not match its manifest: "
            + "; ".join(problems)
            + ". Re-export the model or restore the files."
        )
    return manifest


def file_table(root: Path) -> list[FileEntry]:
    """List every file under ``root`` except the manifest, with its size and sha256."""
    root = Path(root)
    return [
        FileEntry(p.relative_to(root).as_posix(), p.stat().st_size, sha256_file(p))
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    ]


def write_manifest(root: Path, manifest: Manifest) -> Manifest:
    """Fill in the file table of ``root``, write ``manifest.json`` there, return the manifest."""
    manifest.files = file_table(root)
    manifest.manifest_format = MANIFEST_FORMAT
    write_json(Path(root) / MANIFEST, manifest.to_dict())
    return manifest


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
