"""The generate engine end to end on a tiny exported model: tokens, streaming, stops, memory."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from engine.errors import EngineError
from engine.runtime import Engine, EngineConfig, LLMEngine, SamplingParams
from engine.runtime.errors import InvalidSamplingParamsError, RequestTooLongError
from tests.runtime.conftest import MODEL

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
from bare_loop import greedy, load_session  # noqa: E402

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(lm_repo) -> LLMEngine:
    """An engine with fewer slots than most tests send requests, so slots get reused."""
    return Engine.from_repository(lm_repo, MODEL, threads=1, config=EngineConfig(max_num_seqs=4))


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(4, 8000, n).tolist() for n in (3, 17, 9, 40, 1, 26)]


def test_greedy_tokens_match_a_bare_loop_over_the_default_graph(engine, lm_repo, prompts):
    session = load_session(lm_repo / MODEL / "1" / "model.onnx", threads=1)
    expected = [greedy(session, [p], GREEDY.max_tokens)[0].tolist() for p in prompts]
    outs = engine.generate_all(prompts, GREEDY)  # 6 requests through 4 slots
    assert [o.token_ids for o in outs] == expected
    assert len({t for e in expected for t in e}) > 40  # the model does not just repeat itself
    assert all(o.finish_reason == "length" and o.usage.completion_tokens == 24 for o in outs)
    assert all(o.text == engine.tokenizer.decode(o.token_ids) for o in outs)
    assert engine.kv_stats().used_blocks == 0


def test_io_binding_and_plain_runs_give_the_same_tokens_as_slots_come_and_go(lm_repo, prompts):
    """Bound decode steps reuse their binding while the slot range holds; tokens must not care."""
    mixed = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (3, 20, 7)]
    results = []
    for io_binding in (True, False):  # requests of different lengths leave holes in the range
        config = EngineConfig(max_num_seqs=4, io_binding=io_binding)
        engine = Engine.from_repository(lm_repo, MODEL, threads=1, config=config)
        ids = [engine.add_request(p, mixed[i % 3]) for i, p in enumerate(prompts)]
        final = {}
        while engine.has_unfinished:
            final.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
        results.append([final[i] for i in ids])
    assert results[0] == results[1]
    assert [len(r) for r in results[0]] == [3, 20, 7, 3, 20, 7]


def test_a_request_admitted_while_others_decode_gets_its_first_token_before_their_decode(
    lm_repo, prompts
):
    """With ``emit``, a mixed step hands out the newcomers' first tokens between the prefill
    and the decode graph: their time to first token skips the running batch's decode."""
    engine = Engine.from_repository(lm_repo, MODEL, threads=1, config=EngineConfig())
    events = []
    execute = engine.runner.execute

    def spy(out, slots):
        events.append(("prefill" if out.prefill else "", "decode" if out.decode else ""))
        return execute(out, slots)

    engine.runner.execute = spy
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    running = engine.add_request(prompts[0], params)
    engine.step()  # its prefill
    newcomer = engine.add_request(prompts[1], params)
    events.clear()
    emitted = []
    returned = engine.step(emit=lambda outs: emitted.append((list(events), outs)))
    assert events == [("prefill", ""), ("", "decode")]  # two graph calls, prefill first
    ((before, outs),) = emitted
    assert before == [("prefill", "")]  # emitted before the decode ran
    assert [o.request_id for o in outs] == [newcomer] and len(outs[0].token_ids) == 1
    assert [o.request_id for o in returned] == [running]
    assert engine.num_steps == 2
    final = {}
    while engine.has_unfinished:
        final.update({o.request_id: o.token_ids for o in engine.step(emit=lambda o: None)})
    alone = Engine.from_repository(lm_repo, MODEL, threads=1, config=EngineConfig())
    assert [final[running], final[newcomer]] == [
        o.token_ids for o in alone.generate_all(prompts[:2], params)
    ]


