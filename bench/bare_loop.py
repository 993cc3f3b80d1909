"""The baseline: a bare numpy + onnxruntime greedy decode loop over the ``default`` graph.

No scheduler, no sampler, no preallocation: every step feeds the previous ``present`` back as
``past_key_values`` (onnxruntime concatenates past and new inside the graph) and grows the
attention mask with ``np.concatenate``. Prompts are left-padded into one batch. The loop is the
engine's own (engine/graph_decoder.py, also what export validation decodes with).

    python bench/bare_loop.py --repo REPO --model NAME --batch 16 --prompt-len 32 --new 128
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def load_session(graph_path: Path, threads: int, spin: bool = True):
    """An onnxruntime CPU session with ``threads`` intra-op threads (spinning as asked)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(graph_path), so, providers=["CPUExecutionProvider"])


def greedy(
    session,
    prompts: list[list[int]],
    max_new: int,
    pad_id: int = 1,
    on_step: Callable[[int], None] | None = None,
    context: int | None = None,
) -> np.ndarray:
    """Greedy-decode ``max_new`` tokens for each prompt; return (B, max_new) token ids.

    The engine's one decode loop (:class:`engine.graph_decoder.GraphDecoder`) straight on the
    session: nothing between it and onnxruntime. ``on_step(step)`` is called as soon as step
    ``step``'s tokens exist (benchmarks time it). ``context``: the model's positions, which a
    static batch's long-prompt row must not step past (see ``GraphDecoder.generate``).
    """
    from engine.graph_decoder import GraphDecoder, ort_runner, session_signature

    decoder = GraphDecoder(session_signature(session))
    return decoder.generate(
        ort_runner(session), prompts, max_new, pad_id, on_step=on_step, context=context
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from engine.repository import read_manifest, version_dir

    path = version_dir(Path(args.repo), args.model)
    manifest = read_manifest(path)
    session = load_session(path / manifest.graph("default")["file"], args.threads)
    rng = np.random.default_rng(0)
    prompts = rng.integers(4, 1000, (args.batch, args.prompt_len)).tolist()
    greedy(session, prompts, 4)  # warm-up
    t0 = time.perf_counter()
    greedy(session, prompts, args.new)
    dt = time.perf_counter() - t0
    tokens = args.batch * args.new
    print(f"bare loop: batch {args.batch}, {tokens} tokens in {dt:.3f}s = {tokens / dt:,.0f} tok/s")


if __name__ == "__main__":
    main()
