"""Fixtures: the runtime tests' tiny LM repository and a tiny GAN repository, both cached.

The LM is ``tests/runtime/conftest.py``'s ``tiny-lm`` (same cache, so a run of either suite
builds it for both). The GAN trains for 5 steps and is cached under the engine's cache dir,
keyed by the sources that shape it, so only the first run pays its ~10 s.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from exporters.base import ExportOptions
from tests.runtime.conftest import MODEL as LM_MODEL  # noqa: F401 - re-exported for tests
from tests.runtime.conftest import lm_repo  # noqa: F401 - the session fixture, shared

ROOT = Path(__file__).resolve().parents[2]
GAN = {"steps": 5}
GAN_MODEL = "gan"


def _gan_key() -> str:
    h = hashlib.sha256(repr(sorted(GAN.items())).encode())
    sources = [ROOT / "engine" / "trainer.py"]
    sources += sorted(ROOT.glob("plugins/gan_generator/*.py")) + sorted(ROOT.glob("exporters/*.py"))
    for path in sources:
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def gan_repo(tmp_path_factory) -> Path:
    """A model repository holding a barely trained ``gan`` (sample_images)."""
    from engine.paths import cache_dir

    cached = cache_dir() / "bench-tests" / _gan_key()
    if not (cached / GAN_MODEL / "1" / "manifest.json").exists():
        from engine.plugins import architectures, export_formats
        from engine.trainer import train

        if "gan-generator" not in architectures():
            pytest.skip("the gan-generator plugin is not registered")
        work = tmp_path_factory.mktemp("gan-build")
        ckpt = train("gan-generator", work / "ckpt", overrides=GAN, progress=False)
        export_formats()["onnx"].export(
            ckpt, work / "repo", ExportOptions(name=GAN_MODEL, validate=False, progress=False)
        )
        if cached.exists():
            shutil.rmtree(cached)
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(work / "repo", cached)
    repo = tmp_path_factory.mktemp("gan-repo")
    shutil.copytree(cached, repo, dirs_exist_ok=True)
    return repo
