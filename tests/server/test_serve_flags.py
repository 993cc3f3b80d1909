"""``engine serve`` flags reach the engines it loads (KV budget, sequences, spinning, batching)."""

from __future__ import annotations

import os

from typer.testing import CliRunner

from engine.cli import app
from engine.errors import EngineError


def _serve_with(monkeypatch, tmp_path, *flags: str) -> dict:
    """Run ``engine serve`` up to loading the models; return the arguments the loader got."""
    import engine.server.loader as loader
    from engine.runtime import backends

    seen: dict = {"shared_pool": None}

    def fake_open_served(repo, name, version, device="cpu", **kwargs):
        seen.update(kwargs, device=device)
        raise EngineError("stop here: the test only checks the arguments")

    monkeypatch.setattr(loader, "open_served", fake_open_served)
    monkeypatch.setattr(backends, "share_thread_pool", lambda n: seen.update(shared_pool=n))
    (tmp_path / "m" / "1").mkdir(parents=True, exist_ok=True)  # one model version to load
    result = CliRunner().invoke(app, ["serve", "--repo", str(tmp_path), *flags])
    # engine.cli.main turns an EngineError into exit code 2; the bare app just raises it
    assert isinstance(result.exception, EngineError) and "stop here" in str(result.exception)
    return seen


def test_defaults_give_16_sequences_an_automatic_kv_budget_spinning_and_batching(
    monkeypatch, tmp_path
):
    seen = _serve_with(monkeypatch, tmp_path)
    assert seen["config"].max_num_seqs == 16 and seen["config"].kv_cache_bytes is None
    assert seen["config"].enable_prefix_caching is True
    assert seen["spin"] is True and seen["batcher"] is None
    assert seen["shared_pool"] == os.cpu_count()  # one intra-op pool for every model


def test_threads_size_the_shared_pool(monkeypatch, tmp_path):
    assert _serve_with(monkeypatch, tmp_path, "--threads", "3")["shared_pool"] == 3


def test_flags_set_the_kv_budget_sequences_spinning_and_batching(monkeypatch, tmp_path):
    seen = _serve_with(
        monkeypatch,
        tmp_path,
        "--max-num-seqs", "32",
        "--kv-cache-bytes", "1048576",
        "--no-spin",
        "--no-dynamic-batching",
        "--max-queue-delay-ms", "5",
        "--threads", "1",
        "--no-prefix-caching",
    )  # fmt: skip
    assert seen["config"].max_num_seqs == 32 and seen["config"].kv_cache_bytes == 1 << 20
    assert seen["config"].enable_prefix_caching is False
    assert seen["spin"] is False and seen["threads"] == 1
    assert seen["shared_pool"] is None  # the shared pool spins: not without spinning
    assert seen["batcher"].max_batch_size == 1


def test_a_queue_delay_reaches_the_dynamic_batcher(monkeypatch, tmp_path):
    seen = _serve_with(monkeypatch, tmp_path, "--max-queue-delay-ms", "2.5")
    assert seen["batcher"].max_queue_delay_ms == 2.5 and seen["batcher"].max_batch_size == 32


def test_torch_runtime_flags_reach_the_engine_config(monkeypatch, tmp_path):
    seen = _serve_with(
        monkeypatch,
        tmp_path,
        "--dtype", "bfloat16",
        "--no-cuda-graphs",
        "--gpu-memory-utilization", "0.5",
    )  # fmt: skip
    config = seen["config"]
    assert (config.dtype, config.cuda_graphs, config.gpu_memory_utilization) == (
        "bfloat16",
        False,
        0.5,
    )
    defaults = _serve_with(monkeypatch, tmp_path)["config"]
    assert (defaults.dtype, defaults.cuda_graphs, defaults.gpu_memory_utilization) == (
        None,
        True,
        None,
    )


def test_max_model_len_caps_the_served_context(monkeypatch, tmp_path):
    """A 1024-token model served for 256-token requests: 16 KV slots of 256, not of 1024."""
    seen = _serve_with(monkeypatch, tmp_path, "--max-model-len", "256")
    assert seen["config"].max_model_len == 256
    assert _serve_with(monkeypatch, tmp_path)["config"].max_model_len is None
