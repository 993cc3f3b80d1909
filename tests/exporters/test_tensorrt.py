"""TensorRT: profile shapes (pure, on CPU), the clear error without tensorrt/GPU, a GPU build."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from engine.architecture import ExportSignature, TensorSpec
from exporters.base import ExportOptions, TensorRTUnavailable
from exporters.tensorrt_build import profile_shapes, require_tensorrt
from tests.conftest import run_cli
from tests.runtime import conftest as runtime

# The runtime tests' session fixtures: the tiny decoder as ONNX and as a checkpoint (same weights)
lm_repo, lm_checkpoint = runtime.lm_repo, runtime.lm_checkpoint

H, D = 4, 8


def _decoder_signature(variant: str) -> ExportSignature:
    """The decoder-lm plugin's naming: total = past + new; a paged pool of 16-token blocks."""
    tokens = ("batch", "sequence")
    if variant == "default":
        inputs = (
            TensorSpec("input_ids", "int64", tokens),
            TensorSpec("position_ids", "int64", tokens),
            TensorSpec("attention_mask", "int64", ("batch", "total_sequence")),
            TensorSpec("past_key_values.0.key", "float32", ("batch", H, "past_sequence", D)),
        )
    else:
        inputs = (
            TensorSpec("input_ids", "int64", tokens),
            TensorSpec("causal_mask", "bool", ("batch", "sequence", "sequence")),
            TensorSpec("block_table", "int64", ("batch", "table_blocks")),
            TensorSpec("block_mask", "bool", ("batch", "table_blocks", 16)),
            TensorSpec("block_rows", "int64", ("pool_blocks",)),
            TensorSpec("block_weights", "float32", ("batch", "pool_blocks")),
            TensorSpec("cache.0.key", "float32", ("pool_blocks", H, 16, D)),
        )
    return ExportSignature(inputs, (TensorSpec("logits", "float32", ("batch", "sequence", 9)),))


def test_profiles_cover_prefill_decode_and_keep_sums_consistent():
    shapes = profile_shapes(_decoder_signature("default"), max_batch=16, max_seq=128)
    assert shapes["input_ids"] == ((1, 1), (8, 64), (16, 128))
    assert shapes["past_key_values.0.key"] == ((1, H, 0, D), (8, H, 64, D), (16, H, 128, D))
    # the mask spans past + new at every profile point, or the engine could not be built
    for k in range(3):
        total = shapes["attention_mask"][k][1]
        assert total == shapes["input_ids"][k][1] + shapes["past_key_values.0.key"][k][2]
    # paged: a row's table covers one context in blocks, the pool max_batch contexts
    inplace = profile_shapes(_decoder_signature("kv_inplace"), max_batch=4, max_seq=40)
    assert inplace["block_table"] == ((1, 1), (2, 2), (4, 3))
    assert inplace["block_rows"] == ((1,), (4,), (12,))
    assert inplace["cache.0.key"][2] == (12, H, 16, D)
    assert inplace["block_mask"] == ((1, 1, 16), (2, 2, 16), (4, 3, 16))
    assert inplace["block_weights"] == ((1, 1), (2, 4), (4, 12))
    assert inplace["causal_mask"] == ((1, 1, 1), (2, 20, 20), (4, 40, 40))


def test_profiles_of_fixed_and_summed_axes():
    sig = ExportSignature(
        (
            TensorSpec("z", "float32", ("batch", 16)),
            TensorSpec("mask", "int64", ("batch", "past_sequence + sequence")),
        ),
        (TensorSpec("images", "float32", ("batch", 1, 8, 8)),),
    )
    shapes = profile_shapes(sig, max_batch=1, max_seq=10)
    assert shapes["z"] == ((1, 16), (1, 16), (1, 16))
    assert shapes["mask"] == ((1, 1), (1, 10), (1, 20))
    gan = ExportSignature((TensorSpec("z", "float32", ("batch", 16)),), ())
    assert profile_shapes(gan, max_batch=8, max_seq=None)["z"][2] == (8, 16)
    with pytest.raises(ValueError, match="--max-seq"):
        profile_shapes(_decoder_signature("default"), max_batch=8, max_seq=None)
    with pytest.raises(ValueError, match="max_batch"):
        profile_shapes(gan, max_batch=0, max_seq=None)


def _have_tensorrt_and_gpu() -> bool:
    try:
        require_tensorrt()
    except TensorRTUnavailable:
        return False
    return True


