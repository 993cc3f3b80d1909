"""The load generator: the Poisson arrival process, the concurrency limit, the send times."""

from __future__ import annotations

import asyncio
import math
import time

import numpy as np
import pytest

from bench.baselines.base import RequestRecord
from bench.loadgen import arrival_offsets, drive


def test_poisson_arrivals_have_mean_gap_one_over_rate():
    offsets = arrival_offsets(4000, rate=50.0, seed=0)
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0 and (gaps > 0).all()
    assert gaps.mean() == pytest.approx(1 / 50, rel=0.05)
    # exponential gaps: the standard deviation equals the mean
    assert gaps.std() == pytest.approx(gaps.mean(), rel=0.08)


def test_poisson_arrivals_are_seeded():
    a, b = arrival_offsets(100, 10.0, seed=3), arrival_offsets(100, 10.0, seed=3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, arrival_offsets(100, 10.0, seed=4))


def test_an_infinite_rate_sends_everything_at_once():
    assert np.array_equal(arrival_offsets(5, math.inf), np.zeros(5))
    with pytest.raises(ValueError):
        arrival_offsets(5, 0.0)


def _fake_send(log: list[float], in_flight: list[int], peak: list[int], delay: float = 0.01):
    async def send(item: int) -> RequestRecord:
        record = RequestRecord(start=time.perf_counter(), prompt_tokens=item)
        log.append(record.start)
        in_flight[0] += 1
        peak[0] = max(peak[0], in_flight[0])
        await asyncio.sleep(delay)
        in_flight[0] -= 1
        record.token_times.append(time.perf_counter())
        return record

    return send


def test_concurrency_caps_requests_in_flight_and_keeps_order():
    log: list[float] = []
    in_flight, peak, done = [0], [0], []
    records = asyncio.run(drive(_fake_send(log, in_flight, peak), range(12), 3, None, done.append))
    assert peak[0] == 3
    assert [r.prompt_tokens for r in records] == list(range(12))
    assert len(done) == 12


def test_requests_are_sent_at_their_poisson_arrival_times():
    offsets = arrival_offsets(20, rate=100.0, seed=1)
    log: list[float] = []
    t0 = time.perf_counter()
    asyncio.run(drive(_fake_send(log, [0], [0], 0.0), range(20), None, offsets))
    sent = np.array(sorted(log)) - t0
    # never early; late by no more than a loaded 2-core machine's scheduling delay
    assert (sent >= offsets - 1e-3).all()
    assert np.median(sent - offsets) < 0.02
