"""The batched sampler: greedy, truncation, the distribution it draws from, penalties, seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import EngineError
from engine.runtime import sampler as sampler_mod
from engine.runtime.errors import InvalidSamplingParamsError
from engine.runtime.sampler import SamplingArrays, apply_penalties, random_uniforms, sample
from engine.runtime.sampling_params import SamplingParams
from engine.runtime.sampling_state import SamplingState


def arrays(params: list[SamplingParams], seeds=None) -> SamplingArrays:
    return SamplingArrays.from_params(params, seeds or list(range(len(params))))


def kept_set(logits: np.ndarray, p: SamplingParams) -> set[int]:
    """Reference: the tokens a request may draw, by a plain full sort (ties: lower id first)."""
    z = logits.astype(np.float64) / p.temperature
    order = sorted(range(len(z)), key=lambda i: (-logits[i], i))
    prob = np.exp(z - z.max())
    keep = [i for i in order if prob[i] >= p.min_p * prob.max()]
    if p.top_k:
        keep = keep[: p.top_k]
    mass = np.array([prob[i] for i in keep])
    if p.top_p < 1.0:
        cum = np.cumsum(mass) / mass.sum()
        n = int(np.searchsorted(cum, p.top_p - 1e-9)) + 1  # float slack at the boundary
        keep = keep[: min(n + 1, len(keep))] if abs(cum[n - 1] - p.top_p) < 1e-6 else keep[:n]
    return set(keep)


def truncated_distribution(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    keep = sorted(kept_set(logits, p))
    z = logits.astype(np.float64) / p.temperature
    prob = np.zeros(len(logits))
    prob[keep] = np.exp(z[keep] - z.max())
    return prob / prob.sum()


def chi2_critical(df: int, z: float = 5.0) -> float:
    """Wilson-Hilferty upper quantile of chi-square; z = 5 is a ~3e-7 false-alarm rate."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


logit_rows = st.integers(2, 300).flatmap(
    lambda v: st.lists(
        st.floats(-20, 20, allow_nan=False, width=32).map(lambda f: round(f, 1)),  # ties happen
        min_size=v,
        max_size=v,
    )
)


@settings(max_examples=60, deadline=None)
@given(logit_rows, st.floats(0.05, 3.0), st.integers(0, 2**64 - 1))
def test_top_k_1_equals_greedy(row, temperature, seed):
    logits = np.array([row, row[::-1]], np.float32)
    greedy = sample(logits, arrays([SamplingParams(temperature=0)] * 2), np.zeros(2, np.int64))
    top1 = SamplingParams(temperature=temperature, top_k=1, seed=seed)
    drawn = sample(logits, arrays([top1] * 2, [seed, seed]), np.arange(2))
    assert drawn.token_ids.tolist() == greedy.token_ids.tolist()
    assert greedy.token_ids.tolist() == [int(np.argmax(r)) for r in logits]


