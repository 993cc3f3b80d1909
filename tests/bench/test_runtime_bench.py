"""The decode-speed tools: runtime_bench's figures, step_overhead's stub, matmul_alpha's graphs."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import runtime_bench  # noqa: E402

from tests.runtime import conftest as runtime  # noqa: E402
from tests.runtime.conftest import MODEL  # noqa: E402

lm_repo = runtime.lm_repo  # the runtime tests' session fixture: a tiny exported LM


def test_summaries_give_medians_and_bests_of_rate_tpot_and_cpu_per_token():
    # (first-token s, total s, CPU s) of three runs of 4 rows x 10 new tokens
    runs = [(0.1, 1.0, 0.8), (0.2, 2.0, 0.4), (0.1, 0.5, 1.2)]
    s = runtime_bench.summarize(4, 10, runs)
    assert s["tok_s"] == pytest.approx(40.0) and s["tok_s_best"] == pytest.approx(80.0)
    assert s["tpot_ms"] == pytest.approx(100.0) and s["tpot_ms_best"] == pytest.approx(400 / 9)
    assert s["cpu_ms_per_token"] == pytest.approx(20.0)
    assert s["cpu_ms_per_token_best"] == pytest.approx(10.0)


def test_cpu_timing_counts_work_done_not_time_asleep():
    def work():
        return sum(i * i for i in range(200_000))

    cpu, result = runtime_bench.cpu_timed(work)
    assert result == work() and cpu > 0
    asleep, _ = runtime_bench.cpu_timed(time.sleep, 0.2)
    assert asleep < 0.05


def test_step_overhead_runs_the_engine_with_each_graph_shape_run_once(lm_repo):
    import step_overhead

    from engine.runtime import EngineConfig, LLMEngine

    engine = LLMEngine.from_repository(lm_repo, MODEL, threads=1, config=EngineConfig())
    calls = []
    run = engine.runner.backend.run
    engine.runner.backend.run = lambda feeds, *a, **k: calls.append(1) or run(feeds, *a, **k)
    step_overhead.stub_backend(engine.runner)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    assert step_overhead.per_step(engine, prompts, 20) > 0
    first = len(calls)
    assert 0 < first < 20  # a prefill and the decode shapes, not one call per step
    step_overhead.per_step(engine, prompts, 20)
    assert len(calls) == first  # the same shapes again: the graph is not run at all
    assert not engine.has_unfinished and engine.kv_stats().used_blocks == 0


def test_matmul_alpha_times_the_scaled_product_it_claims():
    import matmul_alpha

    rng = np.random.default_rng(0)
    a, b = rng.random((2, 3, 1, 4), np.float32), rng.random((2, 3, 5, 4), np.float32)
    c = matmul_alpha.session(a.shape, b.shape, 0.125).run(None, {"a": a, "b": b})[0]
    np.testing.assert_allclose(c, 0.125 * a @ b.swapaxes(-1, -2), rtol=1e-5)


def test_kv_graphs_reads_each_layout_and_feeds_the_same_cache_to_each(lm_repo, monkeypatch):
    """A paged export against itself, and a dense row layout fed the same tokens."""
    import kv_graphs

    assert kv_graphs.layout({"input_ids", "block_rows", "block_slots"}) == "paged"
    assert kv_graphs.layout({"input_ids", "block_owner", "block_index"}) == "paged-v1"
    assert kv_graphs.layout({"input_ids", "cache_mask", "new_mask"}) == "dense"
    with pytest.raises(SystemExit, match="not a kv_inplace graph"):
        kv_graphs.layout({"input_ids", "attention_mask"})
    rng = np.random.default_rng(0)
    tokens = {"cache.0.key": rng.standard_normal((2, 2, 40, 8)).astype(np.float32)}
    ids = np.array([[5], [6]])
    dense = kv_graphs.feeds("dense", tokens, 40, ids, 16, rng)
    assert dense["cache_mask"].shape == (2, 48) and dense["cache_mask"].sum() == 80
    np.testing.assert_array_equal(dense["cache.0.key"][:, :, :40], tokens["cache.0.key"])
    for bs in (16, 32):  # each paged graph gets blocks of its own size
        paged = kv_graphs.feeds("paged", tokens, 40, ids, bs, rng)
        nb = -(-40 // bs)
        assert paged["cache.0.key"].shape == (2 * nb, 2, bs, 8)
        assert paged["block_weights"].sum() == 2 * nb and paged["block_mask"].sum() == 80
        # row 1's token 17 is token 17 % bs of the block its table names at 17 // bs
        block = paged["block_table"][1, 17 // bs]
        np.testing.assert_array_equal(
            paged["cache.0.key"][block, :, 17 % bs], tokens["cache.0.key"][1, :, 17]
        )
    old = kv_graphs.feeds("paged-v1", tokens, 40, ids, 16, rng)
    assert sorted(old["block_owner"].tolist()) == [0, 0, 0, 1, 1, 1]
    # the tool itself, on the test model's graph against itself, on cases inside its context
    graph = lm_repo / MODEL / "1" / "kv_inplace.onnx"
    monkeypatch.setattr(kv_graphs, "CASES", ((1, 20), (3, 40)))
    monkeypatch.setattr(kv_graphs, "STEPS_PER_ROUND", 10)
    argv = ["kv_graphs", "--graph", f"a={graph}", "--graph", f"b={graph}", "--reps", "20"]
    monkeypatch.setattr(sys, "argv", argv)
    kv_graphs.main()
