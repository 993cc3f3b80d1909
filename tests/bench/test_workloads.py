"""Workloads (fixed, mixed, shared-prefix), the static-batch server model, and goodput."""

from __future__ import annotations

import time

import numpy as np
import pytest

from bench.baselines.base import BatchedBaseline, RequestRecord
from bench.metrics import Slo, summarize
from bench.prompts import load_tokenizer
from bench.workloads import WorkloadError, WorkloadSpec, build, lognormal_lengths
from tests.runtime.conftest import MODEL

CONTEXT = 96  # the tiny LM's


@pytest.fixture(scope="module")
def tokenizer(lm_repo):
    return load_tokenizer(lm_repo / MODEL / "1", {})


def test_fixed_prompts_have_exactly_the_asked_lengths(tokenizer):
    w = build(WorkloadSpec("fixed", 12, 5), tokenizer, CONTEXT, 6, seed=0)
    assert [len(p) for p in w.prompts] == [12] * 6 and w.output_lens == [5] * 6
    assert all(tokenizer.encode(t).ids == p for t, p in zip(w.texts, w.prompts))
    with pytest.raises(WorkloadError, match="context"):
        build(WorkloadSpec("fixed", 90, 10), tokenizer, CONTEXT, 2)


def test_mixed_lengths_are_seeded_long_tailed_and_fit_the_context(tokenizer):
    spec = WorkloadSpec("mixed", input_len=10, output_len=12, sigma=1.0)
    a = build(spec, tokenizer, CONTEXT, 64, seed=3)
    b = build(spec, tokenizer, CONTEXT, 64, seed=3)
    assert a.prompts == b.prompts and a.output_lens == b.output_lens
    assert a.prompts != build(spec, tokenizer, CONTEXT, 64, seed=4).prompts
    inputs = np.array([len(p) for p in a.prompts])
    outputs = np.array(a.output_lens)
    assert (inputs >= 1).all() and (outputs >= 1).all() and (inputs + outputs <= CONTEXT).all()
    assert len(set(inputs.tolist())) > 10 and len(set(outputs.tolist())) > 10
    assert a.params["input_lens"]["p50"] == np.percentile(inputs, 50)
    assert all(tokenizer.encode(t).ids == p for t, p in zip(a.texts, a.prompts))


def test_lognormal_lengths_have_the_median_and_a_long_tail():
    rng = np.random.default_rng(0)
    lens = lognormal_lengths(rng, 40, 1.0, 20000, 1, 10**6)
    assert np.median(lens) == pytest.approx(40, rel=0.05)
    assert np.percentile(lens, 99) > 8 * 40  # e^(2.33 sigma) ~ 10x the median
    clipped = lognormal_lengths(rng, 40, 1.0, 1000, 5, 100)
    assert clipped.min() >= 5 and clipped.max() == 100


def test_shared_prefix_requests_are_one_of_k_prefixes_plus_a_distinct_suffix(tokenizer):
    spec = WorkloadSpec("shared-prefix", output_len=8, num_prefixes=3, prefix_len=32)
    w = build(spec, tokenizer, CONTEXT, 24, seed=0)
    prefixes = {tuple(p[:32]) for p in w.prompts}
    assert len(prefixes) == 3
    assert all(len(p) == 32 + spec.suffix_len for p in w.prompts)
    assert len({tuple(p[32:]) for p in w.prompts}) == 24  # every suffix distinct
    counts = np.bincount(w.params["prefix_of_request"])
    assert counts.tolist() == [8, 8, 8]  # round robin in a seeded order
    assert all(tokenizer.encode(t).ids == p for t, p in zip(w.texts, w.prompts))
    # L defaults to 64, or what fits beside the suffix and the output
    assert build(WorkloadSpec("shared-prefix", output_len=8), tokenizer, CONTEXT, 2).params[
        "prefix_len"
    ] == min(64, CONTEXT - 8 - 8)
    assert build(WorkloadSpec("shared-prefix", output_len=40), tokenizer, CONTEXT, 2).params[
        "prefix_len"
    ] == (CONTEXT - 40 - 8)
    with pytest.raises(WorkloadError, match="context"):
        build(WorkloadSpec("shared-prefix", output_len=90), tokenizer, CONTEXT, 2)


