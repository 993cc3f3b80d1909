"""The paged graph's per-step inputs, computed from block tables (engine/paged_inputs.py)."""

from __future__ import annotations

import numpy as np

from engine.paged_inputs import PAGED_INPUTS, block_mask, block_roles, causal_mask, paged_inputs


def test_block_roles_name_each_blocks_row_slot_and_weight():
    # block 0: nobody's; 1: row 1's 2nd; 2: row 0's 1st; 3: row 1's 1st
    owner, index = np.array([-1, 1, 0, 1]), np.array([5, 1, 0, 0])
    rows, slots, weights = block_roles(owner, index, batch=2, table_blocks=2)
    assert rows.tolist() == [0, 1, 0, 1]
    assert slots.tolist() == [1, 3, 0, 2]  # nobody's block: an in-range slot, weight 0
    assert weights.tolist() == [[0, 0, 1, 0], [0, 1, 0, 1]]
    assert weights.dtype == np.float32
    assert block_roles(owner, index, 2, 2, "float16")[2].dtype == np.float16


def test_causal_mask_excludes_padding_and_later_tokens():
    new_mask = np.array([[1, 1, 1], [1, 1, 0]])
    mask = causal_mask(new_mask)
    assert mask.dtype == bool and mask.shape == (2, 3, 3)
    assert mask[0].tolist() == np.tril(np.ones((3, 3), bool)).tolist()
    assert mask[1, :, 2].tolist() == [False, False, False]  # the pad is seen by nobody
    assert mask[1, 1].tolist() == [True, True, False]


def test_block_mask_covers_each_rows_cached_tokens():
    mask = block_mask(np.array([0, 5, 20]), table_blocks=2, block_size=16)
    assert mask.shape == (3, 2, 16)
    assert mask.reshape(3, -1).sum(axis=1).tolist() == [0, 5, 20]
    assert mask[2, 1, :4].all() and not mask[2, 1, 4:].any()


def test_paged_inputs_gives_every_input_in_the_contracts_order():
    table = np.array([[2, 0], [3, 1]])
    owner, index = np.array([0, 1, 0, 1]), np.array([1, 1, 0, 0])
    feeds = paged_inputs(np.ones((2, 1)), np.array([17, 20]), table, owner, index, 16)
    assert list(feeds) == list(PAGED_INPUTS)
    # a block's slot indexes the flattened tables back to that block, where it has a weight
    flat = feeds["block_table"].reshape(-1)
    assert all(flat[feeds["block_slots"][p]] == p for p in range(4))
    assert feeds["block_weights"].sum(axis=1).tolist() == [2, 2]