@pytest.mark.skipif(_have_tensorrt_and_gpu(), reason="TensorRT and a GPU are present here")
def test_missing_tensorrt_or_gpu_says_which_and_how_to_install():
    with pytest.raises(TensorRTUnavailable) as info:
        require_tensorrt()
    message = str(info.value)
    if importlib.util.find_spec("tensorrt") is None:
        assert "'tensorrt' Python package is not installed" in message
    assert "pip install -e '.[gpu]'" in message


@pytest.mark.skipif(_have_tensorrt_and_gpu(), reason="TensorRT and a GPU are present here")
def test_cli_tensorrt_export_fails_cleanly_and_writes_nothing(tiny_ckpt, tmp_path):
    repo = tmp_path / "repo"
    result = run_cli(
        "export",
        str(tiny_ckpt),
        "--repo",
        str(repo),
        "--format",
        "tensorrt",
        "--no-progress",
        env={"ENGINE_PLUGINS": "tests.exporters.tiny_arch"},
    )
    assert result.returncode == 2, result.stderr
    assert "TensorRT" in result.stderr and "gpu extra" in result.stderr
    assert "pip install -e" in result.stderr
    assert "Traceback" not in result.stderr
    assert not repo.exists()


@pytest.mark.gpu
@pytest.mark.skipif(not _have_tensorrt_and_gpu(), reason="needs the tensorrt package and a GPU")
def test_engine_matches_onnx_outputs(tiny_ckpt, tmp_path):
    from engine.graph_decoder import ort_runner
    from engine.plugins import export_formats
    from engine.repository import TIMING_CACHE, read_manifest, verify_files
    from exporters.tensorrt_build import EngineRunner
    from exporters.validate import ort_session
    from tests.exporters.tiny_arch import TinyClassifier, TinyConfig

    fmt = export_formats()["tensorrt"]
    vdir = fmt.export(tiny_ckpt, tmp_path, ExportOptions(max_batch=4, max_seq=16, progress=False))
    manifest = verify_files(vdir).to_dict()
    engine = manifest["tensorrt"]["engines"]["default"]
    assert engine["file"] == "model.plan" and engine["profile"]["input_ids"]["max"] == [4, 16]
    assert engine["validation"]["max_abs_diff_vs_onnx"]["logits"] < 1e-2
    assert (tmp_path / vdir.parent.name / TIMING_CACHE).exists()
    arch, config = TinyClassifier(), TinyConfig()
    feeds = arch.example_inputs(config, 3, 9, 0, seed=5)
    got = EngineRunner((vdir / "model.plan").read_bytes())(feeds)["logits"]
    ref = ort_runner(ort_session(vdir / "model.onnx"))(feeds)["logits"]
    np.testing.assert_allclose(got, ref, atol=1e-2, rtol=1e-2)
    assert read_manifest(vdir).format == "tensorrt"


# -- the build logic against a stand-in for the tensorrt module (no GPU here) ---------------
class _FakeTensorRT:
    """Records what build_engine asks of the TensorRT 10 Python API."""

    __version__ = "10.fake"

    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 5

    class BuilderFlag:
        FP16 = 0
        TF32 = 7

    class MemoryPoolType:
        WORKSPACE = 0

    def __init__(self, parse_ok=True):
        self.calls = {"shapes": {}, "flags": None, "pool": None, "builder_flags": [], "cleared": []}
        self.parse_ok = parse_ok
        fake = self

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                fake.calls["flags"] = flags
                return "network"

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"PLAN"

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                fake.calls["shapes"][name] = (tuple(lo), tuple(opt), tuple(hi))

        class Cache:
            def __init__(self, data):
                self.data = data

            def serialize(self):
                return self.data + b"+timed"

        class Config:
            def set_memory_pool_limit(self, pool, size):
                fake.calls["pool"] = (pool, size)

            def set_flag(self, flag):
                fake.calls["builder_flags"].append(flag)

            def clear_flag(self, flag):
                fake.calls["cleared"].append(flag)

            def add_optimization_profile(self, profile):
                pass

            def create_timing_cache(self, data):
                return Cache(bytes(data))

            def set_timing_cache(self, cache, ignore_mismatch):
                self.cache = cache

            def get_timing_cache(self):
                return self.cache

        class OnnxParser:
            num_errors = 1

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                return fake.parse_ok

            def get_error(self, i):
                return "unsupported op Foo"

        self.Builder, self.OnnxParser = Builder, OnnxParser


