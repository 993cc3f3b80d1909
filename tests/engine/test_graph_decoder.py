"""The one decode loop (export validation, the bench's bare loop, ``engine sample``)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.architecture import ExportSignature, TensorSpec
from engine.graph_decoder import GraphDecoder

V = 10
SIGNATURE = ExportSignature(
    inputs=(
        TensorSpec("input_ids", "int64", ("batch", "sequence")),
        TensorSpec("position_ids", "int64", ("batch", "sequence")),
        TensorSpec("attention_mask", "int64", ("batch", "total_sequence")),
        TensorSpec("past_key_values.0.key", "float32", ("batch", 1, "past_sequence", 2)),
    ),
    outputs=(
        TensorSpec("logits", "float32", ("batch", "sequence", V)),
        TensorSpec("present.0.key", "float32", ("batch", 1, "total_sequence", 2)),
    ),
)


def counting_lm(calls: list):
    """A concatenating graph whose next token is (last token + 1) mod V; it checks its feeds."""

    def run(feeds):
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        past = feeds["past_key_values.0.key"]
        assert mask.shape[1] == past.shape[2] + ids.shape[1]  # the cache grows by the new tokens
        calls.append(ids.shape)
        logits = np.eye(V, dtype=np.float32)[(ids + 1) % V]  # (B, T, V)
        new = np.zeros((len(ids), 1, ids.shape[1], 2), np.float32)
        return {"logits": logits, "present.0.key": np.concatenate([past, new], axis=2)}

    return run


def test_greedy_by_default_with_one_forward_pass_per_token():
    calls = []
    tokens = GraphDecoder(SIGNATURE).generate(counting_lm(calls), [[3], [1, 8]], 4, pad_id=0)
    assert tokens.tolist() == [[4, 5, 6, 7], [9, 0, 1, 2]]
    assert calls == [(2, 2), (2, 1), (2, 1), (2, 1)]  # prefill of the left-padded rows, 3 steps


def test_pick_chooses_the_tokens_and_on_step_sees_each_step():
    steps = []
    tokens = GraphDecoder(SIGNATURE).generate(
        counting_lm([]), [[3]], 3, pick=lambda logits, step: np.full(len(logits), 7 - step),
        on_step=steps.append,
    )  # fmt: skip
    assert tokens.tolist() == [[7, 6, 5]] and steps == [0, 1, 2]


@pytest.mark.parametrize(
    "prompts, expected",
    [
        ([[5]], [[6, 7]]),
        # the second row reaches 7 later; the first keeps its tokens after it
        ([[5], [2]], [[6, 7, 8, 9, 0], [3, 4, 5, 6, 7]]),
    ],
)
def test_decoding_stops_once_every_row_has_produced_the_stop_id(prompts, expected):
    tokens = GraphDecoder(SIGNATURE).generate(counting_lm([]), prompts, 8, stop_id=7)
    assert tokens.tolist() == expected


def test_kv_shapes_default_to_the_signatures_numbers():
    decoder = GraphDecoder(SIGNATURE)
    assert decoder.kv_shapes == {"past_key_values.0.key": (1, 1, 1, 2)}
    assert not decoder.inplace
