"""A model repository with one tiny model of each task (lm, clf, gan), cached between runs.

Trained for a few steps and exported without validation through the real path; these models
check serving, not quality. Cached under the engine's cache dir, keyed by the sources that
shape the files, so only the first run pays the ~1-2 minutes of training and tracing.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LM = {
    "n_layer": 1,
    "n_embd": 32,
    "n_head": 2,
    "block_size": 128,
    "batch_size": 4,
    "eval_windows": 4,
    "steps": 5,
    "warmup_steps": 1,
}
CLASSIFIER = {"d_model": 32, "n_layer": 1, "n_head": 2, "pretrain_steps": 3, "finetune_steps": 5}
GAN = {"steps": 5}
RUNS = (
    ("lm", "decoder-lm", LM),
    ("clf", "text-classifier", CLASSIFIER),
    ("gan", "gan-generator", GAN),
)


def _source_key() -> str:
    h = hashlib.sha256(repr(RUNS).encode())
    sources = [Path(__file__), ROOT / "engine" / "trainer.py", ROOT / "engine" / "repository.py"]
    sources += sorted(ROOT.glob("plugins/**/*.py")) + sorted(ROOT.glob("exporters/*.py"))
    for path in sources:
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def build(root: Path) -> Path:
    """Train and export lm, clf and gan under ``root``; return the repository directory."""
    from engine.plugins import export_formats
    from engine.trainer import train
    from exporters.base import ExportOptions

    onnx = export_formats()["onnx"]
    for name, arch, overrides in RUNS:
        ckpt = train(arch, root / f"ckpt-{name}", overrides=overrides, progress=False)
        onnx.export(ckpt, root / "repo", ExportOptions(name=name, validate=False, progress=False))
    return root / "repo"


def checkpoints() -> Path:
    """The cached directory holding ``repo/`` and the checkpoints ``ckpt-lm`` etc."""
    from engine.paths import cache_dir

    cached = cache_dir() / "served-repo" / _source_key()
    if not (cached / "repo" / "gan" / "1" / "manifest.json").exists():
        work = Path(tempfile.mkdtemp(prefix="served-repo-build-"))
        try:
            build(work)
            if cached.exists():
                shutil.rmtree(cached)
            shutil.copytree(work, cached)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return cached


def copy_repo(dest: Path) -> Path:
    """A private copy of the cached repository at ``dest`` (tests may add or remove versions)."""
    shutil.copytree(checkpoints() / "repo", dest)
    return dest
