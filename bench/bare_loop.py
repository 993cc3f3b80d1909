"""The baseline: a bare numpy + onnxruntime greedy decode loop over the ``default`` graph.

No scheduler, no sampler, no preallocation: every step feeds the previous ``present`` back as
``past_key_values`` (onnxruntime concatenates past and new inside the graph) and grows the
attention mask with ``np.concatenate``. Prompts are left-padded into one batch.

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
) -> np.ndarray:
    """Greedy-decode ``max_new`` tokens for each prompt; return (B, max_new) token ids.

    ``on_step(step)`` is called as soon as step ``step``'s tokens exist (benchmarks time it).
    """
    inputs = {i.name: i for i in session.get_inputs()}
    past_names = [n for n in inputs if n.startswith("past_key_values.")]
    present_names = ["present." + n.split(".", 1)[1] for n in past_names]
    _, heads, _, dim = inputs[past_names[0]].shape
    batch, width = len(prompts), max(len(p) for p in prompts)
    ids = np.full((batch, width), pad_id, np.int64)
    mask = np.zeros((batch, width), np.int64)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = p
        mask[row, width - len(p) :] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    past = {n: np.zeros((batch, heads, 0, dim), np.float32) for n in past_names}
    attention = mask
    out = np.zeros((batch, max_new), np.int64)
    for step in range(max_new):
        feeds = {"input_ids": ids, "position_ids": positions, "attention_mask": attention, **past}
        results = session.run(["logits", *present_names], feeds)
        out[:, step] = results[0][:, -1].argmax(axis=-1)
        if on_step is not None:
            on_step(step)
        past = dict(zip(past_names, results[1:]))
        positions = positions[:, -1:] + 1
        ids = out[:, step : step + 1]
        attention = np.concatenate([attention, np.ones((batch, 1), np.int64)], axis=1)
    return out


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
