"""``engine bench run``: every baseline at every load, on the same prompts, into one report.

Order: the served model over gRPC first (its server is started as a child process, or
``--target`` names one), then the server is stopped and the in-process baselines run on the
same weights, so they never compete with an idle server for cores. Classifiers and image
models are measured over gRPC with dynamic batching on and off (one server start each). With
``rounds`` > 1 the whole sequence repeats, each round starting one baseline later, and the
report adds medians with their range.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.baselines import BaselineContext, Unavailable, create
from bench.baselines.base import Baseline, RequestRecord
from bench.gpu_info import GpuMonitor
from bench.metrics import Slo, succeeded, summarize
from bench.prompts import HELDOUT_FRACTION, digit_prompts, load_tokenizer
from bench.server_metrics import MetricsWatcher
from bench.server_process import ServeOptions, ServerProcess
from bench.workloads import Workload, WorkloadSpec
from bench.workloads import build as build_workload
from engine.errors import EngineError
from engine.repository import Manifest

CpuReader = Callable[[], float | None]  # CPU seconds a process has used so far
MIN_PROMPTS = 16  # per run: enough requests that the first and last waves do not dominate
PROMPTS_PER_SLOT = 4  # ... and four waves at each concurrency
RATE_PROMPTS = 32  # per Poisson run when --num-prompts is not given
AGREE_TOKENS = 32  # greedy agreement is also judged on each request's first 32 tokens


@dataclass(frozen=True)
class BenchConfig:
    """One ``engine bench run``; defaults are a quick sweep of a small model on a laptop."""

    repo: Path
    model: str | None = None  # None: the repository's only model
    target: str | None = None  # host:port of a running server; None: start `engine serve`
    metrics_url: str | None = None  # with --target: its /metrics URL (no server load without)
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16, 32)  # vLLM/genai-perf style sweep
    request_rates: tuple[float, ...] = ()  # requests/s; each gives a Poisson-arrival run
    max_concurrency: int | None = None  # cap on requests in flight in rate mode
    num_prompts: int | None = None  # per run; None: max(16, 4 x concurrency) or 32 (rate)
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)  # lengths, prefixes
    slo: Slo = field(default_factory=Slo)  # what a request must meet to count as goodput
    warmup: int = 2  # requests per baseline before its first measured run
    seed: int = 0  # prompts, arrivals and image seeds
    baselines: tuple[str, ...] = ("grpc", "inprocess", "bare")
    batching: tuple[bool, ...] = (True, False)  # classify/sample_images: on, then off
    serve: ServeOptions = field(default_factory=ServeOptions)
    command: str = ""  # the command line, for the report
    # baseline -> the only concurrencies it runs at (a slow or compiling baseline at a few loads)
    only_at: dict[str, tuple[int, ...]] = field(default_factory=dict)
    time_budget_s: float | None = None  # loads that would start later are skipped, with why
    # Every baseline runs its loads this many times, in rotated order (round r starts at the
    # r-th baseline), so a machine whose speed drifts shows in the range of each median.
    rounds: int = 1


@dataclass(frozen=True)
class Load:
    """One point of the sweep."""

    mode: str  # "concurrency" or "rate"
    concurrency: int | None  # requests in flight at most (None: unlimited)
    request_rate: float  # requests/s (inf: all at once)
    num_prompts: int
    first: int = 0  # index of its first request in the workload: every run sends new prompts

    def describe(self) -> str:
        """c=4, or 2/s (max 8)."""
        from bench.report import describe_load

        return describe_load(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON (no infinities)."""
        rate = None if math.isinf(self.request_rate) else self.request_rate
        return {
            "mode": self.mode,
            "concurrency": self.concurrency,
            "request_rate": rate,
            "num_prompts": self.num_prompts,
        }


def plan(config: BenchConfig) -> list[Load]:
    """The loads to run, in order: the concurrency sweep, then the request rates.

    Each load gets its own slice of the workload after the warm-up's, so no run repeats a
    prompt an earlier one sent: a prefix cache helps only where prompts really share a prefix.
    """
    if config.request_rates:
        n = config.num_prompts or RATE_PROMPTS
        loads = [Load("rate", config.max_concurrency, r, n) for r in config.request_rates]
    else:
        loads = [
            Load(
                "concurrency",
                c,
                math.inf,
                config.num_prompts or max(MIN_PROMPTS, PROMPTS_PER_SLOT * c),
            )
            for c in config.concurrency
        ]
    first = config.warmup
    for i, load in enumerate(loads):
        loads[i] = replace(load, first=first)
        first += load.num_prompts
    return loads


