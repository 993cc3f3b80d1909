"""A tiny decoder-lm model repository, built once and cached between test runs.

Built through the real path (trainer -> checkpoint -> ONNX export -> repository) and cached
under the engine's cache dir, keyed by the sources that shape it, so only the first run pays
the ~1 minute of tracing. The weights are re-drawn after one training step: a near-initial
model's greedy output repeats one token, which would hide KV-cache bugs; small token
embeddings, large position embeddings and wide layers give ~35 distinct tokens in 40.

The same build saves the re-drawn weights as a checkpoint (``lm_checkpoint``) and exports them
with ``engine export --format torch`` into a second repository (``lm_torch_repo``), so the
torch runtime and the Hugging Face baselines run exactly the ONNX graphs' weights.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = {"n_layer": 2, "n_embd": 64, "n_head": 2, "block_size": 96, "eval_windows": 8}
MODEL = "tiny-lm"


def _source_key() -> str:
    h = hashlib.sha256(repr(sorted(TINY.items())).encode())
    sources = [Path(__file__), ROOT / "engine" / "trainer.py"]
    sources += sorted(ROOT.glob("plugins/decoder_lm/*.py")) + sorted(ROOT.glob("exporters/*.py"))
    for path in sources:
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def build_tiny_lm(repo: Path, work: Path, torch_repo: Path | None = None) -> None:
    """Train one step, re-draw the weights, export (without validation) into ``repo``.

    With ``torch_repo``, the re-drawn weights are also written back into the checkpoint
    (``work/ckpt``) and exported from there by the CLI with ``--format torch``.
    """
    import torch
    from safetensors.torch import save_model

    from engine import checkpoint
    from engine.trainer import train
    from exporters.base import ExportOptions
    from exporters.onnx_export import export_model
    from tests.conftest import run_cli

    ckpt = train("decoder-lm", work / "ckpt", steps=1, overrides=TINY, progress=False)
    arch, config, model = checkpoint.load(ckpt)
    gen = torch.Generator().manual_seed(0)
    spread = {"wte": 0.1, "wpe": 1.0}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                scale = next((v for k, v in spread.items() if k in name), 0.5)
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    options = ExportOptions(progress=False, validate=False)
    export_model(arch, config, model, ckpt, repo, MODEL, options)
    if torch_repo is not None:
        save_model(model, str(ckpt / checkpoint.WEIGHTS))
        args = ("export", str(ckpt), "--repo", str(torch_repo), "--name", MODEL)
        done = run_cli(*args, "--format", "torch", "--no-progress")
        assert done.returncode == 0, done.stderr


def _built() -> Path:
    """The cache dir holding ``onnx/`` and ``torch/`` repositories and the ``ckpt/``."""
    from engine.paths import cache_dir

    cached = cache_dir() / "runtime-tests" / _source_key()
    parts = [cached / kind / MODEL / "1" / "manifest.json" for kind in ("onnx", "torch")]
    if not all(p.exists() for p in parts):
        work = Path(tempfile.mkdtemp(prefix="tiny-lm-build-"))
        try:
            build_tiny_lm(work / "onnx", work, work / "torch")
            if cached.exists():
                shutil.rmtree(cached)
            cached.mkdir(parents=True)
            for kind in ("onnx", "torch", "ckpt"):
                shutil.copytree(work / kind, cached / kind)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return cached


@pytest.fixture(scope="session")
def lm_repo(tmp_path_factory) -> Path:
    """A model repository holding ``tiny-lm`` version 1 (default + kv_inplace graphs)."""
    repo = tmp_path_factory.mktemp("repo")
    shutil.copytree(_built() / "onnx", repo, dirs_exist_ok=True)
    return repo


@pytest.fixture(scope="session")
def lm_torch_repo(tmp_path_factory) -> Path:
    """A model repository holding ``tiny-lm`` version 1 in the torch format (same weights)."""
    repo = tmp_path_factory.mktemp("torch-repo")
    shutil.copytree(_built() / "torch", repo, dirs_exist_ok=True)
    return repo


@pytest.fixture(scope="session")
def lm_checkpoint(tmp_path_factory) -> Path:
    """The checkpoint directory of those same weights."""
    ckpt = tmp_path_factory.mktemp("lm-ckpt") / "ckpt"
    shutil.copytree(_built() / "ckpt", ckpt)
    return ckpt
