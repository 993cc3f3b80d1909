"""The scheduler and KV-cache manager against a fake model: memory, fairness, preemption,
prefix caching (a fake pool records which token every block slot holds)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.runtime.errors import InvalidPromptError, RequestTooLongError
from engine.runtime.kv_cache import BlockCopy, KVCacheConfigError, KVCacheManager, KVCacheSpec
from engine.runtime.request import Request, RequestStatus
from engine.runtime.sampling_params import SamplingParams
from engine.runtime.scheduler import Scheduler, SchedulerConfig

EOS = 0


def fake_token(request_id: str, position: int, eos_rate: int) -> int:
    """The fake model: a pure function of the request and the output position."""
    h = int.from_bytes(hashlib.blake2b(f"{request_id}:{position}".encode(), digest_size=4).digest())
    return EOS if eos_rate and h % eos_rate == 0 else 1 + h % 97


def make(rid: str, prompt: int, max_tokens: int, **kw) -> Request:
    params = SamplingParams(max_tokens=max_tokens, **kw)
    return Request(rid, list(range(1, prompt + 1)), params, eos_token_id=EOS)


class FakePool:
    """What a runner's KV pool would hold: the token id in every block slot (-1: nothing).

    It applies the manager's block copies and writes each step's computed tokens, and checks
    that every token a step treats as cached (a prefix hit, or an earlier step's) is really in
    the request's blocks: prefix caching, relocation and eviction must never serve wrong keys.
    """

    def __init__(self, kv: KVCacheManager):
        self.tokens = np.full((kv.num_blocks, kv.block_size), -1, np.int64)

    def step(self, kv: KVCacheManager, requests: list[Request]) -> None:
        for c in kv.take_copies():
            self.tokens[c.dst] = self.tokens[c.src]
        kv.take_grown()
        bs = kv.block_size
        for r in requests:
            blocks = np.asarray(kv.block_ids(r.request_id))
            pos = np.arange(r.num_tokens)
            where = blocks[pos // bs], pos % bs
            done = r.num_computed_tokens
            held = self.tokens[where[0][:done], where[1][:done]]
            assert held.tolist() == r.all_token_ids[:done], r.request_id
            self.tokens[where[0][done:], where[1][done:]] = r.all_token_ids[done:]


def step(sched: Scheduler, eos_rate: int = 0, pool: FakePool | None = None):
    """One schedule -> fake execute -> update round, checking what the step may run."""
    out = sched.schedule()
    cfg, kv = sched.config, sched.kv
    assert len(sched.running) <= cfg.max_num_seqs
    assert out.num_scheduled_tokens <= cfg.max_num_batched_tokens
    for r in out.prefill:
        cached = r.num_computed_tokens  # found in the prefix cache: whole blocks, never all
        assert cached % kv.block_size == 0 and cached < r.num_tokens
        assert kv.capacity(r.request_id) >= r.num_tokens
    for r in out.decode:
        assert r.num_computed_tokens == r.num_tokens - 1
        assert kv.capacity(r.request_id) >= r.num_tokens
    held = [b for r in sched.running for b in kv.block_ids(r.request_id)]
    assert len(held) == len(set(held)) == kv.num_used_blocks  # one holder per block
    assert all(not kv.holds(r.request_id) for r in sched.waiting)
    if pool is not None:
        pool.step(kv, out.requests)
    tokens = [fake_token(r.request_id, r.num_output_tokens, eos_rate) for r in out.requests]
    return out, sched.update(out, tokens)


def test_kv_manager_hands_out_lowest_blocks_and_counts_usage():
    kv = KVCacheManager(num_blocks=4, block_size=4, bytes_per_block=100)
    assert kv.can_admit(16) and not kv.can_admit(17)
    assert kv.admit("a", [1] * 5) == 0 and kv.block_ids("a") == [0, 1]
    assert kv.admit("b", [2] * 4) == 0 and kv.block_ids("b") == [2]
    assert kv.allocate("a", 8) and kv.block_ids("a") == [0, 1]  # already fits: no new block
    assert not kv.allocate("b", 13)  # all or nothing
    assert kv.block_ids("b") == [2] and kv.num_free_blocks == 1
    assert kv.admit("big", [3] * 8) is None  # does not fit
    assert kv.free("a") == 2 and kv.admit("c", [4]) == 0 and kv.block_ids("c") == [0]
    stats = kv.stats()
    assert (stats.used_blocks, stats.peak_used_blocks, stats.free_blocks) == (2, 3, 2)
    assert stats.peak_bytes == 300 and stats.budget_bytes == 400


def test_a_prompt_finds_the_full_blocks_an_earlier_one_computed():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    kv.admit("a", list(range(10)))
    kv.commit("a", list(range(10)), 10)  # 2 full blocks registered, the third is partial
    assert kv.cached_tokens(list(range(9)) + [99]) == 8
    assert kv.cached_tokens([0, 1, 2, 3, 9, 9, 9, 9, 9]) == 4  # the chain breaks at block 1
    assert kv.cached_tokens(list(range(8))) == 4  # never the whole prompt: its last token runs
    # while "a" runs, a hit copies its blocks into the newcomer's own
    assert kv.admit("b", list(range(8)) + [7, 7]) == 8
    b_blocks = kv.block_ids("b")
    assert [(c.src, c.dst) for c in kv.take_copies()] == [(0, b_blocks[0]), (1, b_blocks[1])]
    kv.free("a")
    kv.free("b")  # b's copies are not registered twice: they go back free
    stats = kv.stats()
    assert (stats.used_blocks, stats.cached_blocks) == (0, 2)
    assert (stats.prefix_queries, stats.prefix_hits) == (20, 8)


def test_new_blocks_are_the_lowest_and_cached_ones_move_aside_lru_last():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    for rid, tokens in (("a", [1, 2, 3]), ("b", [5, 6, 7])):
        kv.admit(rid, tokens)
        kv.commit(rid, tokens, 3)
    assert kv.block_ids("a") == [0, 1] and kv.block_ids("b") == [2, 3]
    kv.free("a")  # [1, 2] cached in block 0; block 1 free
    kv.free("b")  # [5, 6] cached in block 2 (the most recent); block 3 free
    kv.take_copies()
    assert kv.admit("c", [9, 9, 9]) == 0
    # the lowest blocks (0, 1): block 0's cached [1, 2] moves to the highest free block, 3
    assert kv.block_ids("c") == [0, 1] and kv.take_copies() == [BlockCopy(0, 3)]
    assert kv.cached_tokens([1, 2, 0]) == 2 and kv.cached_tokens([5, 6, 0]) == 2
    assert kv.admit("d", [8, 8, 8]) == 0  # no free block left: the LRU entry ([1, 2]) goes
    assert kv.block_ids("d") == [2, 3] and kv.take_copies() == [BlockCopy(2, 3)]
    assert kv.cached_tokens([1, 2, 0]) == 0 and kv.cached_tokens([5, 6, 0]) == 0
    assert kv.stats().cached_blocks == 0 and kv.num_free_blocks == 0


def test_kv_budget_is_derived_from_the_model_shape():
    spec = KVCacheSpec(num_layers=4, num_kv_heads=4, head_dim=64)
    assert spec.bytes_per_token == 2 * 4 * 4 * 64 * 4
    kv = KVCacheManager.from_budget(spec.bytes_per_token * 128 * 3 + 5, spec, block_size=128)
    assert kv.num_blocks == 3
    with pytest.raises(KVCacheConfigError, match="kv_cache_bytes"):
        KVCacheManager.from_budget(100, spec, block_size=128)


def test_a_budget_smaller_than_one_context_is_refused():
    with pytest.raises(KVCacheConfigError, match="max_model_len"):
        Scheduler(SchedulerConfig(max_model_len=64), KVCacheManager(3, 16))


def test_prompts_that_cannot_run_are_refused_with_a_clear_error():
    sched = Scheduler(SchedulerConfig(max_model_len=16), KVCacheManager(4, 16))
    with pytest.raises(RequestTooLongError, match="16"):
        sched.add_request(make("long", 16, 4))
    with pytest.raises(InvalidPromptError, match="empty"):
        sched.add_request(make("empty", 0, 4))
    sched.add_request(make("twice", 2, 4))
    with pytest.raises(InvalidPromptError, match="already in use"):
        sched.add_request(make("twice", 2, 4))


def test_requests_join_and_leave_between_steps():
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_model_len=32), KVCacheManager(4, 32))
    sched.add_request(make("a", 3, 5))
    out, _ = step(sched)
    assert [r.request_id for r in out.prefill] == ["a"]
    sched.add_request(make("b", 2, 1))
    out, done = step(sched)
    assert [r.request_id for r in out.decode] == ["a"]
    assert [r.request_id for r in out.prefill] == ["b"]
    assert {r.request_id: r.finish_reason for r in done} == {"a": None, "b": "length"}
    out, _ = step(sched)
    assert out.finished_ids == ["b"] and [r.request_id for r in out.decode] == ["a"]


def test_abort_frees_memory_at_once_and_drops_the_in_flight_token():
    sched = Scheduler(SchedulerConfig(max_model_len=32), KVCacheManager(2, 32))
    sched.add_request(make("a", 3, 10))
    sched.add_request(make("b", 3, 10))
    out = sched.schedule()
    assert sched.kv.num_used_blocks == 2
    aborted = sched.abort("a")  # while the step "runs"
    assert aborted.finish_reason == "abort" and sched.kv.num_used_blocks == 1
    done = sched.update(out, [5, 6])
    assert [r.request_id for r in done] == ["b"] and aborted.output_token_ids == []
    assert sched.abort("a") is None


def test_memory_pressure_preempts_the_newest_which_resumes_with_its_tokens():
    # 6 blocks of 2 tokens: two requests of 4 prompt tokens grow until one must give way.
    sched = Scheduler(
        SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=12),
        KVCacheManager(6, 2),
    )
    first, second = make("first", 4, 7), make("second", 4, 7)
    sched.add_request(first)
    sched.add_request(second)
    preempted = []
    while sched.has_unfinished:
        out, _ = step(sched)
        preempted += out.preempted_ids
    assert preempted and set(preempted) == {"second"}
    assert second.num_preemptions >= 1 and sched.kv.stats().preemptions == len(preempted)
    for r in (first, second):
        assert r.finish_reason == "length"
        assert r.output_token_ids == [fake_token(r.request_id, i, 0) for i in range(7)]
    assert sched.kv.num_used_blocks == 0


def scenarios(tight: bool) -> st.SearchStrategy:
    """Random workloads; ``tight`` ones have little spare memory and short prompts, so
    running requests outgrow the cache and preemption is the norm rather than the exception."""
    return st.fixed_dictionaries(
        {
            "max_num_seqs": st.integers(2, 6) if tight else st.integers(1, 6),
            "block_size": st.integers(1, 4) if tight else st.integers(1, 8),
            "max_model_len": st.integers(8, 24) if tight else st.integers(4, 24),
            "extra_blocks": st.integers(0, 2) if tight else st.integers(0, 12),
            "budget_extra": st.integers(0, 40),
            "prefix_caching": st.booleans(),
            "eos_rate": st.sampled_from([0, 20] if tight else [0, 3, 10]),
            "requests": st.lists(
                st.tuples(
                    st.integers(0, 3) if tight else st.integers(0, 30),  # arrival step
                    st.integers(1, 4) if tight else st.integers(1, 30),  # prompt (clipped)
                    st.integers(8, 30) if tight else st.integers(1, 30),  # max_tokens
                    st.one_of(st.none(), st.integers(0, 60)),  # abort step
                ),
                min_size=2 if tight else 1,
                max_size=25,
            ),
        }
    )


@settings(max_examples=120, deadline=None)
@given(st.one_of(scenarios(tight=False), scenarios(tight=True)))
def test_every_request_finishes_or_is_aborted_memory_returns_to_zero_and_fcfs_holds(s):
    cfg = SchedulerConfig(
        max_num_seqs=s["max_num_seqs"],
        max_num_batched_tokens=max(s["max_model_len"], s["max_num_seqs"]) + s["budget_extra"],
        max_model_len=s["max_model_len"],
    )
    bs = s["block_size"]
    blocks = -(-cfg.max_model_len // bs) + s["extra_blocks"]
    kv = KVCacheManager(blocks, bs, enable_prefix_caching=s["prefix_caching"])
    sched, pool = Scheduler(cfg, kv), FakePool(kv)
    reqs = []
    for i, (arrive, prompt, max_tokens, abort_at) in enumerate(s["requests"]):
        prompt = min(prompt, cfg.max_model_len - 1)
        reqs.append((arrive, make(f"r{i}", prompt, max_tokens), abort_at))
    admitted_order: list[str] = []
    # Work is bounded: each request prefills at most once per preemption and decodes at most
    # max_tokens times; preemptions are bounded because the oldest running request never
    # gives way. A generous cap turns starvation into a failure instead of a hang.
    for t in range(5000):
        for arrive, r, abort_at in reqs:
            if arrive == t:
                sched.add_request(r)
            if abort_at == t and arrive <= t:
                sched.abort(r.request_id)
        out, _ = step(sched, s["eos_rate"], pool)
        admitted_order += [r.request_id for r in out.prefill if r.num_preemptions == 0]
        if not sched.has_unfinished and t > max(a for a, _, _ in reqs):
            break
    else:
        pytest.fail("requests starved: the scheduler did not finish them")
    assert kv.num_used_blocks == 0 and not sched.running and not sched.waiting
    arrival = [r.request_id for _, r, _ in sorted(reqs, key=lambda x: x[0])]
    assert admitted_order == [rid for rid in arrival if rid in admitted_order]  # FCFS
    for _, r, _ in reqs:
        assert r.is_finished
        expected = [fake_token(r.request_id, i, s["eos_rate"]) for i in range(r.num_output_tokens)]
        assert r.output_token_ids == expected  # recompute after preemption lost nothing
        if r.finish_reason == "stop":
            assert r.output_token_ids[-1] == EOS
        elif r.finish_reason == "length":
            assert r.num_output_tokens == r.params.max_tokens or r.num_tokens == cfg.max_model_len
            assert EOS not in r.output_token_ids
        else:
            assert r.finish_reason == "abort"


def test_a_request_status_reports_openai_finish_reasons():
    r = make("x", 2, 1)
    assert r.finish_reason is None and not r.is_finished
    r.status = RequestStatus.FINISHED_LENGTH
    assert r.finish_reason == "length" and r.is_finished
    assert make("y", 2, 1, seed=5).seed == 5 and make("z", 2, 1).seed >= 0
