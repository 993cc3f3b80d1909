"""The baseline registry: lazy imports, and unavailable baselines become skips, not crashes."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

from bench import baselines
from bench.baselines import BaselineContext, Unavailable, create
from bench.baselines.base import Baseline, RequestRecord
from tests.conftest import ROOT


class Recorder(Baseline):
    """Takes only some of the context's fields, as a third-party baseline may."""

    name = "recorder"

    def __init__(self, model: str, threads: int | None = None, extra: int = 0):
        self.model, self.threads, self.extra = model, threads, extra

    def run(self, prompts, output_len, concurrency):
        return [RequestRecord(0.0, [1.0] * n, len(p)) for p, n in zip(prompts, output_len)]


class NeedsGpu(Recorder):
    def check(self) -> None:
        raise Unavailable("no CUDA device")


@pytest.fixture()
def registry(monkeypatch):
    module = types.ModuleType("bench_fake_baselines")
    module.Recorder, module.NeedsGpu = Recorder, NeedsGpu
    broken = types.ModuleType("bench_fake_broken")
    monkeypatch.setitem(sys.modules, "bench_fake_baselines", module)
    monkeypatch.setitem(sys.modules, "bench_fake_broken", broken)
    entries = {
        "recorder": "bench_fake_baselines:Recorder",
        "gpu": "bench_fake_baselines:NeedsGpu",
        "absent": "bench_no_such_module:Thing",
        "noclass": "bench_fake_broken:Thing",
    }
    for name, path in entries.items():
        monkeypatch.setitem(baselines.REGISTRY, name, path)
    return BaselineContext(repo=Path("/repo"), model="lm", threads=2)


def test_a_baseline_gets_only_the_arguments_it_accepts(registry):
    made = create("recorder", registry, extra=7)
    assert (made.model, made.threads, made.extra) == ("lm", 2, 7)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("gpu", "no CUDA device"),
        ("absent", "cannot import bench_no_such_module"),
        ("noclass", "defines no Thing"),
    ],
)
def test_unavailable_baselines_say_why(registry, name, reason):
    with pytest.raises(Unavailable, match=reason):
        create(name, registry)


def test_the_bench_imports_no_framework_until_a_baseline_asks():
    assert set(baselines.REGISTRY) >= {"grpc", "inprocess", "bare", "hf", "optimum"}
    code = (
        "import sys, engine.cli, bench.runner, bench.baselines; "
        "bench.baselines.baseline_class('inprocess'); bench.baselines.baseline_class('bare'); "
        "print([m for m in ('torch', 'transformers', 'optimum', 'matplotlib') if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_bench_reports_unavailable_baselines_as_skipped(registry, lm_repo):
    from bench.runner import Bench, BenchConfig
    from bench.workloads import WorkloadSpec

    config = BenchConfig(
        repo=lm_repo,
        concurrency=(2,),
        num_prompts=2,
        workload=WorkloadSpec(input_len=4, output_len=3),
        warmup=0,
        baselines=("recorder", "gpu", "absent"),
    )
    bench = Bench(config)
    bench.run()
    assert [r["label"] for r in bench.runs] == ["recorder"]
    assert bench.runs[0]["stats"]["output_tokens"] == 6
    reasons = {s["baseline"]: s["reason"] for s in bench.skipped}
    assert reasons["gpu"] == "no CUDA device"
    assert "cannot import" in reasons["absent"]


def test_rounds_repeat_every_baseline_in_rotated_order_and_report_medians(
    registry, lm_repo, monkeypatch
):
    from bench import report
    from bench.runner import Bench, BenchConfig
    from bench.workloads import WorkloadSpec

    order = []

    class Timed(Recorder):
        def run(self, prompts, output_len, concurrency):
            order.append(self.name)
            return super().run(prompts, output_len, concurrency)

    class Slow(Timed):
        name = "slow"

        def run(self, prompts, output_len, concurrency):
            order.append(self.name)
            base = 1.0 + len(order)  # a later round is slower: the range shows it
            return [RequestRecord(0.0, [base * (i + 1) for i in range(n)], 1) for n in output_len]

    monkeypatch.setattr(sys.modules["bench_fake_baselines"], "Recorder", Timed)
    monkeypatch.setattr(sys.modules["bench_fake_baselines"], "Slow", Slow, raising=False)
    monkeypatch.setitem(baselines.REGISTRY, "slow", "bench_fake_baselines:Slow")
    config = BenchConfig(
        repo=lm_repo,
        concurrency=(2,),
        num_prompts=2,
        workload=WorkloadSpec(input_len=4, output_len=3),
        warmup=0,
        baselines=("recorder", "slow", "gpu"),
        rounds=3,
    )
    bench = Bench(config)
    bench.run()
    assert order == ["recorder", "slow", "slow", "recorder", "recorder", "slow"]
    assert [r["round"] for r in bench.runs] == [0, 0, 1, 1, 2, 2]
    assert [s["baseline"] for s in bench.skipped] == ["gpu"]  # once, not once a round
    result = report.build(bench, 0.0)
    by_label = {m["label"]: m for m in result["medians"]}
    assert set(by_label) == {"recorder", "slow"}
    assert by_label["slow"]["rounds"] == 3
    tpot = by_label["slow"]["tpot_p50_ms"]  # one token every 3, 4 and 7 s in the three rounds
    assert (tpot["min"], tpot["median"], tpot["max"]) == pytest.approx((3e3, 4e3, 7e3))
    rows = report.medians_table(result).row_count
    assert rows == 2
