"""``engine bench run`` and ``engine bench compare``: typer wiring only, heavy imports deferred.

Mounted by engine/cli.py; importing this module costs only typer, so ``engine --help`` stays
fast and the bench's dependencies load when a bench command runs.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from engine.cli_help import App
from engine.errors import EngineError

bench_app = App(
    no_args_is_help=True,
    help="Load-test a served model over gRPC against in-process baselines; compare reports.",
)


def _console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(file=stream, width=None if stream.isatty() else 200)


def _ints(value: str, option: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise EngineError(f"{option} expects comma-separated integers, got {value!r}") from None
    if not out or min(out) < 1:
        raise EngineError(f"{option} values must be at least 1, got {value!r}")
    return out


def _rates(value: str | None) -> tuple[float, ...]:
    if not value:
        return ()
    try:
        out = tuple(float(v) for v in value.split(",") if v.strip())  # "inf" parses too
    except ValueError:
        raise EngineError(f"--request-rate expects numbers (requests/s), got {value!r}") from None
    if any(not r > 0 for r in out):
        raise EngineError(f"--request-rate values must be > 0, got {value!r}")
    return out


def _names(value: str) -> tuple[str, ...]:
    from bench.baselines import REGISTRY

    names = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    unknown = [n for n in names if n not in REGISTRY]
    if unknown or not names:
        raise EngineError(
            f"unknown baseline {unknown[0] if unknown else value!r}; known: {', '.join(REGISTRY)}"
        )
    return names


def _only_at(values: list[str] | None, baselines: tuple[str, ...], sweep: tuple[int, ...]):
    """``NAME=c1,c2`` options as {name: (c1, c2)}; each a known baseline and sweep point."""
    out: dict[str, tuple[int, ...]] = {}
    for value in values or ():
        name, sep, loads = value.partition("=")
        if not sep or name not in baselines:
            raise EngineError(
                f"--only-at expects BASELINE=c1,c2, BASELINE one of {', '.join(baselines)}; "
                f"got {value!r}"
            )
        out[name] = _ints(loads, "--only-at")
        extra = sorted(set(out[name]) - set(sweep))
        if extra:
            raise EngineError(f"--only-at {value}: {extra} is not in --concurrency")
    return out


def _batching(value: str) -> tuple[bool, ...]:
    modes = {"on": True, "off": False}
    parts = [v.strip() for v in value.split(",") if v.strip()]
    if not parts or any(p not in modes for p in parts):
        raise EngineError(f"--batching expects on, off or on,off; got {value!r}")
    return tuple(modes[p] for p in parts)


@bench_app.command("run")
def run_cmd(
    repo: Annotated[Path, typer.Option(help="Model repository (weights, tokenizer, prompts).")],
    model: Annotated[str | None, typer.Option(help="Model name (default: the only one).")] = None,
    target: Annotated[
        str | None, typer.Option(help="host:port of a running server (default: start one).")
    ] = None,
    metrics_url: Annotated[
        str | None, typer.Option(help="With --target: its Prometheus URL, for server load.")
    ] = None,
    concurrency: Annotated[str, typer.Option(help="Concurrency sweep.")] = "1,2,4,8,16,32",
    request_rate: Annotated[
        str | None, typer.Option(help="Requests/s (comma list): Poisson arrivals instead.")
    ] = None,
    max_concurrency: Annotated[
        int | None, typer.Option(min=1, help="Cap on requests in flight with --request-rate.")
    ] = None,
    num_prompts: Annotated[
        int | None,
        typer.Option(min=1, help="Requests per run (default: max(16, 4 x concurrency))."),
    ] = None,
    workload: Annotated[
        str, typer.Option(help="fixed, mixed (lognormal lengths) or shared-prefix.")
    ] = "fixed",
    input_len: Annotated[
        int, typer.Option(min=1, help="Prompt tokens: exactly (fixed), the median (mixed).")
    ] = 32,
    output_len: Annotated[
        int, typer.Option(min=1, help="Output tokens: exactly, or the median (mixed).")
    ] = 32,
    len_sigma: Annotated[
        float, typer.Option(min=0.0, help="mixed: lognormal shape of both lengths.")
    ] = 1.0,
    num_prefixes: Annotated[int, typer.Option(min=1, help="shared-prefix: distinct prefixes.")] = 4,
    prefix_len: Annotated[
        int | None, typer.Option(min=1, help="shared-prefix: tokens [64 or what fits].")
    ] = None,
    suffix_len: Annotated[
        int, typer.Option(min=1, help="shared-prefix: distinct tokens after the prefix.")
    ] = 8,
    goodput_ttft_ms: Annotated[
        float, typer.Option(min=0.0, help="Goodput counts requests with TTFT at most this.")
    ] = 1000.0,
    goodput_tpot_ms: Annotated[
        float, typer.Option(min=0.0, help="... and TPOT at most this.")
    ] = 50.0,
    warmup: Annotated[int, typer.Option(min=0, help="Warm-up requests per baseline.")] = 2,
    seed: Annotated[int, typer.Option(help="Prompts, arrivals, image seeds.")] = 0,
    baselines: Annotated[
        str,
        typer.Option(
            help="Comma list of grpc, inprocess, bare, hf, hf-static, optimum, llamacpp (GGUF "
            "f32), llamacpp-q8_0; hf needs .[bench], optimum .[optimum], llamacpp .[llamacpp]."
        ),
    ] = "grpc,inprocess,bare",
    batching: Annotated[
        str, typer.Option(help="Classifier/GAN: dynamic batching on, off or on,off.")
    ] = "on,off",
    device: Annotated[
        str, typer.Option(help="cpu, cuda or tensorrt (server and baselines).")
    ] = "cpu",
    threads: Annotated[
        int | None, typer.Option(min=1, help="Intra-op threads (server and baselines).")
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(help="Torch format and HF: float16, bfloat16, float32 [float16 on CUDA]."),
    ] = None,
    cuda_graphs: Annotated[
        bool, typer.Option(help="Engine decode steps as CUDA graphs (torch format on CUDA).")
    ] = True,
    max_num_seqs: Annotated[
        int | None, typer.Option(min=1, help="Engine sequences at once (server and inprocess).")
    ] = None,
    gpu_memory_utilization: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="Engine KV budget as a fraction of free GPU memory."),
    ] = None,
    only_at: Annotated[
        list[str] | None,
        typer.Option(
            help="Run a baseline at these concurrencies only: hf-static=1,64 (repeatable)."
        ),
    ] = None,
    time_budget_s: Annotated[
        float | None, typer.Option(min=0.0, help="Skip (and report) loads that would start later.")
    ] = None,
    rounds: Annotated[
        int,
        typer.Option(
            min=1, help="Run every baseline's loads N times, interleaved; report medians + range."
        ),
    ] = 1,
    strict: Annotated[
        bool,
        typer.Option(help="Exit 1 if anything asked for was skipped or any request failed."),
    ] = False,
    serve_arg: Annotated[
        list[str] | None,
        typer.Option(
            help="Extra `engine serve` flag, e.g. --serve-arg=--max-running=128 (repeatable)."
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="Directory for bench.json and the plots.")] = Path(
        "bench-results"
    ),
    plots: Annotated[bool, typer.Option(help="Write PNG plots (needs matplotlib).")] = True,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Drive a served model at each load and report TTFT, TPOT, ITL, E2E and throughput."""
    import time

    from bench import report
    from bench.metrics import Slo
    from bench.runner import Bench, BenchConfig
    from bench.server_process import ServeOptions
    from bench.workloads import WORKLOADS, WorkloadSpec

    if workload not in WORKLOADS:
        raise EngineError(f"unknown --workload {workload!r}; choose one of {', '.join(WORKLOADS)}")

    started = time.time()
    names = _names(baselines)
    sweep = _ints(concurrency, "--concurrency")
    config = BenchConfig(
        repo=repo,
        model=model,
        target=target,
        metrics_url=metrics_url,
        concurrency=sweep,
        request_rates=_rates(request_rate),
        max_concurrency=max_concurrency,
        num_prompts=num_prompts,
        workload=WorkloadSpec(
            workload, input_len, output_len, len_sigma, num_prefixes, prefix_len, suffix_len
        ),
        slo=Slo(goodput_ttft_ms, goodput_tpot_ms),
        warmup=warmup,
        seed=seed,
        baselines=names,
        batching=_batching(batching),
        serve=ServeOptions(
            device=device,
            threads=threads,
            max_num_seqs=max_num_seqs,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            cuda_graphs=cuda_graphs,
            extra_args=tuple(serve_arg or ()),
        ),
        command="engine " + shlex.join(sys.argv[1:]),
        only_at=_only_at(only_at, names, sweep),
        time_budget_s=time_budget_s,
        rounds=rounds,
    )
    console, err = _console(), _console(stderr=True)
    bench = Bench(config)
    # After every run: a run cut short (a crash, a time limit) still leaves what it measured.
    bench.on_change = lambda: report.write(report.build(bench, started), out)
    if progress:
        from bench.progress import RichProgress

        with RichProgress(err) as bar:
            bench.progress = bar
            bench.run()
    else:
        bench.run()
    result = report.build(bench, started)
    path = report.write(result, out)
    console.print(report.table(result))
    if result.get("medians"):
        console.print(report.medians_table(result))
    for line in report.skipped_lines(result):
        console.print(line, markup=False, highlight=False)
    if bench.server.get("same_weights") is False:
        err.print(f"[yellow]warning:[/yellow] {target} serves other weights than {repo}")
    console.print(f"report: {path}")
    if plots:
        try:
            for plot in report.plot(result, out):
                console.print(f"plot: {plot}")
        except ImportError:
            err.print(
                "plots skipped: matplotlib is not installed (pip install 'edge-engine[bench]')"
            )
    missing = report.problems(result)
    if strict and missing:
        for line in missing:
            err.print(f"[bold red]not measured:[/bold red] {line}", highlight=False)
        err.print(f"[bold red]FAILED:[/bold red] {len(missing)} of the measurements asked for")
        raise typer.Exit(1)


@bench_app.command("compare")
def compare_cmd(
    a: Annotated[Path, typer.Argument(help="The reference report (bench.json).")],
    b: Annotated[Path, typer.Argument(help="The report compared with it.")],
) -> None:
    """Print B's throughput and latency over A's for every run both reports have."""
    from bench import compare
    from bench.report import describe_load

    report_a, report_b = compare.load(a), compare.load(b)
    rows, unmatched = compare.compare(report_a, report_b)
    console = _console()
    if not rows:
        raise EngineError(f"{a} and {b} have no run in common (label, mode and load must match)")
    console.print(compare.table(rows, str(a), str(b)))
    for difference in compare.differences(report_a, report_b):
        console.print(f"[yellow]note:[/yellow] the reports differ in {difference}")
    for label, mode, concurrency, rate in unmatched:
        where = describe_load({"mode": mode, "concurrency": concurrency, "request_rate": rate})
        console.print(f"only in one report: {label} {where}")
