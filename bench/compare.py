"""``engine bench compare A B``: B's figures over A's, run by run.

Runs are matched on what was measured (run label, load mode, concurrency or rate); a run in
only one report is listed as unmatched. A ratio above 1 means B is higher: better for
throughput, worse for latency.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from bench.report import describe_load
from engine.errors import EngineError

# (column, path into a run): throughputs first, then latencies (lower is better)
FIGURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("req/s", ("stats", "request_throughput")),
    ("tok/s", ("stats", "output_throughput")),
    ("goodput", ("stats", "goodput")),
    ("TTFT p50", ("stats", "ttft_ms", "p50")),
    ("TTFT p99", ("stats", "ttft_ms", "p99")),
    ("TPOT p50", ("stats", "tpot_ms", "p50")),
    ("ITL p50", ("stats", "itl_ms", "p50")),
    ("E2E p50", ("stats", "e2el_ms", "p50")),
    ("E2E p99", ("stats", "e2el_ms", "p99")),
)


class CompareError(EngineError):
    """A report cannot be read or is not a bench report."""


@dataclass(frozen=True)
class Row:
    """One matched run: its key and B/A per figure (None where either side has no value)."""

    key: tuple[Any, ...]
    ratios: dict[str, float | None]


def load(path: Path) -> dict[str, Any]:
    """A bench report from ``path``; a clear error if missing, not JSON or not a report."""
    try:
        report = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CompareError(f"no such report: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CompareError(f"cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise CompareError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(report, dict) or not isinstance(report.get("runs"), list):
        raise CompareError(f"{path} is not an `engine bench run` report (no 'runs' list)")
    return report


def run_key(run: dict[str, Any]) -> tuple[Any, ...]:
    """What a run measured: label, mode, concurrency and request rate."""
    return (run.get("label"), run.get("mode"), run.get("concurrency"), run.get("request_rate"))


def _get(run: dict[str, Any], path: tuple[str, ...]) -> float | None:
    value: Any = run
    for part in path:
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return float(value) if isinstance(value, (int, float)) else None


def compare(a: dict[str, Any], b: dict[str, Any]) -> tuple[list[Row], list[tuple[Any, ...]]]:
    """(matched rows with B/A ratios, keys found in only one report)."""
    runs_a = {run_key(r): r for r in a["runs"]}
    runs_b = {run_key(r): r for r in b["runs"]}
    rows = []
    for key, ra in runs_a.items():
        rb = runs_b.get(key)
        if rb is None:
            continue
        ratios = {}
        for name, path in FIGURES:
            va, vb = _get(ra, path), _get(rb, path)
            ratios[name] = vb / va if va and vb is not None else None
        rows.append(Row(key, ratios))
    unmatched = [k for k in runs_a if k not in runs_b] + [k for k in runs_b if k not in runs_a]
    return rows, unmatched


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Settings that differ between the reports (the ratios then mix two effects)."""
    pairs = {
        "model": (a.get("model", {}).get("name"), b.get("model", {}).get("name")),
        "processor": (a.get("machine", {}).get("processor"), b.get("machine", {}).get("processor")),
        "cpu_count": (a.get("machine", {}).get("cpu_count"), b.get("machine", {}).get("cpu_count")),
    }
    for key in ("input_len", "output_len", "threads", "serve_args"):
        pairs[key] = (a.get("settings", {}).get(key), b.get("settings", {}).get(key))
    kinds = [r.get("settings", {}).get("workload", {}).get("kind", "fixed") for r in (a, b)]
    pairs["workload"] = (kinds[0], kinds[1])
    return [f"{k}: {va} vs {vb}" for k, (va, vb) in pairs.items() if va != vb]


def table(rows: list[Row], a_name: str, b_name: str) -> Table:
    """The ratios as a table."""
    t = Table(title=f"{b_name} / {a_name}", title_justify="left")
    for col in ("run", "load"):
        t.add_column(col, no_wrap=True)
    for name, _ in FIGURES:
        t.add_column(name, justify="right")
    for row in rows:
        label, mode, concurrency, rate = row.key
        where = describe_load({"mode": mode, "concurrency": concurrency, "request_rate": rate})
        cells = ["-" if v is None else f"{v:.2f}x" for v in row.ratios.values()]
        t.add_row(str(label), where, *cells)
    return t
