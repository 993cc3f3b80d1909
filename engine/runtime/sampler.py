"""The batched sampler: one vectorized numpy call per step turns logits into token ids.

``sample`` is a pure function of the logits, per-row parameter arrays, penalty state and
per-row (seed, step) pairs. Every row's token depends only on that row's inputs, never on the
other rows or the batch size, so a seeded request gives the same tokens alone or in any batch:

* The one uniform per row comes from a counter-based hash of (seed, step) (SplitMix64's
  finalizer, as in counter-based generators like Philox: "Parallel random numbers: as easy as
  1, 2, 3"), computed for all rows at once in uint64 numpy. A ``numpy.random.Philox`` per
  request would mean a Python loop constructing B generators every step.
* Tokens are ordered by a unique key (logit descending, then token id), so ties break the
  same way everywhere and the first k tokens of a row are the same k however they are found.
* Rows are sampled by inverse CDF over that order, truncated by min_p, top_k and top_p. Only a
  short sorted prefix (``_PREFIXES[0]`` tokens) is usually needed; rows whose truncated set or
  draw reaches past it are redone with a longer one, finally a full sort. All paths compute the
  same numbers (the same cumulative sums over the same order, the same masked totals), so the
  result does not depend on which path a row took. Rows that truncate nothing (no top_k, top_p
  or min_p) draw in vocabulary order instead, which needs no sort.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.runtime.sampling_params import SamplingParams

# Sorted prefix lengths tried in turn (the last, "all", never fails): most rows of a trained
# LM need the first; a flat distribution with a wide nucleus ends in a full sort.
_PREFIXES = (64, 1024, 1 << 62)
_LOW32 = np.uint64(0xFFFFFFFF)
_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment (2^64 / golden ratio)


@dataclass
class SamplingArrays:
    """Per-row sampling parameters of one batch, each an array of shape (B,)."""

    temperature: np.ndarray  # float32; 0 = greedy
    top_k: np.ndarray  # int64; 0 = off
    top_p: np.ndarray  # float64
    min_p: np.ndarray  # float32
    repetition_penalty: np.ndarray  # float32
    presence_penalty: np.ndarray  # float32
    frequency_penalty: np.ndarray  # float32
    seed: np.ndarray  # uint64
    logprobs: np.ndarray  # int64; -1 = none

    @classmethod
    def from_params(cls, params: list[SamplingParams], seeds: list[int]) -> SamplingArrays:
        """Build the arrays for a list of requests (used at admission and in tests)."""
        return cls(
            temperature=np.array([p.temperature for p in params], np.float32),
            top_k=np.array([p.top_k for p in params], np.int64),
            top_p=np.array([p.top_p for p in params], np.float64),
            min_p=np.array([p.min_p for p in params], np.float32),
            repetition_penalty=np.array([p.repetition_penalty for p in params], np.float32),
            presence_penalty=np.array([p.presence_penalty for p in params], np.float32),
            frequency_penalty=np.array([p.frequency_penalty for p in params], np.float32),
            seed=np.array(seeds, np.uint64),
            logprobs=np.array([-1 if p.logprobs is None else p.logprobs for p in params]),
        )

    def take(self, rows: np.ndarray) -> SamplingArrays:
        """Select rows (a gather, vectorized)."""
        return SamplingArrays(**{k: v[rows] for k, v in self.__dict__.items()})


@dataclass
class SamplerOutput:
    """Sampled tokens and, when any row asked, logprobs of the model's raw distribution."""

    token_ids: np.ndarray  # (B,) int64
    logprobs: np.ndarray | None = None  # (B,) float32: log p(sampled token)
    top_token_ids: np.ndarray | None = None  # (B, n) int64, n = the largest request in the batch
    top_logprobs: np.ndarray | None = None  # (B, n) float32, descending


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function: a bijection of uint64 with full avalanche."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def random_uniforms(seeds: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Return one uniform in [0, 1) per row, a pure function of that row's (seed, step)."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
        key = _splitmix64(seeds.astype(np.uint64) + _GAMMA)
        bits = _splitmix64(key ^ ((steps.astype(np.uint64) + np.uint64(1)) * _GAMMA))
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def apply_penalties(
    logits: np.ndarray,
    params: SamplingArrays,
    output_counts: np.ndarray | None,
    prompt_mask: np.ndarray | None,
) -> np.ndarray:
    """Return penalised logits (B, V); rows without penalties are returned unchanged.

    Repetition (HF/vLLM): a token seen in the prompt or the output has its logit divided by
    the penalty when positive and multiplied by it when negative. Presence and frequency
    (OpenAI/vLLM): ``logit -= presence * (count > 0) + frequency * count`` over output tokens.
    """
    rep, pres, freq = params.repetition_penalty, params.presence_penalty, params.frequency_penalty
    rows = np.flatnonzero((rep != 1.0) | (pres != 0.0) | (freq != 0.0))
    if rows.size == 0 or output_counts is None:
        return logits
    out = logits.copy()
    x = logits[rows]  # (R, V)
    counts = output_counts[rows]
    seen = counts > 0
    seen_any = seen | prompt_mask[rows] if prompt_mask is not None else seen
    r = rep[rows, None]
    x = np.where(seen_any, np.where(x > 0, x / r, x * r), x)
    x = x - freq[rows, None] * counts - pres[rows, None] * seen
    out[rows] = x
    return out