def test_prompts_of_very_different_lengths_prefill_in_separate_calls_with_the_same_tokens(
    lm_repo, prompts
):
    """Padding a 1-token prompt to a 40-token one wastes 39 positions through the whole model:
    such a step runs one graph call per length group, and every token stays the same."""
    from engine.runtime.model_runner import length_groups

    groups = length_groups(np.array([40, 3, 17, 9, 1, 26]))
    assert sorted(np.concatenate(groups).tolist()) == list(range(6))
    assert [g.tolist() for g in groups] == [[4, 1, 3, 2, 5], [0]]  # shortest first; 40 alone
    assert len(length_groups(np.array([30] * 16))) == 1
    engine = Engine.from_repository(lm_repo, MODEL, threads=1, config=EngineConfig())
    widths = []
    run = engine.runner.backend.run

    def spy(feeds, *args, **kwargs):
        widths.append(feeds["input_ids"].shape)
        return run(feeds, *args, **kwargs)

    engine.runner.backend.run = spy
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = engine.generate_all([prompts[4], prompts[3], prompts[0]], params)  # 1, 40, 3 tokens
    assert widths[:2] == [(2, 3), (1, 40)]  # one step, two prefill calls
    alone = [engine.generate_all([p], params)[0].token_ids for p in (prompts[4], prompts[3])]
    assert [o.token_ids for o in outs[:2]] == alone


def test_every_decode_steps_block_inputs_describe_each_rows_cache(lm_repo, prompts):
    """Steps that reuse the last step's block inputs (one more token unmasked) and steps that
    recompute them (a new block, a row leaving) alike: each row attends to exactly its cached
    tokens, and every block weighted for a row is that row's, at its place in the row's table."""
    engine = Engine.from_repository(lm_repo, MODEL, threads=1, config=EngineConfig(max_num_seqs=4))
    checked = []
    run = engine.runner.backend.run

    def spy(feeds, *args, **kwargs):
        if feeds["input_ids"].shape[1] == 1:  # a decode step
            n, nb, bs = feeds["block_mask"].shape
            mask = feeds["block_mask"].reshape(n, -1)
            lengths = feeds["position_ids"][:, 0]  # = each row's cached tokens
            assert (mask.sum(axis=1) == lengths).all()
            assert all(mask[b, : lengths[b]].all() for b in range(n))
            table, weights = feeds["block_table"], feeds["block_weights"]
            rows, slots = feeds["block_rows"], feeds["block_slots"]
            for b in range(n):
                mine = np.flatnonzero(weights[b])
                held = -(-int(lengths[b]) // bs)
                assert sorted(mine.tolist()) == sorted(table[b, :held].tolist())
                assert (rows[mine] == b).all()
                assert (table.reshape(-1)[slots[mine]] == mine).all()
            assert weights.sum() == sum(-(-int(x) // bs) for x in lengths)
            checked.append(n)
        return run(feeds, *args, **kwargs)

    engine.runner.backend.run = spy
    recomputed = []
    block_inputs = engine.runner._block_inputs
    engine.runner._block_inputs = lambda *a: recomputed.append(1) or block_inputs(*a)
    mixed = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (5, 30, 12)]
    outs = {}
    for i, p in enumerate(prompts):  # 6 requests through 4 slots: rows come and go
        engine.add_request(p, mixed[i % 3], request_id=str(i))
    while engine.has_unfinished:
        for out in engine.step():
            outs[out.request_id] = out.token_ids
    assert len(checked) >= 30 and len(set(checked)) >= 2
    assert 5 < len(recomputed) < len(checked) - 5  # both kinds of step were checked
    session = load_session(lm_repo / MODEL / "1" / "model.onnx", threads=1)
    for i, p in enumerate(prompts):
        assert outs[str(i)] == greedy(session, [p], mixed[i % 3].max_tokens)[0].tolist()


def test_a_lone_decode_binds_only_the_pool_blocks_its_sequence_holds(lm_repo, prompts):
    """Every pool block bound is scored by the graph: one row binds exactly its own blocks."""
    engine = Engine.from_repository(lm_repo, MODEL, threads=1, config=EngineConfig())
    seen = []
    run = engine.runner.backend.run

    def spy(feeds, *args, **kwargs):
        if feeds["input_ids"].shape == (1, 1):  # a one-row decode step
            seen.append((len(feeds["block_rows"]), int(feeds["block_table"].max()) + 1))
        return run(feeds, *args, **kwargs)

    engine.runner.backend.run = spy
    engine.generate_all([prompts[1]], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    assert len(seen) == 39 and {used for _, used in seen} == {2, 3, 4}  # 17 -> 56 tokens
    assert all(bound == used for bound, used in seen)


def test_a_seeded_request_is_reproducible_alone_and_among_16_mixed_requests(lm_repo, prompts):
    engine = Engine.from_repository(lm_repo, MODEL, threads=1, config=EngineConfig())
    target = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=30, ignore_eos=True)
    alone = engine.generate_all([prompts[1]], target)[0].token_ids
    others = [
        SamplingParams(temperature=0.0, max_tokens=10),
        SamplingParams(temperature=1.2, top_k=20, max_tokens=40, ignore_eos=True),
        SamplingParams(temperature=0.7, min_p=0.05, repetition_penalty=1.3, max_tokens=5),
        SamplingParams(temperature=1.0, frequency_penalty=0.5, seed=9, max_tokens=35),
    ]
    ids = []
    for i in range(16):
        if i == 7:
            ids.append(engine.add_request(prompts[1], target))
        else:
            ids.append(engine.add_request(prompts[i % len(prompts)], others[i % len(others)]))
    final = {}
    while engine.has_unfinished:
        final.update({o.request_id: o for o in engine.step() if o.finished})
    assert final[ids[7]].token_ids == alone
    different = SamplingParams(temperature=0.9, top_p=0.95, seed=4321, max_tokens=30)
    assert engine.generate_all([prompts[1]], different)[0].token_ids != alone


def test_a_stop_string_spanning_tokens_ends_the_text_before_it(engine, prompts):
    full = engine.generate_all([prompts[0]], GREEDY)[0]
    text = full.text
    cut = len(text) // 2
    stop = text[cut : cut + 3]
    assert len(stop) == 3
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop])
    out = engine.generate_all([prompts[0]], params)[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.find(stop)]