@pytest.fixture()
def fake_trt(monkeypatch):
    import sys

    from exporters import tensorrt_build

    fake = _FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(tensorrt_build, "require_tensorrt", lambda: fake)
    monkeypatch.setattr("torch.cuda.get_device_name", lambda *a: "Fake GPU")
    return fake


def test_build_engine_sets_profiles_precision_workspace_and_timing_cache(fake_trt, tmp_path):
    from exporters.base import TensorRTBuildFailed
    from exporters.tensorrt_build import WORKSPACE_BYTES, build_engine

    sig = _decoder_signature("default")
    entry, cache = build_engine(
        tmp_path / "model.onnx",
        tmp_path / "model.plan",
        sig,
        max_batch=8,
        max_seq=64,
        fp16=True,
        timing_cache=b"old",
    )
    assert (tmp_path / "model.plan").read_bytes() == b"PLAN" and cache == b"old+timed"
    assert fake_trt.calls["flags"] == 1 << 5  # strongly typed, no FP16 builder flag
    assert fake_trt.calls["builder_flags"] == []
    assert fake_trt.calls["pool"] == (0, WORKSPACE_BYTES)
    assert fake_trt.calls["shapes"] == profile_shapes(sig, 8, 64)
    assert entry["precision"] == "fp16 (strongly typed network)"
    assert entry["profile"]["input_ids"] == {"min": [1, 1], "opt": [4, 32], "max": [8, 64]}

    del _FakeTensorRT.NetworkDefinitionCreationFlag.STRONGLY_TYPED  # an older TensorRT
    try:
        entry, _ = build_engine(
            tmp_path / "m.onnx", tmp_path / "m.plan", sig, max_batch=8, max_seq=64, fp16=True
        )
    finally:
        _FakeTensorRT.NetworkDefinitionCreationFlag.STRONGLY_TYPED = 5
    assert fake_trt.calls["builder_flags"] == [0] and entry["precision"].endswith("FP16)")

    entry, _ = build_engine(
        tmp_path / "m.onnx", tmp_path / "m.plan", sig, max_batch=8, max_seq=64, fp16=False
    )
    assert fake_trt.calls["cleared"] == [7] and entry["precision"] == "fp32 (TF32 off)"
    assert fake_trt.calls["flags"] == 0  # no strongly typed network for fp32

    fake_trt.parse_ok = False
    with pytest.raises(TensorRTBuildFailed, match="unsupported op Foo"):
        build_engine(
            tmp_path / "m.onnx", tmp_path / "m.plan", sig, max_batch=8, max_seq=64, fp16=False
        )


def test_tensorrt_format_writes_engines_and_keeps_the_timing_cache(
    fake_trt, tiny_ckpt, tmp_path, monkeypatch
):
    from engine.plugins import export_formats
    from engine.repository import TIMING_CACHE, verify_files
    from exporters import tensorrt_build

    monkeypatch.setenv("ENGINE_ONNX_EXPORTER", "torchscript")
    monkeypatch.setattr(tensorrt_build, "compare_with_onnx", lambda *a: {"max_abs_diff": 0.0})
    fmt = export_formats()["tensorrt"]
    vdir = fmt.export(tiny_ckpt, tmp_path, ExportOptions(max_batch=4, max_seq=16, progress=False))
    manifest = verify_files(vdir).to_dict()
    assert manifest["format"] == "tensorrt"
    assert [f["path"] for f in manifest["files"]] == ["model.onnx", "model.plan", "tokenizer.json"]
    engines = manifest["tensorrt"]["engines"]
    assert engines["default"]["profile"]["input_ids"]["max"] == [4, 16]
    assert engines["default"]["validation"] == {"max_abs_diff": 0.0}
    assert (vdir.parent / TIMING_CACHE).read_bytes() == b"+timed"
    fmt.export(
        tiny_ckpt, tmp_path, ExportOptions(max_batch=4, max_seq=16, progress=False, validate=False)
    )
    assert (vdir.parent / TIMING_CACHE).read_bytes() == b"+timed+timed"  # reused, extended


# -- validation of a built engine, with onnxruntime standing in for it ------------------------
class _OnnxAsEngine:
    """Stands in for EngineRunner: runs the ONNX graph itself, then ``tamper`` with the outputs."""

    def __init__(self, onnx_path, tamper=None):
        from engine.graph_decoder import ort_runner
        from exporters.validate import ort_session

        self.run, self.tamper, self.calls = ort_runner(ort_session(onnx_path)), tamper, 0

    def __call__(self, feeds):
        out = self.run(feeds)
        self.calls += 1
        return self.tamper(out, self.calls) if self.tamper else out