@dataclass
class Model:
    """The model under test, as the bench needs it."""

    repo: Path
    name: str
    version: int
    task: str
    manifest: Manifest
    path: Path


def open_model(repo: Path, name: str | None) -> Model:
    """Find and verify the model; a clear error for a missing repository or model."""
    from engine.runtime.loader import open_version

    if not Path(repo).is_dir():
        raise EngineError(f"model repository {repo} does not exist")
    mv = open_version(repo, name)
    return Model(Path(repo), mv.name, mv.version, mv.task, mv.manifest, mv.path)


def make_workload(config: BenchConfig, model: Model, count: int) -> tuple[Workload, Any]:
    """``count`` requests for ``model`` and the tokenizer that made them (None for digits).

    Classifiers get the workload's prompts with nothing to generate; image models get digits.
    """
    serving = model.manifest.serving
    spec = config.workload
    if model.task == "sample_images":
        digits = digit_prompts(int(serving.get("num_classes", 10)), count, config.seed)
        return Workload(spec, digits.token_ids, [], [1] * count, digits.source, {}), None
    tokenizer = load_tokenizer(model.path, serving)
    trained = model.manifest.checkpoint.get("config", {})
    fraction = float(trained.get("heldout_fraction", HELDOUT_FRACTION))
    context = int(serving["context_length"]) if model.task == "generate" else 1 << 30
    return build_workload(spec, tokenizer, context, count, config.seed, fraction), tokenizer


@contextmanager
def grpc_server(
    config: BenchConfig, model: Model, batching: bool
) -> Iterator[tuple[str, str | None, CpuReader | None]]:
    """(target, metrics URL, server CPU reader) of the server to drive: the given one (its CPU
    unknown), or a child process."""
    if config.target:
        yield config.target, config.metrics_url, None
        return
    options = replace(config.serve, dynamic_batching=batching)
    with ServerProcess(model.repo, model.name, options) as server:
        yield server.target, server.metrics_url, server.cpu_seconds


def check_target(target: str, model: Model) -> dict[str, Any]:
    """Fail clearly if ``target`` is unreachable or does not serve the model; compare weights."""
    import json

    from engine.client import ClientError, EngineClient

    try:
        with EngineClient(target, timeout=10) as client:
            served = {m.name for m in client.models()}
            if model.name not in served:
                raise EngineError(
                    f"the server at {target} does not serve {model.name!r}; it serves: "
                    f"{', '.join(sorted(served)) or 'nothing'}"
                )
            remote = json.loads(client.model_info(model.name).manifest_json or "{}")
    except ClientError as exc:
        raise EngineError(f"cannot reach a server at {target}: {exc}") from None

    def hashes(manifest: dict[str, Any]) -> dict[str, str]:
        return {f["path"]: f.get("sha256", "") for f in manifest.get("files", [])}

    return {"target": target, "same_weights": hashes(remote) == hashes(model.manifest.to_dict())}


class NullProgress:
    """What the bench reports while it runs; the CLI shows it with rich (bench.progress)."""

    def start(self, label: str, total: int) -> None:
        """A run of ``total`` requests begins."""

    def advance(self) -> None:
        """One request finished."""

    def finish(self) -> None:
        """The run is over."""


