"""The bench's outputs: a JSON report (machine, versions, model, command, runs), a table, plots.

Plots use matplotlib's headless ``Agg`` backend (``pip install 'edge-engine[bench]'``); without
matplotlib the plot step is skipped with a message and the JSON is still written.
"""

from __future__ import annotations

import io
import math
import os
import platform
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.table import Table

from engine.atomic import write_bytes, write_json

SCHEMA = 1
REPORT_FILE = "bench.json"
THROUGHPUT_PLOT = "throughput_vs_concurrency.png"
LATENCY_PLOT = "latency_vs_throughput.png"
_PACKAGES = ("edge-engine", "numpy", "onnxruntime", "grpcio", "protobuf", "tokenizers")
_OPTIONAL = ("torch", "transformers", "optimum", "matplotlib")  # listed only if imported


def machine() -> dict[str, Any]:
    """The machine the figures were measured on."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "load_avg_1m": load,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def gpu(serve: Any) -> dict[str, Any] | None:
    """The GPU (name, driver, CUDA) and how the model ran on it (dtype, CUDA graphs); None on CPU.

    The dtype is the runtime's default unless one was asked for: float16 on CUDA.
    """
    from bench.gpu_info import describe_gpu

    info = describe_gpu(serve.device)
    if info is None:
        return None
    return {**info, "dtype": serve.dtype or "float16", "cuda_graphs": serve.cuda_graphs}


def problems(report: dict[str, Any]) -> list[str]:
    """What was asked for and not measured: every skip, every run with failed requests."""
    out = skipped_lines(report)
    for run in report["runs"]:
        failed = run["stats"]["failed"]
        if failed:
            where = describe_load(run)
            out.append(f"{run['label']} at {where}: {failed} of {run['num_prompts']} failed")
    return out


def versions() -> dict[str, str]:
    """Versions of the packages that shape the figures (optional ones only when loaded)."""
    names = list(_PACKAGES) + [n for n in _OPTIONAL if n in sys.modules]
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _clean(value: Any) -> Any:
    """JSON-safe: NaN and infinities become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def build(bench: Any, started: float) -> dict[str, Any]:
    """The report of a finished :class:`bench.runner.Bench`."""
    cfg, model = bench.config, bench.model
    workload = bench.workload
    settings = {
        "workload": {**workload.spec.to_dict(), **workload.params},
        "input_len": workload.spec.input_len,
        "output_len": workload.spec.output_len,
        "goodput_slo": cfg.slo.to_dict(),
        "warmup": cfg.warmup,
        "seed": cfg.seed,
        "baselines": list(cfg.baselines),
        "device": cfg.serve.device,
        "threads": cfg.serve.threads,
        "dtype": cfg.serve.dtype,
        "cuda_graphs": cfg.serve.cuda_graphs,
        "max_num_seqs": cfg.serve.max_num_seqs,
        "gpu_memory_utilization": cfg.serve.gpu_memory_utilization,
        "only_at": {k: list(v) for k, v in cfg.only_at.items()},
        "time_budget_s": cfg.time_budget_s,
        "serve_args": list(cfg.serve.extra_args),
        "prompts": workload.source,
        "greedy": True,
        "ignore_eos": True,
    }
    return _clean(
        {
            "schema": SCHEMA,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "wall_s": time.time() - started,
            "command": cfg.command,
            "machine": machine(),
            "gpu": gpu(cfg.serve),
            "versions": versions(),
            "model": {
                "repo": str(model.repo),
                "name": model.name,
                "version": model.version,
                "task": model.task,
                "architecture": model.manifest.architecture,
                "serving": model.manifest.serving,
            },
            "server": bench.server or {"started_by_bench": True},
            "settings": settings,
            "baselines": bench.baselines,
            "runs": bench.runs,
            "medians": medians(bench.runs),
            "skipped": bench.skipped,
        }
    )


# Figures summarized over rounds: name -> how to read it from a run.
_MEDIAN_FIELDS = {
    "output_throughput": lambda run: run["stats"].get("output_throughput"),
    "request_throughput": lambda run: run["stats"].get("request_throughput"),
    "ttft_p50_ms": lambda run: (run["stats"].get("ttft_ms") or {}).get("p50"),
    "tpot_p50_ms": lambda run: (run["stats"].get("tpot_ms") or {}).get("p50"),
    "e2el_p50_ms": lambda run: (run["stats"].get("e2el_ms") or {}).get("p50"),
    "batch_size_mean": lambda run: (run.get("server") or {}).get("batch_size_mean"),
    "client_share": lambda run: (run.get("cpu") or {}).get("client_share"),
    "server_share": lambda run: (run.get("cpu") or {}).get("server_share"),
}


