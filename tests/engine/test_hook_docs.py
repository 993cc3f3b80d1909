"""Meta-test: every hook and every Architecture method has a docstring, a docs line, and the
engine really calls it.

"Calls" is observed, not searched for in the test sources: a plugin implementing every hook
with recording objects (``tests/engine/recording_plugin.py``) goes through what a user runs -
train, sample, export (fp32 and int8), convert, then load and run the exported version in the
runtime - and each hook,
each object a hook returned and each method of the Architecture contract must have been called
by the engine on the way, with the results of each stage checked. A new hook or contract method
that the engine never calls (or that this pipeline does not reach) fails here.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest

from engine import hookspecs
from engine.architecture import Architecture

ROOT = Path(__file__).resolve().parents[2]
DOCS = (ROOT / "docs" / "plugins.md").read_text()
HOOKS = sorted(n for n in dir(hookspecs) if n.startswith("engine_"))
METHODS = sorted(
    n for n, f in vars(Architecture).items() if inspect.isfunction(f) and not n.startswith("_")
)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Run the recording plugin through train, sample, export and the runtime; return CALLS."""
    from typer.testing import CliRunner

    from engine import plugins
    from engine.cli import app
    from engine.errors import EngineError
    from engine.runtime.backends import BackendOptions
    from engine.runtime.loader import open_version
    from engine.trainer import train
    from exporters.onnx_graph import EXPORTER_ENV
    from tests.engine import recording_plugin as rec

    mp = pytest.MonkeyPatch()
    mp.setenv(plugins.ENV_VAR, "tests.engine.recording_plugin")
    mp.setenv(EXPORTER_ENV, "torchscript")  # the faster exporter; the hooks are the point
    rec.CALLS.clear()
    root = tmp_path_factory.mktemp("recording")
    stages = {}
    try:
        ckpt = train(rec.ARCH, root / "ckpt", steps=12, progress=False)
        stages["train"] = (ckpt / "model.safetensors").exists()
        sampled = CliRunner().invoke(app, ["sample", str(ckpt)])
        stages["sample"] = sampled.exit_code == 0 and "tiny" in sampled.output
        args = ["export", str(ckpt), "--repo", str(root / "repo"), "--format", rec.FORMAT]
        exported = CliRunner().invoke(app, [*args, "--no-progress"])
        stages["export"] = exported.exit_code == 0 and (root / "repo" / rec.ARCH / "1").is_dir()
        int8 = CliRunner().invoke(app, [*args, "--int8", "--no-progress"])
        stages["int8"] = int8.exit_code == 0 and (root / "repo" / rec.ARCH / "2").is_dir()
        # the family converts nothing: the engine asks it, then refuses with an EngineError
        # (which `engine` prints as one line, exit 2)
        converted = CliRunner().invoke(app, ["convert", str(ckpt), str(root / "hf"), "--to", "hf"])
        refusal = converted.exception
        stages["convert"] = isinstance(refusal, EngineError) and "does not convert" in str(refusal)
        version = open_version(root / "repo")
        graph = version.load("default", BackendOptions(intra_op_threads=1), backend=rec.BACKEND)
        arch = rec.RecordingClassifier()
        feeds = arch.example_inputs(arch.config_class(), batch=3, seq=5, past=0)
        logits = graph.run(feeds)["logits"]
        stages["runtime"] = logits.shape == (3, 5) and bool(np.isfinite(logits).all())
        version.close()
    finally:
        mp.undo()
    return set(rec.CALLS), stages


def test_the_pipeline_ran_every_stage(pipeline):
    _, stages = pipeline
    ran = ("train", "sample", "export", "int8", "convert", "runtime")
    assert stages == dict.fromkeys(ran, True)


@pytest.mark.parametrize("name", HOOKS)
def test_hook_documented_and_used(name, pipeline):
    calls, _ = pipeline
    assert (getattr(hookspecs, name).__doc__ or "").strip(), f"{name} has no docstring"
    assert f"`{name}(" in DOCS, f"{name} has no line in docs/plugins.md"
    assert f"hook.{name}" in calls, f"the engine never called {name}"
    used = {
        "engine_register_architectures": "arch.build_model",
        "engine_register_export_formats": "format.export",
        "engine_register_backends": "backend.run",
        "engine_register_hf_families": "family.converts",
    }
    assert name in used, f"{name}: say which call shows the engine used what the hook returned"
    assert used[name] in calls, f"the engine called {name} but never used what it returned"


@pytest.mark.parametrize("name", METHODS)
def test_architecture_method_documented_and_called(name, pipeline):
    calls, _ = pipeline
    assert (getattr(Architecture, name).__doc__ or "").strip(), f"{name} has no docstring"
    assert f"`{name}(" in DOCS, f"{name} has no line in docs/plugins.md"
    assert f"arch.{name}" in calls, f"the engine never called Architecture.{name}"


def test_hook_list_is_not_empty():
    assert len(HOOKS) >= 3 and len(METHODS) >= 15