def test_streaming_yields_deltas_that_add_up_and_a_final_usage(engine):
    async def collect():
        return [o async for o in engine.generate("def add(a, b):", GREEDY)]

    outs = asyncio.run(collect())
    assert "".join(o.delta_text for o in outs) == outs[-1].text
    assert [t for o in outs for t in o.delta_token_ids] == outs[-1].token_ids
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    assert outs[-1].usage.prompt_tokens == len(engine.encode("def add(a, b):"))
    assert outs[-1].usage.completion_tokens == 24


def test_a_consumer_that_falls_behind_gets_the_backlog_merged_into_fewer_outputs(engine):
    async def collect_slowly():
        outs = []
        async for o in engine.generate("def add(a, b):", GREEDY):
            outs.append(o)
            await asyncio.sleep(0.02)  # the engine steps meanwhile; outputs pile up
        return outs

    outs = asyncio.run(collect_slowly())
    fast = asyncio.run(_collect(engine, "def add(a, b):"))
    assert len(outs) < 24 and max(len(o.delta_token_ids) for o in outs) > 1
    assert [t for o in outs for t in o.delta_token_ids] == outs[-1].token_ids == fast[-1].token_ids
    assert "".join(o.delta_text for o in outs) == outs[-1].text == fast[-1].text
    assert outs[-1].finished and outs[-1].usage.completion_tokens == 24


async def _collect(engine, prompt):
    return [o async for o in engine.generate(prompt, GREEDY)]


def test_abort_and_leaving_a_stream_early_free_memory_at_once(engine, prompts):
    async def scenario():
        long = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
        seen = []

        async def aborted():
            async for o in engine.generate(prompts[2], long, request_id="to-abort"):
                seen.append(o)
                if len(seen) == 3:
                    engine.abort("to-abort")

        async def abandoned():
            async for _ in engine.generate(prompts[3], long, request_id="to-leave"):
                break  # closing the generator aborts the request

        await asyncio.gather(aborted(), abandoned())
        return seen

    seen = asyncio.run(scenario())
    # The engine steps in its own thread: tokens made before the abort landed still arrive,
    # merged into the last output, and none after it.
    assert seen[-1].finished and seen[-1].finish_reason == "abort"
    assert len(seen) == 4 and not any(o.finished for o in seen[:3])
    tokens = [t for o in seen for t in o.delta_token_ids]
    assert tokens == seen[-1].token_ids and 3 <= seen[-1].usage.completion_tokens < 60
    assert not engine.has_unfinished and engine.kv_stats().used_blocks == 0


