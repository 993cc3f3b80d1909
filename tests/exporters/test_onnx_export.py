"""ONNX export of a tiny test architecture: the repository it writes and every validation error."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest

from engine import checkpoint
from engine.plugins import export_formats
from engine.repository import read_manifest, verify_files, versions
from exporters import validate as validate_mod
from exporters.base import (
    ExportError,
    ExportOptions,
    OutputNamesMismatch,
    ShapeMismatch,
    TraceFailed,
    UnknownTask,
    ValuesMismatch,
)
from exporters.onnx_graph import EXPORTER_ENV
from exporters.validate import validate_export
from tests.conftest import run_cli
from tests.exporters.tiny_arch import NAME


@pytest.fixture()
def fast_exporter(monkeypatch):
    """Trace with the TorchScript exporter: the dynamo path is covered by the round trips."""
    monkeypatch.setenv(EXPORTER_ENV, "torchscript")


def _export(ckpt, repo, **kwargs):
    return export_formats()["onnx"].export(ckpt, repo, ExportOptions(progress=False, **kwargs))


def test_export_writes_a_complete_version(tiny_ckpt, tmp_path):
    vdir = _export(tiny_ckpt, tmp_path / "repo")  # the default path: dynamo first
    assert vdir == tmp_path / "repo" / NAME / "1"
    manifest = verify_files(vdir).to_dict()
    assert manifest["architecture"] == NAME and manifest["task"] == "classify"
    assert manifest["format"] == "onnx" and manifest["precision"] == "fp32"
    assert manifest["plugin"]["name"] == "tests.exporters.tiny_arch"
    assert {"torch", "onnx", "onnxruntime"} <= set(manifest["libraries"])
    graph = manifest["graphs"]["default"]
    assert graph["file"] == "model.onnx" and graph["exporter"] == "dynamo"
    assert graph["inputs"][0] == {
        "name": "input_ids",
        "dtype": "int64",
        "shape": ["batch", "sequence"],
    }
    assert graph["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", 5]}]
    assert manifest["serving"]["labels"][0] == "class0"
    validation = manifest["validation"]
    assert (
        validation["validated"] and validation["task"]["graphs"]["default"]["label_agreement"] == 1
    )
    assert validation["graphs"]["default"]["values"]["max_abs_diff"]["logits"] < 1e-4
    assert [f["path"] for f in manifest["files"]] == ["model.onnx", "tokenizer.json"]
    assert {"trace default", "validate default", "validate classify default"} <= set(
        manifest["timings_s"]
    )


def test_versions_count_up_and_force_replaces_the_latest(tiny_ckpt, tmp_path, fast_exporter):
    repo = tmp_path / "repo"
    assert _export(tiny_ckpt, repo, name="m").name == "1"
    second = _export(tiny_ckpt, repo, name="m", validate=False)
    assert second.name == "2" and versions(repo, "m") == [1, 2]
    assert read_manifest(second).validation == {
        "validated": False,
        "reason": "skipped with --no-validate",
    }
    (second / "stray.txt").write_text("from before --force")
    forced = _export(tiny_ckpt, repo, name="m", force=True)
    assert forced == second and versions(repo, "m") == [1, 2]
    assert not (second / "stray.txt").exists() and read_manifest(second).validation["validated"]


def test_an_interrupted_export_leaves_nothing(tiny_ckpt, tmp_path, fast_exporter, monkeypatch):
    repo = tmp_path / "repo"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(validate_mod, "validate_export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _export(tiny_ckpt, repo)
    assert not repo.exists()
    monkeypatch.undo()
    monkeypatch.setenv(EXPORTER_ENV, "torchscript")
    _export(tiny_ckpt, repo)
    monkeypatch.setattr(validate_mod, "validate_export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _export(tiny_ckpt, repo)
    assert sorted(p.name for p in (repo / NAME).iterdir()) == ["1"]


def test_a_module_no_exporter_can_trace_fails_with_both_reasons(tiny_ckpt, tmp_path, monkeypatch):
    from exporters import onnx_graph

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported op")

    monkeypatch.setattr(onnx_graph, "_export_dynamo", broken)
    monkeypatch.setattr(onnx_graph, "_export_torchscript", broken)
    with pytest.raises(TraceFailed, match="dynamo: RuntimeError.*torchscript: RuntimeError"):
        _export(tiny_ckpt, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()
    monkeypatch.setenv(EXPORTER_ENV, "tflite")
    with pytest.raises(TraceFailed, match="auto, dynamo or torchscript"):
        _export(tiny_ckpt, tmp_path / "repo")


# -- every validation failure mode ----------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tiny_ckpt, tmp_path_factory):
    """One fp32 export of the tiny classifier plus the loaded checkpoint to validate against."""
    mp = pytest.MonkeyPatch()
    mp.setenv(EXPORTER_ENV, "torchscript")
    vdir = _export(tiny_ckpt, tmp_path_factory.mktemp("repo"))
    mp.undo()
    arch, config, model = checkpoint.load(tiny_ckpt)
    return vdir, arch, config, model


def _corrupt(vdir, tmp_path, edit) -> dict:
    path = tmp_path / "model.onnx"
    model = onnx.load(str(vdir / "model.onnx"))
    edit(model.graph)
    onnx.save(model, str(path))
    return {"default": path}


def test_renamed_output_fails_the_names_step(exported, tmp_path):
    vdir, arch, config, model = exported

    def rename(graph):
        old = graph.output[0].name
        graph.output[0].name = "scores"
        for node in graph.node:
            node.output[:] = ["scores" if o == old else o for o in node.output]

    with pytest.raises(
        OutputNamesMismatch, match="missing \\['logits'\\], unexpected \\['scores'\\]"
    ):
        validate_export(arch, config, model, vdir, _corrupt(vdir, tmp_path, rename), fp16=False)


def test_wrong_output_width_fails_the_shapes_step(exported, tmp_path):
    vdir, arch, config, model = exported

    def widen(graph):  # logits -> concat(logits, logits): (batch, 10) instead of (batch, 5)
        graph.output[0].name, old = "logits", graph.output[0].name
        for node in graph.node:
            node.output[:] = ["raw" if o == old else o for o in node.output]
        graph.node.append(onnx.helper.make_node("Concat", ["raw", "raw"], [old], axis=1))
        del graph.output[0].type.tensor_type.shape.dim[:]

    with pytest.raises(ShapeMismatch, match="ONNX shape \\(1, 10\\), PyTorch \\(1, 5\\)"):
        validate_export(arch, config, model, vdir, _corrupt(vdir, tmp_path, widen), fp16=False)


def test_signature_that_declares_the_wrong_width_fails_the_shapes_step(
    train_tiny, tmp_path, fast_exporter
):
    ckpt = train_tiny(declared_classes=7)
    with pytest.raises(ShapeMismatch, match="signature .*'batch', 7"):
        _export(ckpt, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_corrupted_weights_fail_the_values_step(exported, tmp_path):
    vdir, arch, config, model = exported

    def perturb(graph):
        weight = max(graph.initializer, key=lambda t: np.prod(t.dims))
        array = onnx.numpy_helper.to_array(weight)
        array = array + np.random.default_rng(0).normal(0, 0.1, array.shape)  # LayerNorm-proof
        weight.CopyFrom(onnx.numpy_helper.from_array(array.astype(np.float32), weight.name))

    with pytest.raises(ValuesMismatch, match="output 'logits'.*exceeds atol=0.0001"):
        validate_export(arch, config, model, vdir, _corrupt(vdir, tmp_path, perturb), fp16=False)


def test_an_unknown_task_fails_validation_instead_of_skipping_it(exported, monkeypatch):
    vdir, arch, config, model = exported
    monkeypatch.setattr(arch, "task", "translate")
    with pytest.raises(UnknownTask, match="task 'translate', which has no task-level check"):
        validate_export(arch, config, model, vdir, {"default": vdir / "model.onnx"}, fp16=False)


def test_a_wrong_fp16_tolerance_fails_the_values_step(train_tiny, tmp_path, fast_exporter):
    ckpt = train_tiny(fp16_atol=1e-7, fp16_rtol=0.0)
    with pytest.raises(ValuesMismatch, match="atol=1e-07"):
        _export(ckpt, tmp_path / "repo", fp16=True)
    assert not (tmp_path / "repo").exists()


def test_missing_artifact_fails_before_tracing(exported, tmp_path, monkeypatch):
    vdir, arch, config, model = exported
    from exporters.base import ExportOptions
    from exporters.onnx_export import export_model

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    monkeypatch.setattr(type(arch), "artifact_files", lambda self, d: [d / "tokenizer.json"])
    options = ExportOptions(progress=False)
    with pytest.raises(ExportError, match="lacks .*tokenizer.json"):
        export_model(arch, config, model, ckpt, tmp_path / "repo", "m", options)
    assert not (tmp_path / "repo").exists()


def test_cli_export_prints_the_version_directory(tiny_ckpt, tmp_path):
    repo = tmp_path / "repo"
    env = {"ENGINE_PLUGINS": "tests.exporters.tiny_arch", EXPORTER_ENV: "torchscript"}
    args = ["export", str(tiny_ckpt), "--repo", str(repo), "--name", "cli-model", "--no-progress"]
    result = run_cli(*args, env=env)
    assert result.returncode == 0, result.stderr
    assert "cli-model/1" in result.stdout.replace("\n", "")
    manifest = json.loads((repo / "cli-model" / "1" / "manifest.json").read_text())
    assert manifest["name"] == "cli-model" and manifest["export_options"]["max_batch"] == 16


def test_cli_export_prints_only_its_own_lines(tiny_ckpt, tmp_path):
    """The dynamo exporter's own log lines (``W1130 ... torchvision is not installed``) stay out."""
    env = {"ENGINE_PLUGINS": "tests.exporters.tiny_arch", EXPORTER_ENV: "dynamo"}
    result = run_cli("export", str(tiny_ckpt), "--repo", str(tmp_path / "repo"), env=env)
    assert result.returncode == 0, result.stderr
    manifest = json.loads(next((tmp_path / "repo").glob("*/1/manifest.json")).read_text())
    assert manifest["graphs"]["default"]["exporter"] == "dynamo"
    output = result.stdout + result.stderr
    assert not re.search(r"^[IWEF]\d{4} ", output, re.M), output  # torch's glog-style lines
    assert "torchvision" not in output and "Warning" not in output, output
    # on a pipe each stage prints a tick line when it ends (no spinner can redraw there)
    ticks = [line.split("  ")[0] for line in result.stderr.splitlines() if line.startswith("✓")]
    assert ticks[:3] == ["✓ load model", "✓ trace default", "✓ optimize default"], ticks
    assert ticks[-1] == "✓ write"
