"""The metric definitions on hand-made timestamps, against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from bench.baselines.base import RequestRecord
from bench.metrics import Distribution, span, summarize
from bench.server_metrics import load_between

exact = pytest.approx  # ms conversion multiplies by 1e3: equal up to float rounding


def records() -> list[RequestRecord]:
    """Three good requests, one failed with an error, one that received nothing."""
    return [
        # TTFT 1.0, E2E 3.0, TPOT (3.0 - 1.0) / 3 = 0.666..., gaps 0.5, 0.5, 1.0
        RequestRecord(0.0, [1.0, 1.5, 2.0, 3.0], prompt_tokens=10),
        # one token: TTFT 0.5 = E2E, no TPOT, no gap
        RequestRecord(1.0, [1.5], prompt_tokens=10),
        # TTFT 0.25, E2E 0.5, TPOT 0.25, gap 0.25
        RequestRecord(2.0, [2.25, 2.5], prompt_tokens=10),
        RequestRecord(0.5, [0.625], prompt_tokens=10, error="UNAVAILABLE: gone"),
        RequestRecord(0.75, [], prompt_tokens=10),
    ]


def test_failed_requests_are_counted_and_left_out():
    stats = summarize(records(), duration=4.0)
    assert (stats.completed, stats.failed) == (3, 2)
    assert stats.errors == ("UNAVAILABLE: gone", "no output")
    assert stats.output_tokens == 4 + 1 + 2  # the failed request's token does not count
    assert stats.input_tokens == 30


def test_ttft_is_first_token_minus_start():
    d = summarize(records(), duration=4.0).ttft_ms
    # sorted 250, 500, 1000: p90 at rank 1.8 -> 500 + 0.8 * 500; p99 at 1.98
    assert (d.count, d.mean, d.p50, d.p90, d.p99) == (
        3,
        exact(1750 / 3),
        exact(500),
        exact(900),
        exact(990),
    )


def test_tpot_excludes_the_first_token_and_one_token_requests():
    d = summarize(records(), duration=4.0).tpot_ms
    assert d.count == 2
    assert d.mean == exact((2000 / 3 + 250) / 2)
    assert d.p50 == exact((2000 / 3 + 250) / 2)


def test_itl_pools_every_gap_of_every_request():
    d = summarize(records(), duration=4.0).itl_ms
    # gaps 500, 500, 1000 and 250: sorted 250, 500, 500, 1000
    assert (d.count, d.mean, d.p50, d.p90, d.p99) == (
        4,
        exact(562.5),
        exact(500),
        exact(850),
        exact(985),
    )


def test_e2e_is_last_token_minus_start():
    d = summarize(records(), duration=4.0).e2el_ms
    assert (d.count, d.mean, d.p50) == (3, exact(4000 / 3), exact(500))


def test_throughput_divides_by_the_duration():
    stats = summarize(records(), duration=4.0)
    assert stats.request_throughput == 0.75
    assert stats.output_throughput == 1.75
    assert stats.total_token_throughput == (30 + 7) / 4


def test_duration_defaults_to_first_start_to_last_token():
    assert span(records()) == 3.0
    assert summarize(records()).duration_s == 3.0


def test_only_one_token_requests_have_no_tpot_and_no_itl():
    stats = summarize([RequestRecord(0.0, [0.5]), RequestRecord(0.0, [0.25])], duration=1.0)
    assert stats.tpot_ms.count == 0 and math.isnan(stats.tpot_ms.mean)
    assert stats.itl_ms.count == 0
    assert stats.ttft_ms.mean == exact(375)
    assert stats.output_throughput == 2.0


def test_two_tokens_tpot_equals_the_single_gap():
    stats = summarize([RequestRecord(1.0, [1.5, 1.75])], duration=1.0)
    assert stats.tpot_ms.mean == exact(250) == stats.itl_ms.mean


def test_no_records_gives_empty_stats_not_an_error():
    stats = summarize([])
    assert (stats.completed, stats.failed, stats.duration_s) == (0, 0, 0.0)
    assert math.isnan(stats.request_throughput)
    assert stats.ttft_ms == Distribution()


def test_server_batch_size_is_tokens_per_step_for_a_language_model():
    first = {"engine_steps_total": 10, "engine_generation_tokens_total": 10}
    last = {
        "engine_steps_total": 30,
        "engine_generation_tokens_total": 90,
        "engine_kv_blocks_used": 0,
        "engine_kv_blocks_free": 16,
    }
    load = load_between(first, last, [(4, 12), (8, 8)])
    assert load.batch_size_mean == 4.0 and load.steps == 20
    assert (load.kv_usage_mean, load.kv_usage_max, load.kv_blocks) == (0.375, 0.5, 16)


def test_server_batch_size_is_rows_per_call_for_batched_models():
    load = load_between({}, {"engine_batch_size_count": 4, "engine_batch_size_sum": 10}, [])
    assert load.batch_size_mean == 2.5
    assert load.kv_usage_mean is None and load.kv_blocks is None
