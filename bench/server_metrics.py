"""Server-side load during a run, read from the server's Prometheus endpoint.

KV usage and the sequences running are gauges, so they are sampled in a background thread while
the run goes (mean and peak of used / (used + free) blocks, and of sequences decoded together;
only samples taken during the run count, so a run shorter than one poll interval has none).
Prefix-cache hits and preemptions are counters, read before and after; so is the batch size:
generated tokens per engine step for a language model (each step decodes one token for every
running request), rows per backend call of the dynamic batcher for the other models.
"""

from __future__ import annotations

import threading
import urllib.request
from dataclasses import asdict, dataclass
from typing import Any

POLL_S = 0.1  # a scrape costs the server ~1 ms of CPU; 10/s still resolves sub-second runs


def scrape(url: str, model: str, timeout: float = 5.0) -> dict[str, float]:
    """Every sample of ``model`` at ``url`` by sample name, summed over other labels."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model") != model or sample.name.endswith("_bucket"):
                continue
            out[sample.name] = out.get(sample.name, 0.0) + float(sample.value)
    return out


@dataclass(frozen=True)
class ServerLoad:
    """What the server reported about one run."""

    kv_usage_mean: float | None  # fraction of KV blocks held, averaged over the samples
    kv_usage_max: float | None
    kv_blocks: int | None  # blocks in the pool
    batch_size_mean: float | None  # tokens per step (generate) or rows per call (batched)
    steps: int  # engine steps (generate) or backend calls (batched) in the run
    samples: int  # KV samples taken during the run
    running_mean: float | None = None  # sequences the scheduler ran at once, over the samples
    running_max: int | None = None
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache during the run
    prefix_hits: int = 0  # ... found there
    preemptions: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return asdict(self)


class MetricsWatcher:
    """Scrape ``url`` for ``model`` from :meth:`start` to :meth:`stop` in a daemon thread."""

    def __init__(self, url: str, model: str, poll_s: float = POLL_S):
        self.url, self.model, self.poll_s = url, model, poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._first: dict[str, float] | None = None
        self._kv: list[tuple[float, float]] = []  # (used, free) per sample
        self._running: list[float] = []
        self.error: str | None = None

    def _read(self) -> dict[str, float] | None:
        try:
            return scrape(self.url, self.model)
        except (OSError, ValueError) as exc:
            self.error = f"cannot read {self.url}: {exc}"
            return None

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            values = self._read()
            if self._stop.is_set():  # the run ended while this scrape was in flight
                return
            if values and "engine_kv_blocks_used" in values:
                self._kv.append((values["engine_kv_blocks_used"], values["engine_kv_blocks_free"]))
            if values and "engine_sequences_running" in values:
                self._running.append(values["engine_sequences_running"])

    def start(self) -> MetricsWatcher:
        """Read the counters and start sampling."""
        self._first = self._read()
        self._thread = threading.Thread(target=self._poll, name="bench-metrics", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> ServerLoad | None:
        """Stop sampling; the run's load, or None if the endpoint could not be read."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        last = self._read()
        if self._first is None or last is None:
            return None
        return load_between(self._first, last, self._kv, self._running)


def load_between(
    first: dict[str, float],
    last: dict[str, float],
    kv: list[tuple[float, float]],
    running: list[float] | None = None,
) -> ServerLoad:
    """The load from two scrapes and the KV samples taken between them."""

    def delta(name: str) -> float:
        return last.get(name, 0.0) - first.get(name, 0.0)

    usage = [used / (used + free) for used, free in kv if used + free > 0]
    pool = [last.get("engine_kv_blocks_used"), last.get("engine_kv_blocks_free")]
    blocks = int(pool[0] + pool[1]) if None not in pool else None
    if "engine_steps_total" in last:  # a language model: generated tokens per engine step
        steps = delta("engine_steps_total")
        tokens = delta("engine_generation_tokens_total")
    else:  # the dynamic batcher: rows per backend call
        steps = delta("engine_batch_size_count")
        tokens = delta("engine_batch_size_sum")
    running = running or []
    return ServerLoad(
        kv_usage_mean=sum(usage) / len(usage) if usage else None,
        kv_usage_max=max(usage) if usage else None,
        kv_blocks=blocks,
        batch_size_mean=tokens / steps if steps > 0 else None,
        steps=int(steps),
        samples=len(kv),
        running_mean=sum(running) / len(running) if running else None,
        running_max=int(max(running)) if running else None,
        prefix_queries=int(delta("engine_prefix_cache_queries_total")),
        prefix_hits=int(delta("engine_prefix_cache_hits_total")),
        preemptions=int(delta("engine_preemptions_total")),
    )
