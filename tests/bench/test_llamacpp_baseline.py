"""The llama.cpp baseline: multi-sequence batches through a fake llama_cpp, then the real one.

The fake checks what the baseline asks of llama.cpp (one prefill call holding every prompt as
its own sequence, logits only for each last prompt token, then one token per sequence per step
at the next position); it runs everywhere. The real one needs llama-cpp-python (the
``llamacpp`` extra, compiled from source) and is skipped with that reason without it.
"""

from __future__ import annotations

import ctypes
from types import SimpleNamespace

import numpy as np
import pytest

from bench.baselines import Unavailable, create
from bench.baselines.base import RequestRecord
from bench.baselines.llamacpp import LlamaCppGreedy, import_llama_cpp
from tests.runtime import conftest as runtime

lm_repo, lm_checkpoint = runtime.lm_repo, runtime.lm_checkpoint
VOCAB = 50


class FakeLlama:
    """Enough of llama_cpp's low-level API to decode: next token = (token * 7 + pos) % VOCAB."""

    GGML_TYPE_F32 = 0

    def __init__(self):
        self.calls: list[list[tuple[int, int, int, bool]]] = []  # (seq, pos, token, logits)
        self.contexts: list[SimpleNamespace] = []
        self.freed: list[str] = []
        self.cache: dict[int, list[int]] = {}

    def llama_backend_init(self):
        pass

    def llama_model_default_params(self):
        return SimpleNamespace(use_mmap=True, use_extra_bufts=True)

    def llama_model_load_from_file(self, path, params):
        self.model_params = params
        return "model"

    def llama_model_get_vocab(self, model):
        return "vocab"

    def llama_vocab_n_tokens(self, vocab):
        return VOCAB

    def llama_context_default_params(self):
        return SimpleNamespace()

    def llama_init_from_model(self, model, params):
        self.contexts.append(params)
        return f"ctx{len(self.contexts)}"

    def llama_get_memory(self, ctx):
        return ctx

    def llama_memory_clear(self, memory, data):
        self.cache = {}

    def llama_batch_init(self, n_tokens, embd, n_seq_max):
        return SimpleNamespace(
            n_tokens=0,
            token=[0] * n_tokens,
            pos=[0] * n_tokens,
            n_seq_id=[0] * n_tokens,
            seq_id=[[0] for _ in range(n_tokens)],
            logits=[False] * n_tokens,
        )

    def llama_batch_free(self, batch):
        self.freed.append("batch")

    def llama_decode(self, ctx, batch):
        call, rows = [], []
        for i in range(batch.n_tokens):
            seq, pos, token = batch.seq_id[i][0], batch.pos[i], batch.token[i]
            assert batch.n_seq_id[i] == 1 and pos == len(self.cache.setdefault(seq, []))
            self.cache[seq].append(token)
            call.append((seq, pos, token, bool(batch.logits[i])))
            if batch.logits[i]:
                row = np.zeros(VOCAB, np.float32)
                row[(token * 7 + pos) % VOCAB] = 1.0
                rows.append(row)
        self.calls.append(call)
        self._logits = np.ascontiguousarray(np.stack(rows))
        return 0

    def llama_get_logits(self, ctx):
        return self._logits.ctypes.data_as(ctypes.POINTER(ctypes.c_float))

    def llama_free(self, ctx):
        self.freed.append(ctx)

    def llama_model_free(self, model):
        self.freed.append(model)


def _expected(prompt: list[int], n: int) -> list[int]:
    out, last, pos = [], prompt[-1], len(prompt) - 1
    for _ in range(n):
        last = (last * 7 + pos) % VOCAB
        out.append(last)
        pos += 1
    return out


def test_prompts_are_one_batch_of_sequences_then_one_token_each_per_step(tmp_path):
    lib = FakeLlama()
    runner = LlamaCppGreedy(lib, tmp_path / "m.gguf", threads=2, context=64)
    prompts = [[3, 4, 5], [9], [1, 2, 3, 4, 5, 6]]
    times, tokens = runner.generate(prompts, 5)
    assert tokens.tolist() == [_expected(p, 5) for p in prompts]
    assert len(times) == 5 and times == sorted(times)
    prefill = lib.calls[0]
    assert [c[:3] for c in prefill] == [
        (s, i, t) for s, p in enumerate(prompts) for i, t in enumerate(p)
    ]
    assert [c[3] for c in prefill] == [i == len(p) - 1 for p in prompts for i in range(len(p))]
    for step, call in enumerate(
        lib.calls[1:], start=1
    ):  # the tokens of step-1, at the next position
        assert [(c[0], c[1]) for c in call] == [
            (s, len(p) + step - 1) for s, p in enumerate(prompts)
        ]
        assert all(c[3] for c in call)
    assert len(lib.calls) == 5  # the last step's token needs no decode call
    assert lib.model_params.use_extra_bufts is False  # llama.cpp's AMX q8_0 path crashes here
    (params,) = lib.contexts  # one context per batch size, sized for it, f32 cache, our threads
    assert params.n_seq_max == 3 and params.n_ctx == 3 * 64 and params.n_threads == 2
    assert params.n_threads_batch == 2 and params.type_k == params.type_v == lib.GGML_TYPE_F32
    runner.generate([[7]], 2)  # a new batch size gets its own context; the cache starts empty
    assert len(lib.contexts) == 2 and lib.calls[-2][0][:2] == (0, 0)
    runner.close()
    assert {"ctx1", "ctx2", "model"} <= set(lib.freed)


def test_without_llama_cpp_python_the_baseline_is_skipped_with_how_to_install(
    lm_repo, lm_checkpoint, monkeypatch
):
    import builtins

    real_import = builtins.__import__

    def no_llama(name, *args, **kwargs):
        if name == "llama_cpp":
            raise ImportError("No module named 'llama_cpp'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_llama)
    from bench.baselines import BaselineContext

    context = BaselineContext(repo=lm_repo, model=runtime.MODEL, checkpoint=lm_checkpoint)
    for name in ("llamacpp", "llamacpp-q8_0"):
        with pytest.raises(Unavailable, match=r"llama-cpp-python is not installed.*\.\[llamacpp\]"):
            create(name, context)


# -- the real llama.cpp ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real(lm_repo, lm_checkpoint):
    try:
        import_llama_cpp()
    except Unavailable as exc:
        pytest.skip(str(exc))
    from bench.baselines import BaselineContext

    context = BaselineContext(
        repo=lm_repo, model=runtime.MODEL, threads=1, checkpoint=lm_checkpoint
    )
    made = {name: create(name, context) for name in ("llamacpp", "llamacpp-q8_0")}
    yield made
    for baseline in made.values():
        baseline.close()


def test_llama_cpp_f32_greedy_tokens_equal_ours_alone_and_batched(real, lm_repo):
    from bench.bare_loop import greedy, load_session

    session = load_session(lm_repo / runtime.MODEL / "1" / "model.onnx", threads=1)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(4, 8000, n).tolist() for n in (5, 1, 23, 11)]
    records: list[RequestRecord] = real["llamacpp"].run(prompts, 12, concurrency=4)
    expected = [greedy(session, [p], 12)[0].tolist() for p in prompts]
    assert [r.token_ids for r in records] == expected
    assert real["llamacpp"].run(prompts[:1], 12, concurrency=1)[0].token_ids == expected[0]
    q8 = [r.token_ids for r in real["llamacpp-q8_0"].run(prompts, 12, concurrency=4)]
    assert np.mean(np.array(q8) == np.array(expected)) > 0.5  # 8-bit: close, not identical
    assert real["llamacpp-q8_0"].describe()["gguf_type"] == "q8_0"