@settings(max_examples=60, deadline=None)
@given(
    logit_rows,
    st.floats(0.2, 2.0),
    st.sampled_from([0, 0, 1, 3, 50]),
    st.sampled_from([1.0, 0.95, 0.5, 0.1]),
    st.sampled_from([0.0, 0.0, 0.05, 0.3]),
    st.integers(0, 2**63),
)
def test_nothing_outside_the_truncated_set_is_ever_drawn(row, temperature, k, top_p, min_p, seed):
    logits = np.array(row, np.float32)
    p = SamplingParams(temperature=temperature, top_k=k, top_p=top_p, min_p=min_p)
    allowed = kept_set(logits, p)
    n = 400  # 400 draws of one request: one row per step, all in one call
    batch = np.repeat(logits[None], n, axis=0)
    out = sample(batch, arrays([p] * n, [seed] * n), np.arange(n))
    assert set(out.token_ids.tolist()) <= allowed


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-8, 8, allow_nan=False, width=32), min_size=70, max_size=200),
    st.sampled_from([0, 5, 100]),
    st.sampled_from([1.0, 0.99, 0.6]),
    st.sampled_from([0.0, 0.001]),
    st.integers(0, 2**63),
)
def test_the_short_prefix_path_draws_what_a_full_sort_draws(row, k, top_p, min_p, seed):
    logits = np.repeat(np.array(row, np.float32)[None], 64, axis=0)
    p = SamplingParams(temperature=1.0, top_k=k, top_p=top_p, min_p=min_p)
    a = arrays([p] * 64, [seed] * 64)
    fast = sample(logits, a, np.arange(64)).token_ids
    old = sampler_mod._PREFIXES
    try:
        for prefixes in [(1 << 62,), (3, 1 << 62), (8, 40, 1 << 62)]:  # full sort; other ladders
            sampler_mod._PREFIXES = prefixes
            assert sample(logits, a, np.arange(64)).token_ids.tolist() == fast.tolist()
    finally:
        sampler_mod._PREFIXES = old


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_p=0.8),
        SamplingParams(temperature=1.3, top_k=4),
        SamplingParams(temperature=1.0, min_p=0.1),
        SamplingParams(temperature=0.9, top_k=7, top_p=0.9, min_p=0.02),
    ],
    ids=["plain", "top_p", "top_k", "min_p", "all"],
)
@pytest.mark.parametrize("vocab", [12, 300], ids=["small-vocab", "long-tail"])
def test_draws_follow_the_truncated_distribution(params, vocab):
    rng = np.random.default_rng(vocab)
    logits = (rng.standard_normal(vocab) * (2.0 if vocab < 50 else 1.2)).astype(np.float32)
    expected = truncated_distribution(logits, params)
    n = 40_000
    out = sample(np.repeat(logits[None], n, 0), arrays([params] * n, [1234] * n), np.arange(n))
    counts = np.bincount(out.token_ids, minlength=vocab)
    assert counts[expected == 0].sum() == 0
    # Pool the bins expected to hold fewer than 5 draws so the chi-square approximation holds.
    e = expected * n
    big = e >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(e[big], e[~big].sum())
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df = int(keep.sum()) - 1
    assert stat < chi2_critical(df), (stat, df)


def test_uniforms_are_uniform_and_a_function_of_seed_and_step_only():
    steps = np.arange(200_000)
    u = random_uniforms(np.full(len(steps), 7, np.uint64), steps)
    assert u.min() >= 0.0 and u.max() < 1.0
    counts = np.bincount((u * 50).astype(int), minlength=50)
    stat = float(((counts - 4000.0) ** 2 / 4000.0).sum())
    assert stat < chi2_critical(49)
    again = random_uniforms(np.array([7, 8, 7], np.uint64), np.array([5, 5, 6]))
    assert again[0] == u[5] and again[2] == u[6] and again[1] != u[5]


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = np.array([[2.0, -2.0, 2.0, -2.0, 1.0]], np.float32)
    counts = np.array([[1, 0, 0, 3, 0]], np.int32)  # tokens 0 and 3 were generated
    prompt = np.array([[False, True, False, False, False]])  # token 1 was in the prompt
    p = arrays([SamplingParams(repetition_penalty=2.0)])
    out = apply_penalties(logits, p, counts, prompt)
    np.testing.assert_allclose(out, [[1.0, -4.0, 2.0, -4.0, 1.0]])


def test_presence_and_frequency_penalties_subtract_as_openai_documents():
    logits = np.array([[1.0, 1.0, 1.0, 1.0]], np.float32)
    counts = np.array([[0, 1, 3, 0]], np.int32)
    prompt = np.array([[False, False, False, True]])  # prompt tokens are not penalised here
    p = arrays([SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)])
    out = apply_penalties(logits, p, counts, prompt)
    np.testing.assert_allclose(out, [[1.0, 1.0 - 0.25 - 0.5, 1.0 - 0.75 - 0.5, 1.0]])


def test_penalties_change_what_greedy_picks_and_leave_other_rows_alone():
    logits = np.array([[3.0, 2.5, 0.0], [3.0, 2.5, 0.0]], np.float32)
    counts = np.array([[2, 0, 0], [2, 0, 0]], np.int32)
    mask = np.zeros((2, 3), bool)
    params = [SamplingParams(temperature=0, frequency_penalty=1.0), SamplingParams(temperature=0)]
    out = sample(logits, arrays(params), np.zeros(2, np.int64), counts, mask)
    assert out.token_ids.tolist() == [1, 0]


