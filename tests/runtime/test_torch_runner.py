"""The torch runtime on a ``torch``-format export: same tokens as the ONNX engine, freed slots."""

from __future__ import annotations

import numpy as np
import pytest

from engine.runtime import Engine, EngineConfig, SamplingParams
from engine.runtime.errors import BackendUnavailableError
from tests.runtime.conftest import MODEL

torch = pytest.importorskip("torch")

GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
LENGTHS = (3, 17, 9, 40)  # a batch of prompts of different lengths


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = np.random.default_rng(1)
    return [rng.integers(4, 8000, n).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def onnx_tokens(lm_repo, prompts) -> list[list[int]]:
    """Greedy tokens of the ONNX engine, each prompt alone."""
    engine = Engine.from_repository(lm_repo, MODEL, threads=1)
    try:
        return [engine.generate_all([p], GREEDY)[0].token_ids for p in prompts]
    finally:
        engine.close()


@pytest.fixture()
def torch_engine(lm_torch_repo):
    torch.set_num_threads(1)
    engine = Engine.from_repository(lm_torch_repo, MODEL, config=EngineConfig(max_num_seqs=4))
    yield engine
    engine.close()


def test_greedy_tokens_match_the_onnx_engine_alone_and_batched(torch_engine, prompts, onnx_tokens):
    assert type(torch_engine.runner).__name__ == "TorchRunner"
    alone = [torch_engine.generate_all([p], GREEDY)[0].token_ids for p in prompts]
    assert alone == onnx_tokens
    batched = torch_engine.generate_all(prompts, GREEDY)  # one prefill of 4, decode steps of 4
    assert [o.token_ids for o in batched] == onnx_tokens
    assert len({t for toks in onnx_tokens for t in toks}) > 30  # not one repeated token


def test_slots_are_released_and_reused_with_stale_keys_left_behind(
    torch_engine, prompts, onnx_tokens
):
    runner = torch_engine.runner
    pool = runner.kv_bytes
    # 8 requests through 4 slots, longest first: later prompts reuse slots holding longer,
    # stale sequences, and sampled requests share steps with greedy ones.
    order = [3, 1, 2, 0, 3, 0, 1, 2]
    params = [GREEDY] * 6 + [SamplingParams(temperature=0.9, seed=3, max_tokens=7)] * 2
    ids = [torch_engine.add_request(prompts[i], p) for i, p in zip(order, params)]
    final = {}
    while torch_engine.has_unfinished:
        final.update({o.request_id: o for o in torch_engine.step() if o.finished})
    assert [final[r].token_ids for r in ids[:6]] == [onnx_tokens[i] for i in order[:6]]
    assert all(len(final[r].token_ids) == 7 for r in ids[6:])
    assert torch_engine.kv_stats().used_blocks == 0
    assert runner.kv_bytes == pool  # the pool is allocated once, never grown
    torch_engine.close()
    assert runner.kv_bytes == 0


def test_the_pool_is_sized_by_dtype(lm_torch_repo):
    mk = lambda dtype: Engine.from_repository(  # noqa: E731
        lm_torch_repo, MODEL, config=EngineConfig(max_num_seqs=2, dtype=dtype)
    )
    full, half = mk("float32"), mk("bfloat16")
    try:
        assert half.runner.k.dtype == torch.bfloat16
        assert half.runner.kv_bytes * 2 == full.runner.kv_bytes
    finally:
        full.close()
        half.close()


def test_a_backend_that_cannot_load_the_format_is_a_clear_error(lm_repo, lm_torch_repo):
    with pytest.raises(BackendUnavailableError, match="--format torch"):
        Engine.from_repository(lm_repo, MODEL, backend="torch")
    with pytest.raises(BackendUnavailableError, match="only the torch backend"):
        Engine.from_repository(lm_torch_repo, MODEL, backend="onnxruntime")
    with pytest.raises(BackendUnavailableError, match="cpu or cuda"):
        Engine.from_repository(lm_torch_repo, MODEL, device="tensorrt")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="needs a CUDA GPU"):
            Engine.from_repository(lm_torch_repo, MODEL, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs)")
def test_cuda_graph_decode_matches_eager_decode_on_the_gpu(lm_torch_repo, prompts):
    """fp32 on the GPU, graphs against eager: the same kernels, so the same tokens."""
    tokens = {}
    for graphs in (False, True):
        config = EngineConfig(max_num_seqs=4, dtype="float32", cuda_graphs=graphs)
        engine = Engine.from_repository(lm_torch_repo, MODEL, device="cuda", config=config)
        try:
            # 3 requests (bucket 4 with a padding row), then the batch of 4, then one alone
            runs = [prompts[:3], prompts, prompts[1:2]]
            tokens[graphs] = [[o.token_ids for o in engine.generate_all(r, GREEDY)] for r in runs]
            if graphs:
                assert engine.runner._graphs  # the decode steps were captured
        finally:
            engine.close()
    assert tokens[True] == tokens[False]
    assert torch.cuda.memory_allocated() < 64 << 20  # closing returned the pool and graphs