def medians(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per run label and load that ran more than once (``--rounds``): the median, min and max of
    throughput, TTFT/TPOT/E2E p50, server batch and CPU shares over the rounds."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["label"], describe_load(run)), []).append(run)
    out = []
    for (label, load), group in groups.items():
        if len(group) < 2:
            continue
        entry: dict[str, Any] = {"label": label, "load": load, "rounds": len(group)}
        for name, read in _MEDIAN_FIELDS.items():
            values = [v for v in map(read, group) if v is not None and not math.isnan(v)]
            if values:
                entry[name] = {
                    "median": statistics.median(values),
                    "min": min(values),
                    "max": max(values),
                }
        out.append(entry)
    return out


def medians_table(report: dict[str, Any]) -> Table:
    """Medians over rounds (min-max), for the figures a comparison across baselines needs."""
    t = Table(title="medians over rounds (min-max)", title_justify="left")
    for col in ("run", "load", "n", "tok/s", "TTFT p50", "TPOT p50", "batch", "CPU client/server"):
        t.add_column(col, no_wrap=True, justify="left" if col in ("run", "load") else "right")

    def fmt(entry: dict[str, Any], name: str, spec: str, pct: bool = False) -> str:
        m = entry.get(name)
        if not m:
            return "-"
        f = (lambda v: f"{v:.0%}") if pct else (lambda v: format(v, spec))
        return f"{f(m['median'])} ({f(m['min'])}-{f(m['max'])})"

    for e in report.get("medians") or []:
        shares = [fmt(e, "client_share", "", True), fmt(e, "server_share", "", True)]
        t.add_row(
            e["label"],
            e["load"],
            str(e["rounds"]),
            fmt(e, "output_throughput", ",.0f"),
            fmt(e, "ttft_p50_ms", ".1f"),
            fmt(e, "tpot_p50_ms", ".2f"),
            fmt(e, "batch_size_mean", ".1f"),
            " / ".join(shares),
        )
    return t


def write(report: dict[str, Any], out_dir: Path) -> Path:
    """Write ``bench.json`` into ``out_dir`` atomically; return its path."""
    path = Path(out_dir) / REPORT_FILE
    write_json(path, report)
    return path


def describe_load(run: dict[str, Any]) -> str:
    """c=4 for a concurrency run; 2/s (max 8) for a Poisson run (inf/s: all at once)."""
    if run.get("mode") == "concurrency":
        return f"c={run.get('concurrency')}"
    rate = run.get("request_rate")
    cap = f" (max {run['concurrency']})" if run.get("concurrency") else ""
    return ("inf" if rate is None else f"{rate:g}") + "/s" + cap


def _ms(d: dict[str, Any] | None, *keys: str) -> str:
    if not d:
        return "-"
    values = [d.get(k) for k in keys]
    return "/".join("-" if v is None else f"{v:.1f}" for v in values)


def table(report: dict[str, Any]) -> Table:
    """The runs as a table: throughput, latency percentiles (ms) and server load."""
    generate = report["model"]["task"] == "generate"
    kind = report.get("settings", {}).get("workload", {}).get("kind", "fixed")
    title = f"{report['model']['name']} ({report['model']['task']}, {kind} workload)"
    t = Table(title=title, title_justify="left")
    for col in ("run", "load", "ok/fail", "req/s"):
        t.add_column(col, no_wrap=True)
    if generate:
        t.add_column("tok/s", justify="right")
        for name in ("TTFT", "TPOT", "ITL", "E2E"):
            t.add_column(f"{name} p50/p99", justify="right")
        t.add_column("KV % | seqs | hit", justify="right")  # mean/max, mean/max, prefix
        t.add_column("same tokens", justify="right")
    else:
        t.add_column("E2E mean/p50/p90/p99", justify="right")
    t.add_column("batch", justify="right")
    if generate:
        t.add_column("goodput", justify="right")
    t.add_column("CPU client/server", justify="right")
    for run in report["runs"]:
        s, server = run["stats"], run.get("server") or {}
        load = describe_load(run)
        row = [
            run["label"],
            load,
            f"{s['completed']}/{s['failed']}",
            f"{s['request_throughput']:.2f}",
        ]
        if generate:
            row.append(f"{s['output_throughput']:,.0f}")
            row += [_ms(s[k], "p50", "p99") for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")]
            row.append(_server_kv(server))
            same = run.get("same_tokens") or {}
            prefix = same.get("identical_prefix")
            text = f"{same.get('identical')}/{same.get('compared')}"
            text += f" ({prefix} in first {same['prefix_tokens']})" if prefix is not None else ""
            row.append(text if same.get("compared") else "-")
        else:
            row.append(_ms(s["e2el_ms"], "mean", "p50", "p90", "p99"))
        batch = server.get("batch_size_mean")
        row.append("-" if batch is None else f"{batch:.2f}")
        if generate:
            goodput = s.get("goodput")
            good = f"{goodput:.2f} ({s.get('good', 0)}/{s['completed'] + s['failed']})"
            row.append("-" if goodput is None else good)
        cpu = run.get("cpu") or {}
        shares = [cpu.get("client_share"), cpu.get("server_share")]
        row.append("/".join("-" if v is None else f"{v:.0%}" for v in shares))
        t.add_row(*row)
    return t


def _server_kv(server: dict[str, Any]) -> str:
    """KV use mean/max (%), sequences running mean/max and the prefix-cache hit rate."""
    kv = [server.get("kv_usage_mean"), server.get("kv_usage_max")]
    if kv[0] is None:
        return "-"
    seqs = server.get("running_mean"), server.get("running_max")
    queries = server.get("prefix_queries") or 0
    parts = [f"{100 * kv[0]:.0f}/{100 * kv[1]:.0f}"]
    parts.append("-" if seqs[0] is None else f"{seqs[0]:.1f}/{seqs[1]}")
    parts.append(f"{server.get('prefix_hits', 0) / queries:.0%}" if queries else "-")
    return " | ".join(parts)


def skipped_lines(report: dict[str, Any]) -> list[str]:
    """One line per skipped baseline or load, with the reason."""
    lines = []
    for skip in report["skipped"]:
        where = f" at {skip['load']}" if "load" in skip else ""
        lines.append(f"skipped {skip['baseline']}{where}: {skip['reason']}")
    return lines


def plot(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Throughput vs concurrency and latency percentiles vs throughput, as PNGs.

    Raises ImportError when matplotlib is missing (the CLI turns that into a message).
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    generate = report["model"]["task"] == "generate"
    tput_key, tput_name = (
        ("output_throughput", "output tokens/s")
        if generate
        else ("request_throughput", "requests/s")
    )
    by_label: dict[str, list[dict[str, Any]]] = {}
    for run in report["runs"]:
        by_label.setdefault(run["label"], []).append(run)
    box = report["machine"]
    title = f"{report['model']['name']} on {box['processor']}, {box['cpu_count']} cores"
    paths = []

    # x: concurrency; a Poisson-only report plots against the offered rate instead
    by_rate = not any(r["mode"] == "concurrency" for r in report["runs"])
    x_key = "request_rate" if by_rate else "concurrency"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, runs in by_label.items():
        points = sorted((r[x_key], r["stats"][tput_key]) for r in runs if r[x_key] is not None)
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    xlabel = "offered request rate (req/s)" if by_rate else "concurrency (requests in flight)"
    ax.set(xlabel=xlabel, ylabel=tput_name, title=title)
    ax.set_xscale("log", base=2)
    ticks = sorted({r[x_key] for r in report["runs"] if r[x_key] is not None})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    paths.append(_save(fig, Path(out_dir) / THROUGHPUT_PLOT))

    metrics = [("ttft_ms", "TTFT"), ("tpot_ms", "TPOT")] if generate else [("e2el_ms", "latency")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.5), squeeze=False)
    styles = {"p50": "-", "p90": "--", "p99": ":"}
    for ax, (key, name) in zip(axes[0], metrics):
        for i, (label, runs) in enumerate(by_label.items()):
            runs = sorted(runs, key=lambda r: r["stats"][tput_key])
            x = [r["stats"][tput_key] for r in runs]
            for pct, style in styles.items():
                y = [_nan(r["stats"][key][pct]) for r in runs]
                if not all(math.isnan(v) for v in y):
                    ax.plot(x, y, style, marker="o", color=f"C{i}", label=f"{label} {pct}")
        ax.set(xlabel=tput_name, ylabel=f"{name} (ms)", title=f"{name} percentiles vs throughput")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    fig.suptitle(title)
    paths.append(_save(fig, Path(out_dir) / LATENCY_PLOT))
    return paths


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _save(fig: Any, path: Path) -> Path:
    from matplotlib import pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes(path, buf.getvalue())
    return path
