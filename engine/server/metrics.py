"""Prometheus metrics for the server, in a registry of its own, served on a separate port.

Names follow Prometheus conventions (``_total`` counters, ``_seconds`` histograms) and vLLM's
choice of latency metrics: time to first token, time per output token, end-to-end latency.
Gauges that mirror the runtime (KV blocks, queue lengths) are read when scraped, not pushed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    """Every metric the server exports; one instance per server (tests run several)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "engine_requests",
            "Finished requests by model, method and gRPC status.",
            ["model", "method", "status"],
            registry=r,
        )
        self.queue_length = Gauge(
            "engine_queue_length",
            "Requests waiting for admission (server queue plus runtime queue).",
            ["model"],
            registry=r,
        )
        self.running = Gauge(
            "engine_running_requests", "Requests admitted and not finished.", ["model"], registry=r
        )
        self.kv_blocks_used = Gauge(
            "engine_kv_blocks_used", "KV-cache blocks held by requests.", ["model"], registry=r
        )
        self.kv_blocks_free = Gauge(
            "engine_kv_blocks_free", "KV-cache blocks nobody holds.", ["model"], registry=r
        )
        self.sequences_running = Gauge(
            "engine_sequences_running",
            "Sequences the scheduler decodes together (each holding KV blocks).",
            ["model"],
            registry=r,
        )
        self.ttft = Histogram(
            "engine_time_to_first_token_seconds",
            "From arrival to the first generated token.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "engine_time_per_output_token_seconds",
            "Mean time between output tokens after the first, per request.",
            ["model"],
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "engine_e2e_request_latency_seconds",
            "From arrival to the last byte, by method.",
            ["model", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "engine_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r
        )
        self.generation_tokens = Counter(
            "engine_generation_tokens", "Tokens generated.", ["model"], registry=r
        )
        self._http: Any = None

    def watch(self, model: str, read: Callable[[], dict[str, float]], kv: bool = True) -> None:
        """Make the gauges of ``model`` read ``read()`` (keys as the gauge names) when scraped.

        ``kv`` is False for models without a KV cache (classify, sample_images).
        """
        gauges = [("queue_length", self.queue_length), ("running", self.running)]
        if kv:
            gauges += [
                ("kv_blocks_used", self.kv_blocks_used),
                ("kv_blocks_free", self.kv_blocks_free),
                ("sequences_running", self.sequences_running),
            ]
        for key, gauge in gauges:
            gauge.labels(model).set_function(lambda key=key: float(read()[key]))

    def watch_runtime(self, read: Callable[[], dict[str, Any]]) -> None:
        """Export the runtime's batch sizes and step counts; ``read`` maps model -> ModelStats."""
        self.registry.register(_RuntimeCollector(read))

    def start_http(self, host: str, port: int) -> int:
        """Serve /metrics on ``host:port`` in a daemon thread; return the bound port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return int(server.server_port)

    def stop_http(self) -> None:
        """Stop the /metrics endpoint if it runs."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _RuntimeCollector:
    """Histograms and counters the runtime keeps itself, converted when scraped."""

    def __init__(self, read: Callable[[], dict[str, Any]]):
        self._read = read

    def describe(self) -> list:
        return []  # unchecked at registration: the families depend on the served models

    def collect(self):
        batch = HistogramMetricFamily(
            "engine_batch_size", "Rows per backend call of the dynamic batcher.", labels=["model"]
        )
        steps = CounterMetricFamily(
            "engine_steps", "Engine steps (one batched decode or prefill each).", labels=["model"]
        )
        counters = {  # ModelStats field -> (name, help)
            "prefix_queries": (
                "engine_prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache (vLLM's prefix_cache_queries).",
            ),
            "prefix_hits": (
                "engine_prefix_cache_hits",
                "Prompt tokens found in the prefix cache and not recomputed.",
            ),
            "preemptions": (
                "engine_preemptions",
                "Requests evicted from KV memory when it ran out, recomputed later.",
            ),
        }
        families = {k: CounterMetricFamily(*v, labels=["model"]) for k, v in counters.items()}
        cached = GaugeMetricFamily(
            "engine_kv_blocks_cached",
            "Free KV-cache blocks holding a cached prefix (reclaimed on demand).",
            labels=["model"],
        )
        for model, stats in sorted(self._read().items()):
            if stats.batch_sizes:
                buckets = []
                for bound in _BATCH_BUCKETS:
                    count = sum(n for size, n in stats.batch_sizes.items() if size <= bound)
                    buckets.append((str(float(bound)), count))
                count = sum(stats.batch_sizes.values())
                buckets.append(("+Inf", count))
                total = sum(size * n for size, n in stats.batch_sizes.items())
                batch.add_metric([model], buckets, total)
            if stats.steps:
                steps.add_metric([model], stats.steps)
                for key, family in families.items():
                    family.add_metric([model], getattr(stats, key))
                cached.add_metric([model], stats.kv_blocks_cached)
        yield batch
        yield steps
        yield from families.values()
        yield cached