def _order_keys(x: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Unique uint64 keys whose ascending order is logit descending, then token id.

    ``x`` (float32) and ``ids`` have the same shape; ``x`` must have no -0.0 (see ``sample``).
    """
    bits = np.ascontiguousarray(x).view(np.uint32)
    # Flip a float's bits so unsigned order is float order (all bits of a negative, the sign
    # bit of a positive), then invert for descending order.
    flip = (bits.view(np.int32) >> 31).view(np.uint32) | np.uint32(0x80000000)
    packed = np.empty(x.shape + (2,), "<u4")  # explicit little-endian: [low word, high word]
    packed[..., 0] = ids
    packed[..., 1] = ~(bits ^ flip)
    return packed.view("<u8")[..., 0].astype(np.uint64, copy=False)


def _sorted_prefix(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Keys of each row's top tokens, sorted, and how many each row has (R,).

    Without ``k`` (k >= V) the whole row. Otherwise every token whose logit reaches the row's
    k-th largest: an exact prefix of the key order (ties at the boundary all come along), so
    a row may hold a few more than ``k``. Shorter rows are padded with the largest key.
    """
    R, V = x.shape
    if k >= V:
        ids = np.broadcast_to(np.arange(V, dtype=np.uint32), x.shape)
        return np.sort(_order_keys(x, ids), axis=1), np.full(R, V)
    kth = np.partition(x, V - k, axis=1)[:, V - k]  # a float partition: cheaper than on keys
    rows, cols = np.nonzero(x >= kth[:, None])  # row-major: grouped by row
    counts = np.bincount(rows, minlength=R)
    keys = _order_keys(x[rows, cols], cols.astype(np.uint32))
    order = np.lexsort((keys, rows))
    start = np.cumsum(counts) - counts
    slot = np.arange(len(rows)) - np.repeat(start, counts)
    prefix = np.full((R, int(counts.max())), np.iinfo(np.uint64).max, np.uint64)
    prefix[rows[order], slot] = keys[order]
    return prefix, counts


def _draw(
    p: np.ndarray,
    x: np.ndarray,
    prefix: np.ndarray,
    avail: np.ndarray,
    params: SamplingArrays,
    u: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Inverse-CDF draw from the truncated distribution, given each row's sorted key prefix.

    ``p`` (R, V) holds unnormalised probabilities with the top one exactly 1; row r's first
    ``avail[r]`` keys in ``prefix`` are its best tokens in order. Returns (token ids, ok); rows
    with ``ok`` False needed more of the order than their prefix holds.
    """
    R, V = p.shape
    C = prefix.shape[1]
    rows, col = np.arange(R), np.arange(C)
    valid = col < avail[:, None]
    order = np.where(valid, prefix & _LOW32, 0).astype(np.int64)  # (R, C) token ids, best first
    cum = np.cumsum(np.where(valid, p[rows[:, None], order], 0), axis=1, dtype=np.float64)

    top_k = params.top_k
    n_k = np.where(top_k > 0, np.minimum(top_k, V), V)
    in_min_p = p >= params.min_p[:, None]  # the top token always passes: its p is 1
    n_min_p = in_min_p.sum(axis=1)
    n1 = np.minimum(n_k, n_min_p)
    # Mass of the first n1 tokens as a masked total over the whole row, the same in both paths.
    by_k = n_k < n_min_p
    ok = ~by_k | (n_k <= avail)
    kth = order[rows, np.clip(n_k - 1, 0, avail - 1)]  # the last token top_k keeps
    x_kth = x[rows, kth][:, None]
    in_top_k = (x > x_kth) | ((x == x_kth) & (np.arange(V) <= kth[:, None]))
    kept = in_min_p & (~by_k[:, None] | in_top_k)
    z1 = np.sum(np.where(kept, p, np.float32(0.0)), axis=1, dtype=np.float64)

    # Nucleus: the shortest prefix whose mass reaches top_p of the n1-token total.
    top_p = params.top_p
    lim = np.minimum(n1, avail)
    crossed = ((cum < (top_p * z1)[:, None]) & (col < lim[:, None])).sum(axis=1)
    ok &= (top_p >= 1.0) | (crossed < lim) | (n1 <= avail)
    n = np.where(top_p >= 1.0, n1, np.minimum(crossed + 1, n1))
    z = np.where(n == n1, z1, cum[rows, np.clip(n - 1, 0, C - 1)])

    lim = np.minimum(n, avail)
    pos = ((cum <= (u * z)[:, None]) & (col < lim[:, None])).sum(axis=1)
    ok &= (pos < lim) | (n <= avail)
    pos = np.minimum(pos, lim - 1)
    return order[rows, pos], ok


def _sample_rows(x: np.ndarray, params: SamplingArrays, u: np.ndarray) -> np.ndarray:
    """Sample the non-greedy rows ``x`` (R, V) of penalised logits."""
    V = x.shape[1]
    z = x / params.temperature[:, None]
    p = np.exp(z - z.max(axis=1, keepdims=True))  # (R, V) float32, top entry exactly 1
    tokens = np.zeros(len(x), np.int64)
    # Rows that truncate nothing need no order at all: inverse CDF in vocabulary order.
    plain = (params.top_k == 0) & (params.top_p >= 1.0) & (params.min_p == 0.0)
    if plain.any():
        cum = np.cumsum(p[plain], axis=1, dtype=np.float64)
        target = u[plain] * cum[:, -1]
        tokens[plain] = np.minimum((cum <= target[:, None]).sum(axis=1), V - 1)
    todo = np.flatnonzero(~plain)
    for k in _PREFIXES:  # a longer sorted prefix only for the rows the shorter one failed
        if todo.size == 0:
            break
        prefix, avail = _sorted_prefix(x[todo], k)
        drawn, ok = _draw(p[todo], x[todo], prefix, avail, params.take(todo), u[todo])
        tokens[todo[ok]] = drawn[ok]
        todo = todo[~ok]
    return tokens


def _logprobs(logits: np.ndarray, params: SamplingArrays, tokens: np.ndarray, out: SamplerOutput):
    """Fill ``out`` with raw (pre-penalty, pre-temperature) logprobs, as vLLM v1 reports."""
    rows = np.arange(len(tokens))
    m = logits.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
    out.logprobs = (logits[rows, tokens] - lse).astype(np.float32)
    n = int(params.logprobs.max())
    if n > 0:
        top = np.argpartition(-logits, n - 1, axis=1)[:, :n]
        vals = logits[rows[:, None], top]
        order = np.argsort(-vals, axis=1, kind="stable")
        out.top_token_ids = np.take_along_axis(top, order, axis=1).astype(np.int64)
        out.top_logprobs = (np.take_along_axis(vals, order, axis=1) - lse[:, None]).astype(
            np.float32
        )


def sample(
    logits: np.ndarray,
    params: SamplingArrays,
    steps: np.ndarray,
    output_counts: np.ndarray | None = None,
    prompt_mask: np.ndarray | None = None,
) -> SamplerOutput:
    """Sample one token per row of ``logits`` (B, V).

    ``steps`` (B,) is each request's number of output tokens so far: with the request's seed
    it keys the row's uniform, so recomputing a preempted request redraws the same tokens.
    ``output_counts`` (B, V) counts each token in the row's output and ``prompt_mask`` (B, V)
    marks prompt tokens; both are only read for rows with penalties.
    """
    logits = np.asarray(logits, dtype=np.float32)
    # + 0.0 turns -0.0 into 0.0, so equal logits have one bit pattern and one rank.
    x = apply_penalties(logits, params, output_counts, prompt_mask) + np.float32(0.0)
    tokens = x.argmax(axis=1).astype(np.int64)  # greedy rows; first index wins ties
    rows = np.flatnonzero(params.temperature > 0)
    if rows.size:
        sub = params.take(rows) if rows.size < len(tokens) else params
        u = random_uniforms(sub.seed, steps[rows])
        tokens[rows] = _sample_rows(x[rows] if rows.size < len(tokens) else x, sub, u)
    out = SamplerOutput(token_ids=tokens)
    if (params.logprobs >= 0).any():
        _logprobs(logits, params, tokens, out)
    return out
