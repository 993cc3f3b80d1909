"""Backends: registration, device choice, IOBinding, and TensorRT (a clear error, or a GPU run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from engine.paged_inputs import paged_inputs
from engine.runtime import backends
from engine.runtime.backends import BackendOptions, OnnxRuntimeBackend
from engine.runtime.errors import BackendUnavailableError
from engine.runtime.loader import open_version
from engine.runtime.tensorrt_backend import unavailable_reason
from exporters.base import ExportOptions
from tests.runtime.conftest import MODEL

ROOT = Path(__file__).resolve().parents[2]


def test_builtin_backends_register_through_the_hook():
    names = {f.name for f in backends.engine_register_backends()}
    assert names == {"onnxruntime", "tensorrt"}
    assert {"onnxruntime", "tensorrt"} <= set(backends.registered_backends())
    with pytest.raises(BackendUnavailableError, match="known: "):
        backends.get_backend_factory("no-such-backend")


def test_devices_map_to_provider_lists_and_missing_ones_say_what_to_install():
    import onnxruntime as ort

    assert backends.onnxruntime_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(BackendUnavailableError, match="unknown device"):
        backends.onnxruntime_providers("tpu")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(BackendUnavailableError, match="onnxruntime-gpu"):
            backends.onnxruntime_providers("cuda")


@pytest.fixture(scope="module")
def inplace_graph(lm_repo):
    mv = open_version(lm_repo, MODEL)
    return mv, mv.path / mv.graph("kv_inplace")["file"]


def _feeds(batch: int = 3, blocks: int = 2, heads: int = 2, dim: int = 32, layers: int = 2):
    """A decode step of the paged graph: each row's 20 cached tokens in two pool blocks."""
    rng = np.random.default_rng(0)
    table = np.arange(batch * blocks).reshape(batch, blocks)
    owner, index = np.repeat(np.arange(batch), blocks), np.tile(np.arange(blocks), batch)
    feeds = {
        "input_ids": rng.integers(4, 8000, (batch, 1)),
        "position_ids": np.full((batch, 1), 20),
        **paged_inputs(np.ones((batch, 1)), np.full(batch, 20), table, owner, index, 16),
    }
    for i in range(layers):
        for part in ("key", "value"):
            shape = (batch * blocks, heads, 16, dim)
            feeds[f"cache.{i}.{part}"] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def test_io_binding_writes_into_the_given_arrays_and_matches_a_plain_run(inplace_graph):
    _, path = inplace_graph
    backend = OnnxRuntimeBackend(path, BackendOptions(intra_op_threads=1, spin=False))
    assert backend.session.get_session_options().intra_op_num_threads == 1
    feeds = _feeds()
    plain = backend.run(feeds)
    out = {name: np.full_like(a, np.nan) for name, a in plain.items()}
    bound = backend.run(feeds, out)
    assert all(bound[n] is out[n] for n in out)  # filled in place, no new arrays
    for name in plain:
        np.testing.assert_allclose(out[name], plain[name], rtol=1e-6, atol=1e-6)


def test_tensorrt_without_tensorrt_or_a_gpu_fails_with_a_clear_message(inplace_graph):
    if unavailable_reason() is None:
        pytest.skip("TensorRT and a GPU are present")
    mv, _ = inplace_graph
    with pytest.raises(BackendUnavailableError, match="tensorrt|TensorRT"):
        mv.load("kv_inplace", BackendOptions(device="tensorrt"), backend="tensorrt")


@pytest.mark.gpu
def test_a_tensorrt_plan_runs_natively_and_matches_onnxruntime(tmp_path):
    """Needs the gpu extra and a CUDA GPU: export the tiny LM as TensorRT and run its plan."""
    if unavailable_reason() is not None:
        pytest.skip(unavailable_reason())
    from engine.runtime.tensorrt_backend import TensorRTBackend
    from engine.trainer import train
    from exporters.tensorrt_format import TensorRTFormat
    from tests.runtime.conftest import TINY

    ckpt = train("decoder-lm", tmp_path / "ckpt", steps=1, overrides=TINY, progress=False)
    version = TensorRTFormat().export(
        ckpt, tmp_path / "repo", ExportOptions(name=MODEL, progress=False)
    )
    mv = open_version(tmp_path / "repo", MODEL)
    plan = TensorRTBackend(
        version / mv.manifest.sections["tensorrt"]["engines"]["kv_inplace"]["file"]
    )
    onnx = OnnxRuntimeBackend(version / mv.graph("kv_inplace")["file"], BackendOptions())
    feeds = _feeds()
    got, ref = plan.run(feeds), onnx.run(feeds)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], atol=5e-2, rtol=5e-2)
    plan.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_a_shared_thread_pool_gives_three_sessions_one_worker_in_all(inplace_graph):
    """With pools of their own, each 2-thread session adds a worker thread; after
    share_thread_pool(2) the second and third sessions add none. Outputs do not change."""
    _, path = inplace_graph
    script = textwrap.dedent(
        f"""
        import json, os, sys
        import numpy as np
        from engine.runtime import backends
        from tests.runtime.test_backends import _feeds

        def threads():
            return len(os.listdir("/proc/self/task"))

        def session(n):
            options = backends.BackendOptions(intra_op_threads=n)
            return backends.OnnxRuntimeBackend({str(path)!r}, options)

        feeds, counts, sessions = _feeds(), [], []
        if sys.argv[1] == "shared":
            backends.share_thread_pool(2)
        for _ in range(3):
            sessions.append(session(2))  # kept alive: a freed session takes its pool along
            counts.append(threads())
        outs = [s.run(feeds)["logits"] for s in sessions]
        same = all(np.allclose(o, outs[0], atol=1e-5) for o in outs)
        print(json.dumps({{"threads": counts, "same": bool(same)}}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    added = {}
    for mode in ("own", "shared"):
        done = subprocess.run(
            [sys.executable, "-c", script, mode],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["same"]
        added[mode] = result["threads"][-1] - result["threads"][0]
    assert added == {"own": 2, "shared": 0}  # a worker per later session, or none
