"""A tiny decoder-lm model repository, built once and cached between test runs.

Built through the real path (trainer -> checkpoint -> ONNX export -> repository) and cached
under the engine's cache dir, keyed by the sources that shape it, so only the first run pays
the ~1 minute of tracing. The weights are re-drawn after one training step: a near-initial
model's greedy output repeats one token, which would hide KV-cache bugs; small token
embeddings, large position embeddings and wide layers give ~35 distinct tokens in 40.
"""

from __future__ import annotations

import hashlib
import shutil
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


def build_tiny_lm(repo: Path, work: Path) -> None:
    """Train one step, re-draw the weights, export (without validation) into ``repo``."""
    import torch

    from engine import checkpoint
    from engine.trainer import train
    from exporters.onnx_export import ExportOptions, export_model

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


@pytest.fixture(scope="session")
def lm_repo(tmp_path_factory) -> Path:
    """A model repository holding ``tiny-lm`` version 1 (default + kv_inplace graphs)."""
    from engine.paths import cache_dir

    cached = cache_dir() / "runtime-tests" / _source_key()
    if not (cached / MODEL / "1" / "manifest.json").exists():
        work = tmp_path_factory.mktemp("tiny-lm-build")
        build_tiny_lm(work / "repo", work)
        if cached.exists():
            shutil.rmtree(cached)
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(work / "repo", cached)
    repo = tmp_path_factory.mktemp("repo")
    shutil.copytree(cached, repo, dirs_exist_ok=True)
    return repo