def test_a_failing_step_fails_every_stream_instead_of_hanging_them(lm_repo, prompts):
    engine = Engine.from_repository(lm_repo, MODEL, threads=1, config=EngineConfig(max_num_seqs=4))
    execute = engine.runner.execute
    calls = []

    def fail_on_the_third_step(out, slots):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the graph failed")
        return execute(out, slots)

    engine.runner.execute = fail_on_the_third_step

    async def stream(prompt):
        return [o async for o in engine.generate(prompt, GREEDY)]

    async def both():
        return await asyncio.gather(*(stream(p) for p in prompts[:2]), return_exceptions=True)

    results = asyncio.run(asyncio.wait_for(both(), 60))
    assert all(isinstance(r, RuntimeError) and "graph failed" in str(r) for r in results)
    assert not engine.has_unfinished and engine.kv_stats().used_blocks == 0


def test_logprobs_are_reported_for_each_token(engine, prompts):
    params = SamplingParams(temperature=0.0, max_tokens=3, logprobs=2)
    outs = []
    rid = engine.add_request(prompts[0], params)
    while engine.has_unfinished:
        outs += [o for o in engine.step() if o.request_id == rid]
    for o in outs:
        (lp,) = o.logprobs
        assert lp.token_id == o.delta_token_ids[0] and lp.logprob <= 0
        assert lp.top[0][0] == lp.token_id and len(lp.top) == 2  # greedy took the top token


def test_bad_requests_raise_engine_errors_with_clear_messages(engine):
    with pytest.raises(InvalidSamplingParamsError, match="top_p"):
        engine.add_request("x", SamplingParams(top_p=0.0))
    with pytest.raises(RequestTooLongError, match="context"):
        engine.add_request(list(range(4, 4 + engine.max_model_len)))
    assert not engine.has_unfinished


def _run_counting(engine: LLMEngine, prompts, params) -> tuple[list, int]:
    """Run prompts to completion; return the outputs and the most requests running at once."""
    ids = [engine.add_request(p, params) for p in prompts]
    final, most = {}, 0
    while engine.has_unfinished:
        for o in engine.step():
            if o.finished:
                final[o.request_id] = o
        most = max(most, engine.scheduler.num_running)
    return [final[i] for i in ids], most