@pytest.fixture(scope="module")
def tiny_lm(lm_repo, lm_checkpoint):
    """The runtime tests' tiny decoder: arch, config and the paths of its two ONNX graphs."""
    from engine import checkpoint
    from engine.runtime.loader import open_version

    arch, config, _ = checkpoint.load(lm_checkpoint)
    mv = open_version(lm_repo, "tiny-lm")
    graphs = {v: mv.path / mv.graph(v)["file"] for v in ("default", "kv_inplace")}
    return arch, config, graphs


def _validate(monkeypatch, tiny_lm, variant, fp16, tamper=None):
    from exporters import tensorrt_build

    arch, config, graphs = tiny_lm
    engine = _OnnxAsEngine(graphs[variant], tamper)
    monkeypatch.setattr(tensorrt_build, "EngineRunner", lambda plan: engine)
    check = (graphs[variant], arch, config, variant, 4, 32, fp16)
    values = tensorrt_build.compare_with_onnx(b"plan", *check)
    return values, tensorrt_build.greedy_check(b"plan", *check)


@pytest.mark.parametrize("variant", ["default", "kv_inplace"])
def test_an_engine_that_matches_onnx_passes_both_checks_in_fp32(monkeypatch, tiny_lm, variant):
    arch, config, _ = tiny_lm
    sig = arch.export_signature(config, variant)
    values, greedy = _validate(monkeypatch, tiny_lm, variant, fp16=False)
    assert values["tolerance"] == {"atol": sig.atol, "rtol": sig.rtol, "precision": "fp32"}
    assert greedy["identical_prompts"] == greedy["prompts"] == 8 and greedy["new_tokens"] == 16


def test_fp32_engines_are_held_to_fp32_tolerances_not_fp16(monkeypatch, tiny_lm):
    from exporters.base import ValuesMismatch

    arch, config, _ = tiny_lm
    sig = arch.export_signature(config, "default")
    # 10x fp32's atol, a tenth of fp16's: logits near 0 (of 8192, some are) fail fp32 only
    shift = np.float32(10 * sig.atol)
    assert shift <= sig.fp16_atol / 10

    def off(out, call):
        return {k: v + shift if k == "logits" else v for k, v in out.items()}

    values, _ = _validate(monkeypatch, tiny_lm, "default", True, off)
    assert values["tolerance"]["precision"] == "fp16"
    with pytest.raises(ValuesMismatch, match=rf"tolerance atol {sig.atol:g}, .*, fp32\)"):
        _validate(monkeypatch, tiny_lm, "default", False, off)


def test_greedy_tokens_through_the_engine_must_equal_onnxruntimes(monkeypatch, tiny_lm):
    from exporters.base import AgreementTooLow, GreedyMismatch
    from exporters.tensorrt_build import greedy_check

    arch, config, graphs = tiny_lm

    def prefer_token_7(out, call):  # values barely move; one token's logit wins every step
        logits = out["logits"].copy()
        logits[..., 7] = logits.max() + 1.0
        return {**out, "logits": logits}

    def engine(tamper):
        return lambda plan: _OnnxAsEngine(graphs["kv_inplace"], tamper)

    monkeypatch.setattr("exporters.tensorrt_build.EngineRunner", engine(prefer_token_7))
    check = (graphs["kv_inplace"], arch, config, "kv_inplace", 4, 32)
    with pytest.raises(GreedyMismatch, match=r"\(fp32\): greedy tokens differ .* on 8 of 8"):
        greedy_check(b"plan", *check, False)
    with pytest.raises(AgreementTooLow, match="teacher-forced top-1 agreement"):
        greedy_check(b"plan", *check, True)
    monkeypatch.setattr("exporters.tensorrt_build.EngineRunner", engine(None))
    assert greedy_check(b"plan", *check, True)["teacher_forced_top1"] == 1.0


def test_greedy_check_is_for_generate_models_only(tiny_ckpt):
    from engine import checkpoint
    from exporters.tensorrt_build import greedy_check

    arch, config, _ = checkpoint.load(tiny_ckpt)
    assert greedy_check(b"plan", Path("unused.onnx"), arch, config, "default", 4, 16, False) is None
