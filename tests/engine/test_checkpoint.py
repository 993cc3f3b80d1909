"""Checkpoint directories: complete, atomic, artifacts included, weights round-trip."""

import json

import pytest

from engine import checkpoint
from engine.plugins import PluginInfo
from tests.toy_plugin import ToyConfig, ToyRegression


class ToyWithArtifacts(ToyRegression):
    def save_artifacts(self, data, out_dir):
        (out_dir / "vocab.txt").write_text("a\nb\n")


def _write(tmp_path, arch, model):
    data = arch.load_data(ToyConfig(), tmp_path, None)
    return checkpoint.write(
        tmp_path / "ckpt",
        arch=arch,
        plugin=PluginInfo("toy", "1.0", "test"),
        config=ToyConfig(),
        model=model,
        data=data,
        step=3,
        seed=7,
        metrics={"mse": 0.5},
        trainer_state=None,
    )


def test_checkpoint_holds_weights_config_metrics_and_save_artifacts_output(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_PLUGINS", "tests.toy_plugin")
    arch = ToyWithArtifacts()
    model = arch.build_model(ToyConfig())
    out = _write(tmp_path, arch, model)
    assert (out / "vocab.txt").read_text() == "a\nb\n"
    meta = json.loads((out / "config.json").read_text())
    assert meta["step"] == 3 and meta["seed"] == 7 and meta["plugin_version"] == "1.0"
    _, config, loaded = checkpoint.load(out)
    assert config == ToyConfig()
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert (a == b).all()


def test_weights_of_another_shape_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_PLUGINS", "tests.toy_plugin")
    arch = ToyRegression()
    out = _write(tmp_path, arch, arch.build_model(ToyConfig()))
    meta = json.loads((out / "config.json").read_text())
    meta["config"]["features"] = 9
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(checkpoint.CheckpointError, match="does not match"):
        checkpoint.load(out)


def test_missing_weights_file_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_PLUGINS", "tests.toy_plugin")
    arch = ToyRegression()
    out = _write(tmp_path, arch, arch.build_model(ToyConfig()))
    (out / "model.safetensors").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="model.safetensors is missing"):
        checkpoint.load(out)
