"""The plugin manager: built-ins, ENGINE_PLUGINS modules, check_pending, lookups."""

import pluggy
import pytest

from engine import hookimpl
from engine.plugins import (
    BUILTIN_PLUGINS,
    PluginLoadError,
    UnknownArchitectureError,
    architectures,
    get_architecture,
    get_plugin_manager,
)


def test_builtins_register_the_three_architectures():
    pm = get_plugin_manager()
    found = architectures(pm)
    assert {"decoder-lm", "text-classifier", "gan-generator"} <= set(found)
    assert {found[n][0].task for n in ("decoder-lm", "text-classifier", "gan-generator")} == {
        "generate",
        "classify",
        "sample_images",
    }
    for name in ("decoder-lm", "text-classifier", "gan-generator"):
        assert found[name][1].source == "built-in"
        assert found[name][1].name in BUILTIN_PLUGINS


def test_engine_plugins_env_var_adds_a_local_module(monkeypatch):
    monkeypatch.setenv("ENGINE_PLUGINS", "tests.toy_plugin")
    arch, info = get_architecture("toy-regression", get_plugin_manager())
    assert info.source == "ENGINE_PLUGINS" and arch.task == "classify"


def test_engine_plugins_env_var_with_a_missing_module_fails_clearly(monkeypatch):
    monkeypatch.setenv("ENGINE_PLUGINS", "no_such_module_xyz")
    with pytest.raises(PluginLoadError, match="no_such_module_xyz"):
        get_plugin_manager()


def test_unknown_architecture_lists_the_known_ones():
    with pytest.raises(UnknownArchitectureError, match="known: .*decoder-lm"):
        get_architecture("nope", get_plugin_manager())


def test_misspelled_hook_fails_loudly(monkeypatch):
    import sys
    import types

    mod = types.ModuleType("typo_plugin")

    @hookimpl
    def engine_register_architecture():  # missing trailing "s"
        return []

    mod.engine_register_architecture = engine_register_architecture
    monkeypatch.setitem(sys.modules, "typo_plugin", mod)
    monkeypatch.setenv("ENGINE_PLUGINS", "typo_plugin")
    with pytest.raises(pluggy.PluginValidationError, match="engine_register_architecture"):
        get_plugin_manager()


def test_duplicate_architecture_names_are_refused(monkeypatch):
    import sys
    import types

    from tests.toy_plugin import ToyRegression

    mod = types.ModuleType("dup_plugin")

    @hookimpl
    def engine_register_architectures():
        return [ToyRegression()]

    mod.engine_register_architectures = engine_register_architectures
    monkeypatch.setitem(sys.modules, "dup_plugin", mod)
    monkeypatch.setenv("ENGINE_PLUGINS", "tests.toy_plugin,dup_plugin")
    with pytest.raises(PluginLoadError, match="registered by"):
        architectures(get_plugin_manager())


def test_export_formats_and_backends_are_registered_by_hooks():
    pm = get_plugin_manager()
    formats = [f.name for items in pm.hook.engine_register_export_formats() for f in items]
    backends = [b.name for items in pm.hook.engine_register_backends() for b in items]
    assert {"onnx", "tensorrt"} <= set(formats)
    assert "onnxruntime" in backends


def test_serving_side_plugin_loading_does_not_import_torch():
    """The server loads export formats and backends; only training asks for architectures."""
    import subprocess
    import sys

    code = (
        "import sys, engine.plugins as p; pm = p.get_plugin_manager(); "
        "p.export_formats(pm); p.backends(pm); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_hugging_face_families_register_through_their_hook(monkeypatch, tmp_path):
    """A family is one module implementing engine_register_hf_families(): nothing in engine/."""
    import json
    import sys
    import types

    from engine.hf_family import HFFamily
    from engine.plugins import hf_families
    from exporters.hf.source import find_family

    found = hf_families(get_plugin_manager())
    assert found["GPT2LMHeadModel"][0].architecture == "decoder-lm"
    assert found["BertForSequenceClassification"][0].architecture == "bert-classifier"
    assert found["DistilBertForSequenceClassification"][0].architecture == "bert-classifier"

    class ToyFamily(HFFamily):
        hf_architecture, model_type, architecture = "ToyForRegression", "toy", "toy-regression"
        auto_class = "AutoModel"
        unsupported = config_from_hf = weights_from_hf = write_artifacts = None

    mod = types.ModuleType("toy_family")

    @hookimpl
    def engine_register_hf_families():
        return [ToyFamily()]

    mod.engine_register_hf_families = engine_register_hf_families
    monkeypatch.setitem(sys.modules, "toy_family", mod)
    monkeypatch.setenv("ENGINE_PLUGINS", "tests.toy_plugin,toy_family")
    family, info = find_family({"architectures": ["ToyForRegression"]}, tmp_path)
    assert isinstance(family, ToyFamily) and info.source == "ENGINE_PLUGINS"
    with pytest.raises(PluginLoadError, match="claimed by"):  # a second claim is refused
        monkeypatch.setenv("ENGINE_PLUGINS", "tests.toy_plugin,toy_family,dup_family")
        dup = types.ModuleType("dup_family")
        dup.engine_register_hf_families = engine_register_hf_families
        monkeypatch.setitem(sys.modules, "dup_family", dup)
        hf_families(get_plugin_manager())
    assert json.dumps(sorted(found))  # the built-in list is plain names
