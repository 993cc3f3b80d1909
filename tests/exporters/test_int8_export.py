"""``engine export --int8``: quantized graphs, the tied embedding stored once, held-out floors."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch

from engine import checkpoint
from engine.graph_decoder import ort_runner, torch_runner
from engine.plugins import export_formats
from engine.repository import verify_files
from exporters import onnx_export
from exporters.base import ExportError, ExportOptions, QuantizedAccuracyTooLow, ValidationError
from exporters.quantize import QuantScheme, quantize_graph
from exporters.validate import ort_session
from exporters.validate_quantized import check_quantized
from tests.exporters.test_roundtrip import TINY


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The round-trip tests' tiny decoder and classifier, trained once for this module."""
    from engine.trainer import train

    made = {}

    def get(name: str):
        if name not in made:
            torch.manual_seed(0)
            out = tmp_path_factory.mktemp(name) / "ckpt"
            made[name] = train(name, out, overrides=TINY[name], progress=False)
        return made[name]

    return get


@pytest.fixture(scope="module")
def int8_exports(checkpoints, tmp_path_factory):
    """Export each architecture once with ``--int8``; return its version directory."""
    repo = tmp_path_factory.mktemp("repo")
    done = {}

    def get(name: str):
        if name not in done:
            options = ExportOptions(int8=True, progress=False)
            done[name] = export_formats()["onnx"].export(checkpoints(name), repo, options)
        return done[name]

    return get


def _weights_left_fp32(path) -> list[str]:
    """MatMuls/Gemms that still read a float32 weight, Gathers a float32 vocabulary-sized table.

    Position tables (a context's worth of rows) stay fp32, as llama.cpp keeps them, and so do
    weights narrower than one quantization block (a classifier's label head).
    """
    graph = onnx.load(str(path)).graph
    floats = {
        t.name: list(t.dims) or [1]
        for t in graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT
    }
    block = QuantScheme().block_size
    return [
        n.name
        for n in graph.node
        if (n.op_type == "MatMul" and n.input[1] in floats)
        or (n.op_type == "Gemm" and min(floats.get(n.input[1], [0])) >= block)
        or (
            n.op_type == "Gather"
            and floats.get(n.input[0], [0])[0] >= QuantScheme().min_gather_rows
        )
    ]


@pytest.mark.parametrize("name", ["decoder-lm", "text-classifier"])
def test_int8_export_is_smaller_validated_on_heldout_data_and_served(int8_exports, name):
    vdir = int8_exports(name)
    manifest = verify_files(vdir)
    assert manifest.precision == "int8" and "MatMulNBits" in manifest.sections["precision_note"]
    for variant, graph in manifest.graphs.items():
        q = graph["int8"]
        assert q["bits"] == 8 and q["matmuls_quantized"] > 0
        assert not _weights_left_fp32(vdir / graph["file"]), variant
        assert q["bytes_int8"] < 0.4 * q["bytes_fp32"], q  # 4-byte weights became ~1.1 bytes
        if name == "decoder-lm":  # the tied table is stored once, as the head's 8-bit weights
            assert [g["shared_with_head"] for g in q["gathers"]] == [True]
    task = manifest.validation["task"]
    assert manifest.validation["precision"] == "int8"
    for entry in task["graphs"].values():
        if name == "decoder-lm":
            assert task["heldout_positions"] >= 2000
            assert entry["top1_agreement"] >= 0.98 and entry["ce_increase"] <= 0.05
        else:
            assert task["heldout_rows"] >= 50 and entry["accuracy_drop"] <= 0.01


def test_int8_lm_serves_tokens_close_to_fp32(int8_exports, checkpoints):
    from engine.runtime import Engine, SamplingParams

    vdir = int8_exports("decoder-lm")
    engine = Engine.from_repository(vdir.parent.parent, vdir.parent.name, threads=1)
    arch, config, model = checkpoint.load(checkpoints("decoder-lm"))
    prompts = [[5, 6, 7, 8], [100, 200, 300], [42] * 9]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    got = [o.token_ids for o in engine.generate_all(prompts, params)]
    with torch.no_grad():
        for prompt, tokens in zip(prompts, got):
            ids = torch.tensor([prompt + tokens])
            ref = model(ids)[0][0, len(prompt) - 1 : -1].argmax(-1).tolist()  # teacher-forced
            assert np.mean(np.array(ref) == np.array(tokens)) >= 0.8