def test_a_kv_budget_of_two_contexts_runs_more_than_two_sequences_at_once(lm_repo, prompts):
    """Memory follows tokens: a sequence holds a block per 16 tokens, not a whole context."""
    probe = Engine.from_repository(lm_repo, MODEL, threads=1)
    per_block, block = probe.kv_stats().bytes_per_block, probe.kv_stats().block_size
    blocks = 2 * (96 // block)  # two full contexts of the tiny model
    config = EngineConfig(max_num_seqs=8, kv_cache_bytes=blocks * per_block + 100)
    engine = Engine.from_repository(lm_repo, MODEL, threads=1, config=config)
    stats = engine.kv_stats()
    assert stats.num_blocks == blocks and engine.runner.kv_bytes == blocks * per_block
    short = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    outs, most = _run_counting(engine, [p[:9] for p in prompts], short)
    assert most == 6  # six 15-token sequences (one block each) in two contexts' memory
    assert all(o.finish_reason == "length" for o in outs)
    assert engine.kv_stats().peak_bytes <= engine.kv_stats().budget_bytes
    assert engine.kv_stats().used_blocks == 0


def test_a_kv_budget_past_max_num_seqs_allocates_only_what_can_run(lm_repo):
    config = EngineConfig(max_num_seqs=3)
    probe = Engine.from_repository(lm_repo, MODEL, threads=1, config=config)
    per_block, block = probe.kv_stats().bytes_per_block, probe.kv_stats().block_size
    full = 3 * (96 // block)  # max_num_seqs full contexts: all that can ever be in use
    assert probe.kv_stats().num_blocks == full and probe.runner.kv_bytes == full * per_block
    config = EngineConfig(max_num_seqs=3, kv_cache_bytes=10 * full * per_block)
    engine = Engine.from_repository(lm_repo, MODEL, threads=1, config=config)
    assert engine.kv_stats().num_blocks == full and engine.runner.kv_bytes == full * per_block


def test_running_out_of_kv_memory_preempts_and_recomputes_with_the_same_tokens(lm_repo, prompts):
    """Through LLMEngine: requests that outgrow the pool are preempted and recomputed for real."""
    long = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    wanted = [p[:30] for p in prompts if len(p) >= 26] + [prompts[1], prompts[2]]
    reference = Engine.from_repository(lm_repo, MODEL, threads=1)
    expected = [o.token_ids for o in reference.generate_all(wanted, long)]
    assert reference.kv_stats().preemptions == 0
    per_block = reference.kv_stats().bytes_per_block
    for caching in (True, False):
        config = EngineConfig(
            max_num_seqs=4, kv_cache_bytes=8 * per_block, enable_prefix_caching=caching
        )  # 8 blocks; a sequence of 30 + 50 tokens needs 5 by its end
        engine = Engine.from_repository(lm_repo, MODEL, threads=1, config=config)
        outs = engine.generate_all(wanted, long)
        assert [o.token_ids for o in outs] == expected, caching
        stats = engine.kv_stats()
        assert stats.preemptions > 0 and stats.used_blocks == 0
        assert stats.peak_used_blocks <= 8
        if caching:  # a preempted request finds its own full blocks again, unless reclaimed
            assert stats.prefix_hits > 0


def test_an_altered_file_is_refused_before_anything_loads(lm_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(lm_repo, repo)
    graph = repo / MODEL / "1" / "kv_inplace.onnx"
    graph.write_bytes(graph.read_bytes()[:-1] + b"\0")
    with pytest.raises(EngineError, match="kv_inplace.onnx"):
        Engine.from_repository(repo, MODEL)
    with pytest.raises(EngineError, match="no model"):
        Engine.from_repository(repo, "missing-model")


def test_a_repository_with_one_model_needs_no_model_name(lm_repo):
    engine = Engine.from_repository(lm_repo, threads=1)
    assert engine.model.name == MODEL and engine.model.version == 1


def test_the_serving_path_never_imports_torch(lm_repo):
    script = textwrap.dedent(
        f"""
        import asyncio, json, sys
        from engine.runtime import Engine, SamplingParams
        engine = Engine.from_repository({str(lm_repo)!r}, {MODEL!r}, threads=1)
        async def main():
            params = SamplingParams(temperature=0.8, seed=1, max_tokens=5, stop=["zz"])
            return [o.delta_text async for o in engine.generate("def f(x):", params)]
        deltas = asyncio.run(main())
        print(json.dumps({{"deltas": deltas, "torch": "torch" in sys.modules}}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["torch"] is False and len(result["deltas"]) >= 1


def test_greedy_outputs_are_identical_with_prefix_caching_on_and_off(lm_repo):
    """Prompts sharing a 48-token prefix: the cache serves it, the tokens do not change."""
    rng = np.random.default_rng(7)
    prefix = rng.integers(4, 8000, 48).tolist()
    shared = [prefix + rng.integers(4, 8000, n).tolist() for n in (1, 5, 16, 9, 3, 20)]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    results = {}
    for caching in (False, True):
        config = EngineConfig(max_num_seqs=4, enable_prefix_caching=caching)
        engine = Engine.from_repository(lm_repo, MODEL, threads=1, config=config)
        first = engine.generate_all(shared[:1], params)  # computes and caches the prefix
        rest = engine.generate_all(shared[1:], params)  # 5 requests through 4 slots
        results[caching] = [o.token_ids for o in first + rest], engine.kv_stats()
    (off, off_stats), (on, on_stats) = results[False], results[True]
    assert on == off
    assert off_stats.prefix_hits == 0 and on_stats.prefix_queries == off_stats.prefix_queries
    # every later request found the prefix's 3 full blocks (48 tokens) cached
    assert on_stats.prefix_hits >= 5 * 48
    session = load_session(lm_repo / MODEL / "1" / "model.onnx", threads=1)
    assert on[3] == greedy(session, [shared[3]], 20)[0].tolist()


def _spec(name, shape, dtype="int64"):
    return {"name": name, "dtype": dtype, "shape": shape}


_DENSE_ROW = ["batch", 2, "cache_sequence", 32]
_POOL = ["pool_blocks", 2, 16, 32]
# kv_inplace signatures of earlier exports, besides input_ids and position_ids
OLD_KV_INPUTS = {
    # before the paged cache: one dense cache row per sequence
    "dense": [
        _spec("cache_mask", ["batch", "cache_sequence"]),
        _spec("new_mask", ["batch", "sequence"]),
        _spec("cache.0.key", _DENSE_ROW, "float32"),
        _spec("cache.0.value", _DENSE_ROW, "float32"),
    ],
    # paged, but computing its masks and block roles in the graph
    "paged-v1": [
        _spec("new_mask", ["batch", "sequence"]),
        _spec("cache_lens", ["batch"]),
        _spec("block_table", ["batch", "table_blocks"]),
        _spec("block_owner", ["pool_blocks"]),
        _spec("block_index", ["pool_blocks"]),
        _spec("cache.0.key", _POOL, "float32"),
        _spec("cache.0.value", _POOL, "float32"),
    ],
}


@pytest.mark.parametrize(
    "layout,why",
    [("dense", "before the paged KV cache"), ("paged-v1", "computes its masks and block rows")],
)
def test_a_version_exported_with_an_older_kv_graph_asks_to_be_re_exported(layout, why):
    """The runner and the server's load check (the serving contract) both refuse it in one
    line that says why and to re-export, before building anything."""
    from engine.repository import Manifest
    from engine.runtime.errors import ModelSignatureError
    from engine.runtime.model_runner import InplaceGraph
    from engine.serving_contract import ServingContractError, check_serving

    tokens = ["batch", "sequence"]
    old = {
        "inputs": [_spec("input_ids", tokens), _spec("position_ids", tokens)]
        + OLD_KV_INPUTS[layout],
        "outputs": [_spec("logits", ["batch", "sequence", 8], "float32"), _spec("new.0.key", [])],
    }
    with pytest.raises(ModelSignatureError, match=f"{why}.*re-export"):
        InplaceGraph.from_manifest(old)
    serving = {"context_length": 64, "vocab_size": 8}
    manifest = Manifest(
        "lm", 1, "onnx", "generate", "decoder-lm", serving, graphs={"kv_inplace": old}
    )
    with pytest.raises(ServingContractError, match=f"{why}.*re-export"):
        check_serving(manifest, "model 'lm' version 1")


def test_a_prefill_mixing_a_cached_prompt_and_a_long_fresh_one_stays_in_the_context(lm_repo):
    """The padding of a row with a long cached prefix must not get positions past the context."""
    rng = np.random.default_rng(3)
    prefix = rng.integers(4, 8000, 64).tolist()
    cached_then_short = prefix + [11, 12]  # 64 tokens cached, 2 to compute
    long_fresh = rng.integers(4, 8000, 85).tolist()  # 85 to compute, in the same step
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outs = {}
    for caching in (True, False):
        config = EngineConfig(max_num_seqs=4, enable_prefix_caching=caching)
        engine = Engine.from_repository(lm_repo, MODEL, threads=1, config=config)
        engine.generate_all([prefix + [5]], params)  # caches the prefix
        outs[caching] = [
            o.token_ids for o in engine.generate_all([cached_then_short, long_fresh], params)
        ]
        if caching:
            assert engine.kv_stats().prefix_hits == 64
    assert outs[True] == outs[False]