def _fake_logits(request_index: int, step: int, vocab: int) -> np.ndarray:
    """A deterministic 'model': logits depend only on the request and its step."""
    rng = np.random.default_rng([request_index, step])
    return (rng.standard_normal(vocab) * 2).astype(np.float32)


def _generate(state: SamplingState, members: list[tuple[int, int]], steps: int, vocab: int):
    """Decode ``steps`` tokens for (request index, row) pairs sharing one batch each step."""
    out = {i: [] for i, _ in members}
    rows = np.array([r for _, r in members])
    for step in range(steps):
        logits = np.stack([_fake_logits(i, step, vocab) for i, _ in members])
        tokens = state.sample(logits, rows, np.full(len(rows), step)).token_ids
        for (i, _), t in zip(members, tokens):
            out[i].append(int(t))
    return out


def test_a_seeded_request_gives_the_same_tokens_alone_and_in_a_mixed_batch_of_16():
    vocab, steps = 500, 40
    target = SamplingParams(temperature=0.8, top_p=0.9, top_k=40, seed=2024)
    others = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.0, seed=1),
        SamplingParams(temperature=1.5, top_k=5),
        SamplingParams(temperature=0.5, min_p=0.1, repetition_penalty=1.3),
        SamplingParams(temperature=1.0, frequency_penalty=0.7, presence_penalty=0.3, seed=9),
        SamplingParams(temperature=0.3, top_p=0.5, logprobs=3),
    ]
    alone = SamplingState(1, vocab)
    alone.set_row(0, target, target.seed, [1, 2, 3], [])
    solo = _generate(alone, [(0, 0)], steps, vocab)[0]

    batch = SamplingState(16, vocab)
    members = []
    for row in range(16):
        index = 0 if row == 11 else 100 + row  # the target sits in row 11 among strangers
        params = target if index == 0 else others[row % len(others)]
        seed = params.seed if params.seed is not None else 10_000 + row
        batch.set_row(row, params, seed, [1, 2, 3], [])
        members.append((index, row))
    mixed = _generate(batch, members, steps, vocab)[0]
    assert mixed == solo
    other_seed = SamplingState(1, vocab)
    other_seed.set_row(0, target, 2025, [1, 2, 3], [])
    assert _generate(other_seed, [(0, 0)], steps, vocab)[0] != solo


def test_logprobs_are_the_raw_log_softmax_with_sorted_top_n():
    logits = np.array([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 1.0]], np.float32)
    params = [SamplingParams(temperature=0, logprobs=2), SamplingParams(temperature=0)]
    out = sample(logits, arrays(params), np.zeros(2, np.int64))
    ref = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    np.testing.assert_allclose(out.logprobs, ref[[0, 1], out.token_ids], rtol=1e-6)
    assert out.top_token_ids[0].tolist() == [1, 2]
    np.testing.assert_allclose(out.top_logprobs[0], ref[0, [1, 2]], rtol=1e-6)


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_k", -2),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("min_p", 1.1),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3.0),
        ("max_tokens", 0),
        ("seed", -1),
        ("seed", 2**64),
        ("logprobs", 21),
        ("stop", ("",)),
        ("temperature", "hot"),
    ],
)
def test_out_of_range_params_raise_a_clear_error_naming_the_field(field, value):
    with pytest.raises(InvalidSamplingParamsError, match=field) as info:
        SamplingParams(**{field: value}).validate()
    assert isinstance(info.value, EngineError)


def test_params_accept_vllm_spellings_and_check_against_the_vocabulary():
    assert SamplingParams(top_k=-1).validate().top_k == 0
    assert SamplingParams(stop="\n\n").stop == ("\n\n",)
    with pytest.raises(InvalidSamplingParamsError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=[9000]).validate(vocab_size=8192)
    with pytest.raises(InvalidSamplingParamsError, match="top_k"):
        SamplingParams(top_k=9000).validate(vocab_size=8192)
