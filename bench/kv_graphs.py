"""Exported ``kv_inplace`` decode graphs, timed interleaved in one process on the same cache.

``bench/kv_layouts.py`` builds its candidates from today's model code; this one takes graph files
as they were exported - a version from before the paged KV cache, one from before the runtime fed
the paged graph its masks, today's - so a change of the graph can be measured against the graph
it replaced, not a rebuild of it. The layout is read from each graph's inputs:

- ``dense``: ``cache_mask`` and one contiguous (batch, heads, window, head_dim) cache per row
  (the window rounded up to 16 tokens, as the dense runtime bound it);
- ``paged-v1``: ``block_owner``/``block_index``: the graph computed masks and block roles;
- ``paged``: ``block_rows``/``block_slots``/``block_weights`` (engine/paged_inputs.py).

Every graph gets the same cache contents (each row's tokens in shuffled pool blocks for the paged
ones, of the block size the graph was exported with) and must give the first graph's logits.
The graphs must share a model shape (and, for the logits check, weights: e.g. the same
checkpoint exported by two versions). Time is process CPU
time per decode step with one onnxruntime thread, median of interleaved rounds of 100 steps.

    python bench/kv_graphs.py --graph before=OLD/lm/1/kv_inplace.onnx \\
        --graph after=NEW/lm/1/kv_inplace.onnx [--reps 1000]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from engine.paged_inputs import paged_inputs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_layouts import compare_interleaved  # noqa: E402

# (batch, cached tokens): half-way into a block, where the dense window (rounded up to 16 past
# the next token) and the paged blocks cover the same tokens; at a multiple of 16 the dense graph
# would attend over a whole empty block more than the paged one (biased against dense)
CASES = ((1, 40), (1, 88), (1, 136), (16, 56), (16, 104), (16, 136))
# Long rounds: each switch to another graph brings its 20-30 MB of weights back into the CPU
# caches; over 100 steps a round that is a small share of the round.
STEPS_PER_ROUND = 100


def layout(names: set[str]) -> str:
    """Which kind of kv_inplace graph takes these inputs."""
    if "block_rows" in names:
        return "paged"
    if "block_owner" in names:
        return "paged-v1"
    if "cache_mask" in names:
        return "dense"
    raise SystemExit(f"not a kv_inplace graph this tool knows: inputs {sorted(names)}")


def feeds(kind: str, tokens: dict, cached: int, ids: np.ndarray, bs: int, rng) -> dict:
    """One decode step's inputs for a graph of layout ``kind``: every row has ``cached`` tokens,
    ``tokens`` (name -> (batch, H, cached, D)); paged graphs get them in shuffled pool blocks of
    ``bs`` tokens."""
    first = next(iter(tokens.values()))
    batch, H, _, D = first.shape
    f = {"input_ids": ids, "position_ids": np.full((batch, 1), cached, np.int64)}
    ones = np.ones((batch, 1), np.int64)
    if kind == "dense":
        window = -(-(cached + 1) // 16) * 16
        f["cache_mask"] = (np.arange(window)[None] < cached).repeat(batch, 0).astype(np.int64)
        f["new_mask"] = ones
        for name, rows in tokens.items():
            dense = np.zeros((batch, H, window, D), rows.dtype)
            dense[:, :, :cached] = rows
            f[name] = dense
        return f
    nb = -(-cached // bs)
    table = rng.permutation(batch * nb).reshape(batch, nb)
    pools = {}
    for name, rows in tokens.items():
        padded = np.zeros((batch, H, nb * bs, D), rows.dtype)
        padded[:, :, :cached] = rows
        pool = np.zeros((batch * nb, H, bs, D), rows.dtype)
        pool[table] = padded.reshape(batch, H, nb, bs, D).transpose(0, 2, 1, 3, 4)
        pools[name] = pool
    P = batch * nb
    owner, index = np.full(P, -1, np.int64), np.zeros(P, np.int64)
    owner[table], index[table] = np.arange(batch)[:, None], np.arange(nb)[None, :]
    lens = np.full(batch, cached, np.int64)
    if kind == "paged-v1":
        f.update(new_mask=ones, cache_lens=lens, block_table=table, block_owner=owner)
        f["block_index"] = index
    else:
        f.update(paged_inputs(ones, lens, table, owner, index, bs))
    return {**f, **pools}


def block_size(session) -> int:
    """A paged graph's tokens per block (its pool inputs' third axis); 16 if not fixed."""
    dim = next(i for i in session.get_inputs() if i.name.startswith("cache.")).shape[2]
    return dim if isinstance(dim, int) else 16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graph", action="append", required=True, help="NAME=PATH, repeatable")
    ap.add_argument("--reps", type=int, default=1000, help="decode steps per case and graph")
    args = ap.parse_args()
    import onnxruntime as ort

    sessions, kinds = {}, {}
    for item in args.graph:
        name, _, path = item.partition("=")
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
        so.log_severity_level = 3
        sessions[name] = ort.InferenceSession(path, so)
        kinds[name] = layout({i.name for i in sessions[name].get_inputs()})
    first = sessions[next(iter(sessions))]
    kv = [i for i in first.get_inputs() if i.name.startswith("cache.")]
    H, D = kv[0].shape[1], kv[0].shape[3]
    vocab = first.get_outputs()[0].shape[-1]
    sizes = {n: block_size(s) if kinds[n] != "dense" else None for n, s in sessions.items()}
    print(f"# load avg {os.getloadavg()[0]:.1f}; CPU ms per decode step, 1 thread; layouts {kinds}")
    print(f"# tokens per block {sizes}")
    print(f"# median of {args.reps // STEPS_PER_ROUND} interleaved rounds of {STEPS_PER_ROUND}")
    names = list(sessions)
    for batch, cached in CASES:
        rng = np.random.default_rng(batch + cached)
        ids = rng.integers(4, min(vocab, 8000), (batch, 1))
        tokens = {i.name: rng.standard_normal((batch, H, cached, D)).astype(np.float32) for i in kv}
        step = {n: feeds(kinds[n], tokens, cached, ids, sizes[n] or 16, rng) for n in names}
        rounds = args.reps // STEPS_PER_ROUND
        compare_interleaved(sessions, step, rounds, STEPS_PER_ROUND, batch, cached)


if __name__ == "__main__":
    main()
