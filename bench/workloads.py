"""What the bench sends: ``fixed``, ``mixed`` and ``shared-prefix`` workloads of held-out text.

- ``fixed``: every prompt exactly ``input_len`` tokens, every output exactly ``output_len``
  (the static batch's best case: nothing to gain from continuous batching).
- ``mixed``: input and output lengths drawn from seeded lognormal distributions with medians
  ``input_len`` and ``output_len`` and shape ``sigma`` (a long tail, as real traffic has),
  clipped so that prompt + output fit the context.
- ``shared-prefix``: ``num_prefixes`` distinct prefixes of ``prefix_len`` tokens; each request
  is one of them (round robin, seeded order) plus a distinct ``suffix_len``-token suffix, and
  asks for ``output_len`` tokens. A system prompt or a few-shot header, as prefix caching sees it.

Every prompt is held-out stdlib text whose ids survive decode -> encode unchanged (see
bench/prompts.py), so the gRPC runner (which sends text) and the in-process baselines (which
send ids) run the same tokens. The spec and the drawn lengths go into ``bench.json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from bench.prompts import HELDOUT_FRACTION, PromptError, text_windows
from engine.errors import EngineError

WORKLOADS = ("fixed", "mixed", "shared-prefix")
DEFAULT_PREFIX_LEN = 64  # the L: a short system prompt
MIN_PREFIX_LEN = 16  # below one KV block nothing could be shared


class WorkloadError(EngineError):
    """A workload's parameters do not fit the model (context) or each other."""


@dataclass(frozen=True)
class WorkloadSpec:
    """How prompts and output lengths are drawn; ``seed`` fixes them all."""

    kind: str = "fixed"  # fixed, mixed or shared-prefix
    input_len: int = 32  # fixed: exactly; mixed: the median
    output_len: int = 32  # fixed and shared-prefix: exactly; mixed: the median
    sigma: float = 1.0  # mixed: lognormal shape; 1.0 puts p99 at ~10x the median
    num_prefixes: int = 4  # shared-prefix: K
    prefix_len: int | None = None  # shared-prefix: L; None: 64, or what fits the context
    suffix_len: int = 8  # shared-prefix: the distinct part of each prompt

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the report."""
        return asdict(self)


@dataclass(frozen=True)
class Workload:
    """The drawn requests: prompt ids, their text, and the output length each asks for."""

    spec: WorkloadSpec
    prompts: list[list[int]]
    texts: list[str]
    output_lens: list[int]
    source: str
    params: dict[str, Any]  # resolved parameters (prefix length used, length percentiles)

    def __len__(self) -> int:
        return len(self.prompts)


def lognormal_lengths(
    rng: np.random.Generator, median: int, sigma: float, count: int, low: int, high: int
) -> np.ndarray:
    """``count`` integer lengths, lognormal with the given median and shape, within [low, high]."""
    drawn = np.rint(median * np.exp(sigma * rng.standard_normal(count)))
    return np.clip(drawn, low, high).astype(np.int64)


def _percentiles(values: list[int]) -> dict[str, float]:
    p50, p90, p99 = np.percentile(values, (50, 90, 99))
    return {
        "min": int(min(values)),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "max": int(max(values)),
    }


def build(
    spec: WorkloadSpec,
    tokenizer: Any,
    context: int,
    count: int,
    seed: int = 0,
    fraction: float = HELDOUT_FRACTION,
) -> Workload:
    """Draw ``count`` requests of ``spec`` for a model of ``context`` tokens."""
    if spec.kind not in WORKLOADS:
        raise WorkloadError(f"unknown workload {spec.kind!r}; choose one of {', '.join(WORKLOADS)}")
    if spec.kind == "fixed":
        return _fixed(spec, tokenizer, context, count, seed, fraction)
    if spec.kind == "mixed":
        return _mixed(spec, tokenizer, context, count, seed, fraction)
    return _shared_prefix(spec, tokenizer, context, count, seed, fraction)


def _fixed(spec, tokenizer, context, count, seed, fraction) -> Workload:
    if spec.input_len + spec.output_len > context:
        raise WorkloadError(
            f"--input-len {spec.input_len} + --output-len {spec.output_len} exceeds the "
            f"model's context of {context} tokens"
        )
    prompts, texts, source = text_windows(tokenizer, [spec.input_len] * count, seed, fraction)
    return Workload(spec, prompts, texts, [spec.output_len] * count, source, {})


def _mixed(spec, tokenizer, context, count, seed, fraction) -> Workload:
    if spec.input_len >= context or spec.output_len >= context:
        raise WorkloadError(
            f"median lengths --input-len {spec.input_len} and --output-len {spec.output_len} "
            f"must be below the model's context of {context} tokens"
        )
    if not spec.sigma > 0:
        raise WorkloadError(f"--len-sigma must be > 0, got {spec.sigma}")
    rng = np.random.default_rng([seed, 1])
    inputs = lognormal_lengths(rng, spec.input_len, spec.sigma, count, 1, context - 1)
    outputs = lognormal_lengths(rng, spec.output_len, spec.sigma, count, 1, context - 1)
    outputs = np.minimum(outputs, context - inputs)  # prompt + output fit the context
    prompts, texts, source = text_windows(tokenizer, inputs.tolist(), seed, fraction)
    params = {
        "input_lens": _percentiles(inputs.tolist()),
        "output_lens": _percentiles(outputs.tolist()),
    }
    return Workload(spec, prompts, texts, outputs.tolist(), source, params)


def _shared_prefix(spec, tokenizer, context, count, seed, fraction) -> Workload:
    room = context - spec.output_len - spec.suffix_len
    prefix_len = spec.prefix_len or min(DEFAULT_PREFIX_LEN, room)
    if spec.suffix_len < 1 or spec.num_prefixes < 1:
        raise WorkloadError("--suffix-len and --num-prefixes must be at least 1")
    if prefix_len < 1 or prefix_len > room:
        raise WorkloadError(
            f"a {prefix_len}-token prefix + {spec.suffix_len}-token suffix + --output-len "
            f"{spec.output_len} exceeds the model's context of {context} tokens"
        )
    prefixes, prefix_texts, source = text_windows(
        tokenizer, [prefix_len] * spec.num_prefixes, seed, fraction
    )
    order = np.random.default_rng([seed, 2]).permutation(count) % spec.num_prefixes
    prompts: list[list[int]] = []
    texts: list[str] = []
    # Suffixes are drawn in batches until each joins its prefix without re-tokenizing
    # differently across the seam (BPE may merge a prefix's last bytes with a suffix's first).
    batch, attempt = max(8, 2 * count), 0
    while len(prompts) < count:
        if attempt > 20:
            raise PromptError(
                f"could not find suffixes of {spec.suffix_len} tokens that join the prefixes "
                "cleanly; try another --seed or --suffix-len"
            )
        suffixes, _, _ = text_windows(
            tokenizer, [spec.suffix_len] * batch, seed + 1000 * (attempt + 1), fraction
        )
        for suffix in suffixes:
            group = int(order[len(prompts)])
            ids = prefixes[group] + suffix
            text = tokenizer.decode(ids)
            if tokenizer.encode(text).ids == ids:
                prompts.append(ids)
                texts.append(text)
                if len(prompts) == count:
                    break
        attempt += 1
    params = {
        "prefix_len": prefix_len,
        "prefix_of_request": order.tolist(),
        "prefix_texts": prefix_texts,
    }
    return Workload(spec, prompts, texts, [spec.output_len] * count, source, params)