class Bench:
    """Runs the plan for one model and collects runs, skips and baseline descriptions."""

    def __init__(self, config: BenchConfig, progress: NullProgress | None = None):
        self.config = config
        self.progress = progress or NullProgress()
        self.model = open_model(config.repo, config.model)
        self.loads = plan(config)
        count = config.warmup + sum(load.num_prompts for load in self.loads)
        self.workload, self.tokenizer = make_workload(config, self.model, count)
        self.runs: list[dict[str, Any]] = []
        self.skipped: list[dict[str, Any]] = []
        self.baselines: dict[str, dict[str, Any]] = {}
        self.server: dict[str, Any] = {}
        self.on_change: Any = None  # called after every run or skip (the CLI saves the report)
        budget = config.time_budget_s
        self.deadline = None if budget is None else time.perf_counter() + budget
        self.gpu_reader = None
        if config.serve.device != "cpu":
            from bench.gpu_info import memory_reader

            self.gpu_reader = memory_reader(config.serve.device)
        # Greedy tokens per prompt index from the first baseline that produced them (the
        # server, when it runs first): every later run is checked against these.
        self.reference: tuple[str, dict[int, list[int]]] | None = None
        self.round = 0  # of config.rounds, recorded in every run

    def settings(self) -> list[tuple[str, bool | None]]:
        """(baseline, batching) pairs in run order; batching is None for generate models."""
        cfg = self.config
        if self.model.task == "generate":
            return [(name, None) for name in cfg.baselines]
        batching = [None] if cfg.target else list(cfg.batching)
        grpc = [("grpc", b) for b in batching] if "grpc" in cfg.baselines else []
        return grpc + [(name, None) for name in cfg.baselines if name != "grpc"]

    def run(self) -> None:
        """Measure every setting, ``rounds`` times; unavailable baselines are recorded as skipped
        (once)."""
        if self.config.target:
            self.server = check_target(self.config.target, self.model)
        settings = self.settings()
        unavailable: set[tuple[str, bool | None]] = set()
        for rnd in range(self.config.rounds):
            self.round = rnd
            k = rnd % len(settings) if settings else 0
            for name, batching in settings[k:] + settings[:k]:
                if (name, batching) in unavailable:
                    continue
                if not self._run_setting(name, batching):
                    unavailable.add((name, batching))

    def _run_setting(self, name: str, batching: bool | None) -> bool:
        """One baseline's loads; False when it is unavailable (skipped, with the reason)."""
        if name != "grpc" and self.model.task != "generate":
            self._skip(name, f"runs language models only; {self.model.name} is {self.model.task}")
            return False
        if self._out_of_time():
            for load in self.loads_of(name):
                self._skip(name, self._out_of_time(), load)
            return True
        try:
            if name == "grpc":
                self._run_grpc(batching)
            else:
                self._run_baseline(name)
        except Unavailable as exc:
            self._skip(name, str(exc))
            return False
        return True

    def loads_of(self, label: str) -> list[Load]:
        """The loads a baseline was asked to run (``only_at`` narrows the concurrency sweep)."""
        only = self.config.only_at.get(label.split(" ")[0])
        return [
            load
            for load in self.loads
            if only is None or load.mode != "concurrency" or load.concurrency in only
        ]

    def _out_of_time(self) -> str | None:
        """Why no further load may start (the time budget is spent), or None."""
        if self.deadline is None or time.perf_counter() < self.deadline:
            return None
        return f"not run: the time budget of {self.config.time_budget_s:g} s was spent"

    def _skip(self, name: str, reason: str, load: Load | None = None) -> None:
        entry = {"baseline": name, "reason": reason}
        if load is not None:
            entry["load"] = load.describe()
        self.skipped.append(entry)
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def _run_grpc(self, batching: bool | None) -> None:
        label = "grpc" if batching is None else f"grpc batching {'on' if batching else 'off'}"
        with grpc_server(self.config, self.model, batching is not False) as (
            target,
            metrics,
            server_cpu,
        ):
            decode = self.tokenizer.decode if self.tokenizer is not None else None
            runner = create(
                "grpc", self._context(), target=target, task=self.model.task, decode=decode
            )
            try:
                self.baselines[label] = runner.describe()
                self._sweep(runner, label, batching, metrics, server_cpu)
            finally:
                runner.close()

    def _run_baseline(self, name: str) -> None:
        """An in-process baseline; any failure of its own is a skip with the reason, not a crash."""
        try:
            baseline = create(name, self._context())
        except Unavailable:
            raise
        except Exception as exc:
            raise Unavailable(f"failed to start: {type(exc).__name__}: {exc}") from None
        try:
            self.baselines[name] = baseline.describe()
            self._sweep(baseline, name, None, None)
        except Exception as exc:
            raise Unavailable(f"failed: {type(exc).__name__}: {exc}") from None
        finally:
            baseline.close()

    def _same_tokens(
        self, label: str, records: list[RequestRecord], first: int = 0
    ) -> dict[str, Any] | None:
        """How many requests produced the reference baseline's greedy tokens for their prompt.

        All of them (``identical``), and their first AGREE_TOKENS (``identical_prefix``): in
        half precision two correct implementations part at the first near tie, after which
        whole outputs say little. Records come back in prompt order, so record i answers
        request ``first + i``. None when there are no tokens to compare (classifier, GAN).
        """
        ok = {first + i: r.token_ids for i, r in enumerate(records) if succeeded(r) and r.token_ids}
        if not ok:
            return None
        if self.reference is None:
            self.reference = (label, {})
        name, tokens = self.reference
        common = [i for i in ok if i in tokens]  # before this run adds to the reference
        same = sum(ok[i] == tokens[i] for i in common)
        head = AGREE_TOKENS
        same_head = sum(ok[i][:head] == tokens[i][:head] for i in common)
        if name == label:
            for i, ids in ok.items():
                tokens.setdefault(i, ids)
        return {
            "reference": name,
            "identical": same,
            "identical_prefix": same_head,
            "prefix_tokens": head,
            "compared": len(common),
        }

    def _context(self) -> BaselineContext:
        checkpoint = self.model.manifest.checkpoint.get("path")
        return BaselineContext(
            repo=self.model.repo,
            model=self.model.name,
            threads=self.config.serve.threads,
            seed=self.config.seed,
            checkpoint=Path(checkpoint) if checkpoint else None,
            device=self.config.serve.device,
            dtype=self.config.serve.dtype,
            cuda_graphs=self.config.serve.cuda_graphs,
            max_num_seqs=self.config.serve.max_num_seqs,
            gpu_memory_utilization=self.config.serve.gpu_memory_utilization,
        )

    def _sweep(
        self,
        baseline: Baseline,
        label: str,
        batching: bool | None,
        metrics: str | None,
        server_cpu: CpuReader | None = None,
    ) -> None:
        cfg, prompts, lens = self.config, self.workload.prompts, self.workload.output_lens
        loads = []
        for load in self.loads_of(label):
            if load.mode == "rate" and not getattr(baseline, "supports_rate", False):
                self._skip(label, "runs static batches: no arrival process", load)
            else:
                loads.append(load)
        baseline.on_done = lambda record: self.progress.advance()
        baseline.seed = cfg.seed  # the arrival process
        per_load = getattr(baseline, "warmup_each_load", False)  # e.g. a step compiled per shape
        if cfg.warmup and loads and not per_load:
            self.progress.start(f"{label} warm-up", cfg.warmup)
            baseline.request_rate = math.inf
            baseline.run(prompts[: cfg.warmup], lens[: cfg.warmup], cfg.warmup)
            self.progress.finish()
        for load in loads:
            late = self._out_of_time()
            if late:
                self._skip(label, late, load)
                continue
            concurrency = load.concurrency or load.num_prompts
            if per_load:
                self.progress.start(f"{label} warm-up {load.describe()}", concurrency)
                baseline.request_rate = math.inf
                own = slice(load.first, load.first + concurrency)
                baseline.run(prompts[own], lens[own], concurrency)
                self.progress.finish()
            self.progress.start(f"{label} {load.describe()}", load.num_prompts)
            baseline.request_rate = load.request_rate
            watcher = MetricsWatcher(metrics, self.model.name).start() if metrics else None
            cpu0 = (time.process_time(), server_cpu() if server_cpu else None)
            gpu = GpuMonitor(self.gpu_reader).start() if self.gpu_reader else None
            t0 = time.perf_counter()
            try:
                part = slice(load.first, load.first + load.num_prompts)
                records = baseline.run(prompts[part], lens[part], concurrency)
            except Exception as exc:  # record it and go on with the other loads
                self._skip(label, f"failed: {type(exc).__name__}: {exc}", load)
                continue
            finally:
                duration = time.perf_counter() - t0
                cpu = _cpu_use(cpu0, server_cpu, duration)
                server = watcher.stop() if watcher else None
                device = gpu.stop() if gpu else None
                self.progress.finish()
            self.runs.append(
                {
                    "baseline": baseline.name,
                    "label": label,
                    "round": self.round,
                    "batching": None if batching is None else ("on" if batching else "off"),
                    **load.to_dict(),
                    "stats": summarize(records, duration, cfg.slo).to_dict(),
                    "server": server.to_dict() if server else None,
                    "gpu": device.to_dict() if device else None,
                    "same_tokens": self._same_tokens(label, records, load.first),
                    "cpu": cpu,
                }
            )
            self._changed()


def _cpu_use(
    start: tuple[float, float | None], server_cpu: CpuReader | None, wall_s: float
) -> dict[str, Any]:
    """CPU seconds of this process (the load generator, or an in-process baseline) and of the
    server during a run, and each one's share of all the machine's cores."""
    client = time.process_time() - start[0]
    server = None
    if server_cpu is not None and start[1] is not None:
        now = server_cpu()
        server = None if now is None else now - start[1]
    cores = os.cpu_count() or 1

    def share(seconds: float | None) -> float | None:
        return None if seconds is None or wall_s <= 0 else seconds / (wall_s * cores)

    return {
        "wall_s": wall_s,
        "cores": cores,
        "client_cpu_s": client,
        "client_share": share(client),
        "server_cpu_s": server,
        "server_share": share(server),
    }