class FakeStatic(BatchedBaseline):
    """One step takes ``step_s``; records every batch it was given."""

    name = "fake"

    def __init__(self, step_s: float = 0.01):
        self.step_s = step_s
        self.batches: list[tuple[int, int]] = []

    def generate_batch(self, prompts, output_len):
        self.batches.append((len(prompts), output_len))
        times = []
        for _ in range(output_len):
            time.sleep(self.step_s)
            times.append(time.perf_counter())
        tokens = np.array([[p[0]] * output_len for p in prompts])
        return times, tokens


def test_a_static_batch_runs_until_its_longest_request_and_the_next_waits():
    fake = FakeStatic()
    prompts = [[i] for i in range(6)]
    lens = [2, 10, 3, 2, 2, 2]
    records = fake.run(prompts, lens, concurrency=3)
    assert fake.batches == [(3, 10), (3, 2)]
    assert [r.output_tokens for r in records] == lens
    assert [r.token_ids[0] for r in records] == list(range(6))
    first, second = records[:3], records[3:]
    # request 3 was sent when request 0 finished (its client was free), yet its first token
    # comes only after request 1, the longest of the first batch, is done
    assert second[0].start == pytest.approx(first[0].token_times[-1])
    assert second[0].token_times[0] > first[1].token_times[-1]
    ttft = [r.token_times[0] - r.start for r in records]
    assert ttft[3] > 7 * fake.step_s  # it waited ~8 steps of the first batch


def test_static_batches_take_poisson_arrivals_that_came_in_meanwhile():
    fake = FakeStatic(step_s=0.005)
    fake.request_rate = 200.0
    records = fake.run([[i] for i in range(12)], 4, concurrency=12)
    assert len(records) == 12 and sum(n for n, _ in fake.batches) == 12
    assert len(fake.batches) > 1  # not one batch of everything: arrivals are spread out
    starts = [r.start for r in records]
    assert starts == sorted(starts)


def test_goodput_counts_requests_within_the_ttft_and_tpot_limits():
    records = [
        RequestRecord(0.0, [0.1, 0.2, 0.3]),  # TTFT 100 ms, TPOT 100 ms
        RequestRecord(0.0, [0.5, 0.51, 0.52]),  # TTFT 500 ms, TPOT 10 ms
        RequestRecord(0.0, [0.05]),  # one token: TTFT only
        RequestRecord(0.0, [], error="UNAVAILABLE"),
    ]
    stats = summarize(records, duration=2.0, slo=Slo(ttft_ms=200, tpot_ms=50))
    assert stats.good == 1 and stats.goodput == pytest.approx(0.5)
    stats = summarize(records, duration=2.0, slo=Slo(ttft_ms=600, tpot_ms=150))
    assert stats.good == 3 and stats.slo == {"ttft_ms": 600, "tpot_ms": 150}
    assert np.isnan(summarize(records, duration=2.0).goodput)


def test_a_static_batch_of_a_long_prompt_and_a_long_output_stays_in_the_context(lm_repo):
    """The bare loop's batch runs to its longest output; a long prompt's row must not overflow.

    96-token context: a 90-token prompt wanting 4 tokens shares a batch with a 2-token prompt
    wanting 40, so the long row steps on to position 90 + 40 > 96 (its extra tokens are
    discarded); the short row's tokens are what it makes alone.
    """
    from bench.baselines.bare import BareLoopBaseline
    from tests.runtime.conftest import MODEL

    bare = BareLoopBaseline(lm_repo, MODEL, threads=1)
    assert bare.context == 96
    rng = np.random.default_rng(0)
    long, short = rng.integers(4, 500, 90).tolist(), [5, 6]
    _, batch = bare.generate_batch([long, short], 40)
    _, alone = bare.generate_batch([short], 40)
    _, long_alone = bare.generate_batch([long], 4)
    assert batch[1].tolist() == alone[0].tolist()
    assert batch[0, :4].tolist() == long_alone[0].tolist()
