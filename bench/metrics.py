"""Serving metrics from request records, defined as vLLM's ``benchmark_serving.py`` defines them.

- TTFT: first output token's arrival minus the request's start.
- TPOT: (E2E - TTFT) / (output tokens - 1), per request; requests with one token have none.
- ITL: every gap between consecutive tokens of a request, pooled over all requests.
- E2E: last token's arrival minus the start.
- Request throughput: completed requests / duration; output throughput: output tokens / duration.
- Goodput (vLLM's ``--goodput``, DistServe's definition): completed requests that met every
  service-level objective (TTFT and TPOT at most the limits) / duration.

A request failed if it carries an error or received no token; failed requests are counted and
left out of every latency and token figure. Latencies are reported in milliseconds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from bench.baselines.base import RequestRecord

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Slo:
    """Limits a request must meet to count towards goodput.

    Defaults are what a person reading a stream notices: the first token within a second
    (including time spent queued), then at least 20 tokens/s, faster than anyone reads.
    """

    ttft_ms: float = 1000.0
    tpot_ms: float = 50.0

    def to_dict(self) -> dict[str, float]:
        """Plain data for JSON."""
        return asdict(self)


@dataclass(frozen=True)
class Distribution:
    """Mean and percentiles (linear interpolation, as ``np.percentile``) of one latency, in ms."""

    mean: float = float("nan")
    p50: float = float("nan")
    p90: float = float("nan")
    p99: float = float("nan")
    count: int = 0  # samples behind the figures (requests, or gaps for ITL)

    @classmethod
    def of(cls, seconds: np.ndarray) -> Distribution:
        """The distribution of ``seconds`` (NaNs when empty)."""
        if seconds.size == 0:
            return cls()
        ms = seconds * 1e3
        p50, p90, p99 = np.percentile(ms, PERCENTILES)
        return cls(float(ms.mean()), float(p50), float(p90), float(p99), int(ms.size))


@dataclass(frozen=True)
class RunStats:
    """Everything one run (one baseline at one load) measured."""

    completed: int
    failed: int
    duration_s: float
    input_tokens: int
    output_tokens: int
    request_throughput: float  # completed requests per second
    output_throughput: float  # output tokens per second
    total_token_throughput: float  # (input + output) tokens per second
    ttft_ms: Distribution
    tpot_ms: Distribution
    itl_ms: Distribution
    e2el_ms: Distribution
    goodput: float = float("nan")  # requests/s that met the SLO (NaN without one)
    good: int = 0  # requests that met the SLO
    slo: dict[str, float] | None = None  # the limits goodput was measured against
    errors: tuple[str, ...] = ()  # the first few distinct error messages

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return asdict(self)


def succeeded(record: RequestRecord) -> bool:
    """True when the request finished without error and received at least one token."""
    return record.error is None and record.output_tokens > 0


def span(records: list[RequestRecord]) -> float:
    """Seconds from the first start to the last token of any request (0 for none)."""
    starts = [r.start for r in records]
    ends = [r.token_times[-1] for r in records if r.token_times]
    if not starts or not ends:
        return 0.0
    return max(ends) - min(starts)


def summarize(
    records: list[RequestRecord], duration: float | None = None, slo: Slo | None = None
) -> RunStats:
    """The run's stats; ``duration`` defaults to :func:`span` of the records.

    With ``slo``, goodput counts the requests whose TTFT and TPOT are within its limits (a
    one-token request has no TPOT and is judged on TTFT alone).
    """
    ok = [r for r in records if succeeded(r)]
    duration = span(records) if duration is None else duration
    starts = np.array([r.start for r in ok], np.float64)
    first = np.array([r.token_times[0] for r in ok], np.float64)
    last = np.array([r.token_times[-1] for r in ok], np.float64)
    counts = np.array([r.output_tokens for r in ok], np.int64)
    ttft, e2el = first - starts, last - starts
    multi = counts > 1
    tpot = (e2el[multi] - ttft[multi]) / (counts[multi] - 1)
    gaps = [np.diff(np.asarray(r.token_times, np.float64)) for r in ok]
    itl = np.concatenate(gaps) if gaps else np.zeros(0)
    input_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = int(counts.sum())
    per_s = 1.0 / duration if duration > 0 else float("nan")
    errors = tuple(dict.fromkeys(r.error or "no output" for r in records if not succeeded(r)))
    good = 0
    if slo is not None:
        per_token = np.zeros_like(ttft)
        per_token[multi] = tpot
        good = int(((ttft * 1e3 <= slo.ttft_ms) & (per_token * 1e3 <= slo.tpot_ms)).sum())
    return RunStats(
        completed=len(ok),
        failed=len(records) - len(ok),
        duration_s=duration,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        request_throughput=len(ok) * per_s,
        output_throughput=output_tokens * per_s,
        total_token_throughput=(input_tokens + output_tokens) * per_s,
        ttft_ms=Distribution.of(ttft),
        tpot_ms=Distribution.of(tpot),
        itl_ms=Distribution.of(itl),
        e2el_ms=Distribution.of(e2el),
        goodput=good * per_s if slo is not None else float("nan"),
        good=good,
        slo=slo.to_dict() if slo is not None else None,
        errors=errors[:5],
    )
