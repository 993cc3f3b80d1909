"""Shared fixtures: a per-session cache dir, CLI runner, and trained tiny checkpoints built once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _engine_cache(tmp_path_factory):
    """Keep tokenizers and token arrays in one cache for the whole session (reused across runs)."""
    if "ENGINE_CACHE_DIR" not in os.environ:
        os.environ["ENGINE_CACHE_DIR"] = str(Path.home() / ".cache" / "engine-tests")
    yield


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600, cwd=None):
    """Run ``python -m engine ARGS`` in a subprocess; return the CompletedProcess."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "engine", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=cwd or ROOT,
    )


@pytest.fixture()
def cli():
    """The CLI runner as a fixture."""
    return run_cli


TOY_ENV = {"ENGINE_PLUGINS": "tests.toy_plugin"}


@pytest.fixture(scope="session")
def served_repo(tmp_path_factory) -> Path:
    """A repository with tiny ``lm``, ``clf`` and ``gan`` models (read-only: copy to change)."""
    from tests.served_repo import copy_repo

    return copy_repo(tmp_path_factory.mktemp("served") / "repo")


# -- Hugging Face directories (tests/hf_models.py) and their exports, built once per session --
@pytest.fixture(scope="session")
def hf_gpt2(tmp_path_factory) -> Path:
    """A tiny ``GPT2LMHeadModel`` directory (save_pretrained), fixed seed."""
    pytest.importorskip("transformers", reason="transformers is not installed: pip install '.[hf]'")
    from tests.hf_models import save_gpt2

    return save_gpt2(tmp_path_factory.mktemp("hf") / "gpt2")


@pytest.fixture(scope="session")
def hf_bert(tmp_path_factory) -> Path:
    """A tiny ``BertForSequenceClassification`` directory with three named labels."""
    pytest.importorskip("transformers", reason="transformers is not installed: pip install '.[hf]'")
    from tests.hf_models import save_bert

    return save_bert(tmp_path_factory.mktemp("hf") / "bert", "bert")


@pytest.fixture(scope="session")
def hf_distilbert(tmp_path_factory) -> Path:
    """A tiny ``DistilBertForSequenceClassification`` directory with three named labels."""
    pytest.importorskip("transformers", reason="transformers is not installed: pip install '.[hf]'")
    from tests.hf_models import save_bert

    return save_bert(tmp_path_factory.mktemp("hf") / "distilbert", "distilbert")


@pytest.fixture(scope="session")
def hf_repo(tmp_path_factory, hf_gpt2, hf_bert, hf_distilbert) -> Path:
    """One repository with the three imported and validated in fp32: gpt2, bert, distilbert."""
    from exporters.base import ExportOptions
    from exporters.onnx_export import export_checkpoint

    repo = tmp_path_factory.mktemp("hf-repo")
    for name, path in (("gpt2", hf_gpt2), ("bert", hf_bert), ("distilbert", hf_distilbert)):
        export_checkpoint(path, repo, ExportOptions(name=name, progress=False))
    return repo
