"""``engine export --format torch``: weights, config and tokenizer as a verified version."""

from __future__ import annotations

import pytest

from engine import checkpoint
from engine.plugins import export_formats
from engine.runtime.loader import open_version
from exporters.base import ExportError, ExportOptions
from tests.runtime import conftest as runtime
from tests.runtime.conftest import MODEL

# The runtime tests' tiny LM: its checkpoint, exported by the CLI into lm_torch_repo.
lm_torch_repo, lm_checkpoint = runtime.lm_torch_repo, runtime.lm_checkpoint


def test_the_cli_export_is_a_verified_version_that_loads_as_a_checkpoint(
    lm_torch_repo, lm_checkpoint
):
    mv = open_version(lm_torch_repo, MODEL)  # checks every file's sha256
    m = mv.manifest
    assert (m.format, m.task, m.precision) == ("torch", "generate", "fp32")
    assert {f.path for f in m.files} == {"model.safetensors", "config.json", "tokenizer.json"}
    assert m.validation["validated"] and m.serving["context_length"] == 96
    _, _, exported = checkpoint.load(mv.path)
    _, _, source = checkpoint.load(lm_checkpoint)
    theirs = source.state_dict()
    assert all(v.equal(theirs[k]) for k, v in exported.state_dict().items())


def test_fp16_halves_the_weights(lm_checkpoint, tmp_path):
    fmt = export_formats()["torch"]
    full = fmt.export(lm_checkpoint, tmp_path, ExportOptions(name="a", progress=False))
    half = fmt.export(lm_checkpoint, tmp_path, ExportOptions(name="b", fp16=True, progress=False))
    size = lambda v: (v / "model.safetensors").stat().st_size  # noqa: E731
    assert open_version(tmp_path, "b").manifest.precision == "fp16"
    assert size(half) < 0.51 * size(full)


def test_a_model_the_torch_runtime_cannot_serve_is_refused_before_writing(tiny_ckpt, tmp_path):
    with pytest.raises(ExportError, match="generate runtime only"):
        export_formats()["torch"].export(
            tiny_ckpt, tmp_path / "repo", ExportOptions(progress=False)
        )
    assert not (tmp_path / "repo").exists()