def test_a_lossy_scheme_fails_the_floors_and_nothing_lands(checkpoints, tmp_path, monkeypatch):
    lossy = functools.partial(quantize_graph, scheme=QuantScheme(bits=2, block_size=64))
    monkeypatch.setattr(onnx_export, "quantize_graph", lossy)
    repo = tmp_path / "repo"
    with pytest.raises(QuantizedAccuracyTooLow, match="top-1 agreement with fp32"):
        export_formats()["onnx"].export(
            checkpoints("decoder-lm"), repo, ExportOptions(int8=True, progress=False)
        )
    assert not list(repo.rglob("*.onnx")) and not list(repo.rglob("manifest.json"))


def _graphs(arch, config, model, vdir):
    graphs = {}
    for variant in arch.export_variants(config):
        signature = arch.export_signature(config, variant)
        file = "model.onnx" if variant == "default" else f"{variant}.onnx"
        graphs[variant] = {
            "signature": signature,
            "onnx": ort_runner(ort_session(vdir / file)),
            "torch": torch_runner(arch.export_module(model, config, variant).eval(), signature),
        }
    return graphs


def test_noisy_lm_logits_fail_the_agreement_floor(int8_exports, checkpoints):
    ckpt = checkpoints("decoder-lm")
    arch, config, model = checkpoint.load(ckpt)
    graphs = _graphs(arch, config, model, int8_exports("decoder-lm"))
    good, rng = graphs["kv_inplace"]["onnx"], np.random.default_rng(0)

    def noisy(feeds):
        out = good(feeds)
        out["logits"] = out["logits"] + rng.normal(0, 1.0, out["logits"].shape).astype(np.float32)
        return out

    graphs["kv_inplace"]["onnx"] = noisy
    with pytest.raises(QuantizedAccuracyTooLow, match="'kv_inplace'.*held-out positions"):
        check_quantized(arch, config, ckpt, graphs)


def test_a_classifier_two_points_worse_fails_the_accuracy_floor(int8_exports, checkpoints):
    ckpt = checkpoints("text-classifier")
    arch, config, model = checkpoint.load(ckpt)
    graphs = _graphs(arch, config, model, int8_exports("text-classifier"))
    feeds, labels = arch.heldout_examples(config, ckpt)
    good, calls = graphs["default"]["onnx"], []
    wrong = int(np.ceil(0.02 * len(labels)))  # right rows made wrong in the first chunk

    def worse(chunk):
        out = good(chunk)
        if not calls:
            right = np.flatnonzero(out["logits"].argmax(-1) == labels[: len(out["logits"])])
            assert len(right) >= wrong, "the tiny model gets too few of the first rows right"
            rows = right[:wrong]
            out["logits"][rows] = -1e3
            out["logits"][rows, (labels[rows] + 1) % out["logits"].shape[1]] = 1e3
        calls.append(1)
        return out

    graphs["default"]["onnx"] = worse
    with pytest.raises(QuantizedAccuracyTooLow, match="held-out accuracy .* drop of"):
        check_quantized(arch, config, ckpt, graphs)


def test_int8_is_refused_where_it_cannot_be_checked_or_served():
    lm = SimpleNamespace(name="decoder-lm", task="generate")
    gan = SimpleNamespace(name="gan-generator", task="sample_images")
    int8 = ExportOptions(int8=True)
    with pytest.raises(ExportError, match="exclude each other"):
        onnx_export._check_precision(lm, ExportOptions(int8=True, fp16=True), None)
    with pytest.raises(ExportError, match="tensorrt cannot build"):
        onnx_export._check_precision(lm, int8, SimpleNamespace(name="tensorrt"))
    with pytest.raises(ExportError, match="gan-generator is a sample_images model"):
        onnx_export._check_precision(gan, int8, None)
    onnx_export._check_precision(lm, int8, None)  # the supported case passes


def test_an_architecture_without_heldout_examples_cannot_be_validated(tiny_ckpt, tmp_path):
    with pytest.raises(ValidationError, match="no held-out examples"):
        export_formats()["onnx"].export(
            tiny_ckpt, tmp_path / "repo", ExportOptions(int8=True, progress=False)
        )
    assert not list((tmp_path / "repo").rglob("manifest.json"))


def test_torch_format_refuses_int8(checkpoints, tmp_path):
    with pytest.raises(ExportError, match="--int8 is an ONNX export"):
        export_formats()["torch"].export(
            checkpoints("decoder-lm"), tmp_path, ExportOptions(int8=True, progress=False)
        )
