"""llama.cpp on the same weights: what an edge user would otherwise run a GPT-2 with on a CPU.

The model's weights (a ``torch``-format version or its checkpoint, as for ``hf``) are written
once as GGUF in llama.cpp's GPT-2 layout (:mod:`bench.gguf_writer`), f32 or q8_0, and run
through llama-cpp-python's low-level API: ``concurrency`` prompts go into one ``llama_batch``
as separate sequences (llama.cpp's multi-sequence batching, one KV cell range per sequence),
prefill in one ``llama_decode`` call, then one call per step with one token per sequence.
Greedy: the argmax of each sequence's logits, exactly ``output_len`` tokens, end-of-text
ignored. Threads as the server's. The KV cache is f32, as the engine's. Weights stay in
llama.cpp's plain CPU buffers (its AMX path crashes on q8_0 here; see ``LlamaCppGreedy``).

llama-cpp-python builds llama.cpp from source (about 10 minutes on 2 cores), so it is an extra
of its own: ``pip install -e '.[llamacpp]'`` (``CMAKE_ARGS="-DGGML_NATIVE=ON"`` builds for the
host CPU). Without it the baseline is skipped with that reason.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.baselines.base import BatchedBaseline, Unavailable

INSTALL = (
    "pip install -e '.[llamacpp]' (builds llama.cpp from source, ~10 min on 2 cores; "
    'CMAKE_ARGS="-DGGML_NATIVE=ON" for this CPU)'
)


def import_llama_cpp() -> Any:
    """The ``llama_cpp`` module; :class:`Unavailable` saying how to install it if missing."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise Unavailable(f"llama-cpp-python is not installed ({exc}); {INSTALL}") from None
    return llama_cpp


class LlamaCppGreedy:
    """A GGUF model and one context per batch size, decoding static batches greedily."""

    def __init__(self, lib: Any, gguf: Path, threads: int, context: int):
        self.lib, self.threads, self.context = lib, threads, context
        lib.llama_backend_init()
        params = lib.llama_model_default_params()
        params.use_mmap = False
        # No extra buffer types (AMX, repacked weights): on a Xeon with AMX, llama.cpp puts
        # q8_0 weights in its AMX buffer and llama_decode then segfaults (llama-cpp-python
        # 0.3.36, default and 2x64 shapes); f32 weights never use them.
        params.use_extra_bufts = False
        self.model = lib.llama_model_load_from_file(str(gguf).encode(), params)
        if not self.model:
            raise Unavailable(f"llama.cpp could not load {gguf}")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = int(lib.llama_vocab_n_tokens(self.vocab))
        self.contexts: dict[int, Any] = {}

    def _context(self, batch: int) -> Any:
        """A context holding ``batch`` sequences of up to ``self.context`` tokens each."""
        if batch not in self.contexts:
            lib = self.lib
            params = lib.llama_context_default_params()
            params.n_ctx = batch * self.context
            params.n_batch = params.n_ubatch = batch * self.context
            params.n_seq_max = batch
            params.n_threads = params.n_threads_batch = self.threads
            params.type_k = params.type_v = lib.GGML_TYPE_F32
            params.no_perf = True
            ctx = lib.llama_init_from_model(self.model, params)
            if not ctx:
                raise Unavailable(f"llama.cpp could not create a context for {batch} sequences")
            self.contexts[batch] = ctx
        return self.contexts[batch]

    def generate(self, prompts: list[list[int]], output_len: int) -> tuple[list[float], np.ndarray]:
        """Greedy ``output_len`` tokens for each prompt, all in one batch; step times, (B, n)."""
        lib, rows = self.lib, len(prompts)
        ctx = self._context(rows)
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        total = sum(len(p) for p in prompts)
        batch = lib.llama_batch_init(max(total, rows), 0, 1)
        try:
            # prefill: every prompt token of every sequence, logits for each last token only
            i = 0
            for seq, prompt in enumerate(prompts):
                for pos, token in enumerate(prompt):
                    self._put(batch, i, token, pos, seq, pos == len(prompt) - 1)
                    i += 1
            batch.n_tokens = total
            tokens = np.zeros((rows, output_len), np.int64)
            positions = [len(p) for p in prompts]
            times: list[float] = []
            for step in range(output_len):
                self._decode(ctx, batch)
                logits = np.ctypeslib.as_array(lib.llama_get_logits(ctx), (rows, self.n_vocab))
                tokens[:, step] = logits.argmax(-1)
                times.append(time.perf_counter())
                for seq in range(rows):
                    self._put(batch, seq, int(tokens[seq, step]), positions[seq], seq, True)
                    positions[seq] += 1
                batch.n_tokens = rows
            return times, tokens
        finally:
            lib.llama_batch_free(batch)

    @staticmethod
    def _put(batch: Any, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
        batch.seq_id[i][0], batch.logits[i] = seq, logits

    def _decode(self, ctx: Any, batch: Any) -> None:
        code = self.lib.llama_decode(ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")

    def close(self) -> None:
        """Free the contexts and the model."""
        for ctx in self.contexts.values():
            self.lib.llama_free(ctx)
        self.contexts.clear()
        if self.model:
            self.lib.llama_model_free(self.model)
            self.model = None


class LlamaCpp(BatchedBaseline):
    """llama.cpp (llama-cpp-python) on a GGUF of the model's weights, f32."""

    name = "llamacpp"
    qtype = "f32"
    description = "llama.cpp via llama-cpp-python, GGUF f32, multi-sequence static batches"

    def __init__(
        self,
        repo: Path | None = None,
        model: str | None = None,
        threads: int | None = None,
        checkpoint: Path | None = None,
        device: str = "cpu",
    ):
        """Write (or reuse) the GGUF of ``model``'s weights and load it with ``threads``."""
        if device != "cpu":
            raise Unavailable(f"the llama.cpp baseline is built for the CPU here, not {device!r}")
        lib = import_llama_cpp()
        from bench.baselines.hf import find_weights
        from bench.gguf_writer import cached_gguf, read_weights

        self.weights = find_weights(repo, model, checkpoint)
        self.gguf = cached_gguf(self.weights, self.qtype)
        context = int(read_weights(self.weights)[1]["block_size"])
        self.threads = threads or os.cpu_count() or 1
        self.runner = LlamaCppGreedy(lib, self.gguf, self.threads, context)
        self.version = getattr(lib, "__version__", "?")

    def generate_batch(
        self, prompts: list[list[int]], output_len: int
    ) -> tuple[list[float], np.ndarray]:
        """One batch of sequences through llama.cpp: each step's time and the tokens."""
        return self.runner.generate(prompts, output_len)

    def describe(self) -> dict[str, Any]:
        """llama-cpp-python version, GGUF type and size, threads."""
        return {
            **super().describe(),
            "llama_cpp_python": self.version,
            "gguf": str(self.gguf),
            "gguf_type": self.qtype,
            "gguf_bytes": self.gguf.stat().st_size,
            "kv_cache": "f32",
            "threads": self.threads,
            "weights": str(self.weights),
        }

    def close(self) -> None:
        """Free llama.cpp's model and contexts."""
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.close()


class LlamaCppQ8(LlamaCpp):
    """llama.cpp on a q8_0 GGUF (every 2-D weight but the positions 8-bit, head included)."""

    name = "llamacpp-q8_0"
    qtype = "q8_0"
    description = "llama.cpp via llama-cpp-python, GGUF q8_0, multi-sequence static batches"
