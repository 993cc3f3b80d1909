"""The paged ``kv_inplace`` graph's per-step inputs, computed from block tables in numpy.

A paged graph reads its cache as pools of blocks ``(pool_blocks, heads, block_size, head_dim)``
through a block table per row. What it needs beyond the table - which cached and which new
tokens each row attends to, and for each pool block the row whose queries score it, its place
in that row's table and whether it is that row's cache - is a few small arrays a step. The
runtime computes them here, in numpy, in a few microseconds; computed inside the graph they
were ~40 nodes of onnxruntime dispatch every step (5-10% of a batch-1 decode step).

Inputs (the serving contract's ``KV_INPUTS``; plugins/decoder_lm/model.py ``forward_paged``):

* ``causal_mask`` (batch, sequence, sequence) bool: new token i of row b attends to new token j
  (causal, padding excluded);
* ``block_table`` (batch, table_blocks) int64: row b's blocks in token order (entries past a
  row's cache name any block; the mask hides them);
* ``block_mask`` (batch, table_blocks, block_size) bool: row b attends to that cached token;
* ``block_rows`` (pool_blocks,) int64: the row whose queries score each pool block (0 for a
  block no row reads);
* ``block_slots`` (pool_blocks,) int64: ``row * table_blocks + place`` of each block in its
  row's table (any valid value for a block no row reads);
* ``block_weights`` (batch, pool_blocks) float (the pools' dtype): 1 where the block holds row
  b's cache, which sums each row's blocks' attention outputs.
"""

from __future__ import annotations

import numpy as np

PAGED_INPUTS = (
    "causal_mask",
    "block_table",
    "block_mask",
    "block_rows",
    "block_slots",
    "block_weights",
)
# Inputs of the paged graph before these were: it computed the masks and rows itself.
OLD_PAGED_INPUTS = ("new_mask", "cache_lens", "block_owner", "block_index")


def causal_mask(new_mask: np.ndarray) -> np.ndarray:
    """(B, S, S) bool: causal attention among each row's real new tokens (``new_mask`` (B, S))."""
    S = new_mask.shape[1]
    tril = np.tril(np.ones((S, S), bool))
    return tril[None] & (new_mask[:, None, :] != 0)


def block_mask(
    cache_lens: np.ndarray, table_blocks: int, block_size: int, out: np.ndarray | None = None
) -> np.ndarray:
    """(B, nb, bs) bool: row b attends to its first ``cache_lens[b]`` cached tokens.

    ``out``: a (B, nb, bs) bool array to fill (the runner's bound decode input) and return.
    """
    width = np.arange(table_blocks * block_size)
    if out is None:
        out = np.empty((len(cache_lens), table_blocks, block_size), bool)
    np.less(width[None, :], cache_lens[:, None], out=out.reshape(len(cache_lens), -1))
    return out


def block_roles(
    owner: np.ndarray,
    index: np.ndarray,
    batch: int,
    table_blocks: int,
    dtype="float32",
    out: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each pool block's (rows, slots, weights) from its owning row (-1: none) and its place.

    ``owner`` (P,) is the row whose cache a block holds (-1: no row's, or not yet: the block a
    row's new token goes to), ``index`` (P,) the block's place in that row's table.
    ``dtype``: the weights' (the graph's float inputs', float32 in every export here).
    ``out``: (rows (P,), slots (P,), weights (batch, P)) arrays to fill and return instead.
    """
    P = len(owner)
    if out is None:
        out = (np.empty(P, np.int64), np.empty(P, np.int64), np.empty((batch, P), dtype))
    rows, slots, weights = out
    np.maximum(owner, 0, out=rows)
    np.clip(index, 0, table_blocks - 1, out=slots)
    slots += rows * table_blocks
    np.equal(owner[None, :], np.arange(batch)[:, None], out=weights)
    return rows, slots, weights


def paged_inputs(
    new_mask: np.ndarray,
    cache_lens: np.ndarray,
    table: np.ndarray,
    owner: np.ndarray,
    index: np.ndarray,
    block_size: int,
    dtype="float32",
) -> dict[str, np.ndarray]:
    """Every per-step input of a paged graph but the tokens, their positions and the pools.

    ``new_mask`` (B, S) marks real new tokens, ``cache_lens`` (B,) each row's cached tokens,
    ``table`` (B, nb) its blocks; ``owner``/``index`` as in :func:`block_roles`.
    """
    batch, nb = table.shape
    rows, slots, weights = block_roles(owner, index, batch, nb, dtype)
    return {
        "causal_mask": causal_mask(new_mask),
        "block_table": table,
        "block_mask": block_mask(cache_lens, nb, block_size),
        "block_rows": rows,
        "block_slots": slots,
        "block_weights": weights,
    }
