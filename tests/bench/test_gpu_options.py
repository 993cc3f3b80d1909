"""What the GPU run relies on, checked on CPU: strictness, time budget, per-baseline loads,
reports saved after every run, engine settings passed through, and the GPU monitor (a fake)."""

from __future__ import annotations

import json
import sys
import time
import types

import pytest

from bench import report
from bench.gpu_info import GpuMonitor, describe_gpu, device_index
from bench.runner import Bench, BenchConfig
from bench.server_process import ServeOptions, ServerProcess
from tests.bench.conftest import LM_MODEL
from tests.conftest import run_cli
from tests.runtime import conftest as runtime

lm_torch_repo = runtime.lm_torch_repo  # the runtime tests' session fixture: torch format

QUICK = ["--num-prompts", "2", "--input-len", "8", "--output-len", "4", "--threads", "1"]


def _bench(lm_repo, tmp_path, *args: str):
    argv = ["bench", "run", "--repo", str(lm_repo), *QUICK, "--warmup", "0", "--no-plots"]
    result = run_cli(*argv, "--out", str(tmp_path), "--no-progress", *args, timeout=300)
    saved = tmp_path / "bench.json"
    return result, json.loads(saved.read_text()) if saved.exists() else None


def test_strict_fails_loudly_when_a_load_asked_for_was_not_measured(lm_repo, tmp_path):
    args = ("--baselines", "bare", "--concurrency", "1,2", "--time-budget-s", "0")
    lenient, saved = _bench(lm_repo, tmp_path, *args)
    assert lenient.returncode == 0, lenient.stderr[-2000:]
    assert [s["load"] for s in saved["skipped"]] == ["c=1", "c=2"] and not saved["runs"]
    assert "time budget of 0 s was spent" in saved["skipped"][0]["reason"]
    strict, _ = _bench(lm_repo, tmp_path, *args, "--strict")
    assert strict.returncode == 1
    assert "not measured: skipped bare at c=1" in " ".join(strict.stderr.split())
    assert "FAILED: 2 of the measurements asked for" in strict.stderr


def test_only_at_narrows_one_baseline_and_strict_passes_when_all_asked_ran(lm_repo, tmp_path):
    args = ("--baselines", "inprocess,bare", "--concurrency", "1,2", "--only-at", "bare=2")
    result, saved = _bench(lm_repo, tmp_path, *args, "--strict")
    assert result.returncode == 0, result.stderr[-2000:]
    ran = sorted((r["label"], r["concurrency"]) for r in saved["runs"])
    assert ran == [("bare", 2), ("inprocess", 1), ("inprocess", 2)] and not saved["skipped"]
    assert saved["settings"]["only_at"] == {"bare": [2]}
    assert saved["gpu"] is None  # a CPU run
    bad, _ = _bench(lm_repo, tmp_path, "--baselines", "bare", "--only-at", "bare=3")
    assert bad.returncode == 2 and "not in --concurrency" in bad.stderr
    bad, _ = _bench(lm_repo, tmp_path, "--baselines", "bare", "--only-at", "hf=1")
    assert bad.returncode == 2 and "--only-at expects BASELINE=c1,c2" in bad.stderr


def test_the_report_is_saved_after_every_run(lm_repo, tmp_path):
    from bench.workloads import WorkloadSpec

    workload = WorkloadSpec(input_len=8, output_len=4)
    config = BenchConfig(
        lm_repo, concurrency=(1, 2), num_prompts=2, workload=workload, warmup=0, baselines=("bare",)
    )
    bench = Bench(config)
    saved = []
    bench.on_change = lambda: saved.append(len(report.build(bench, 0.0)["runs"]))
    bench.run()
    assert saved == [1, 2]


def test_engine_settings_reach_the_server_argv_and_the_in_process_engine(lm_torch_repo):
    options = ServeOptions(
        max_num_seqs=64, gpu_memory_utilization=0.5, dtype="bfloat16", cuda_graphs=False
    )
    argv = ServerProcess(lm_torch_repo, LM_MODEL, options).command()
    tail = " ".join(argv[argv.index("--log-level") + 2 :])
    assert tail == (
        "--max-num-seqs 64 --gpu-memory-utilization 0.5 --dtype bfloat16 --no-cuda-graphs"
    )
    from bench.baselines.inprocess import InProcessBaseline

    baseline = InProcessBaseline(
        lm_torch_repo, LM_MODEL, threads=1, dtype="bfloat16", cuda_graphs=False, max_num_seqs=3
    )
    try:
        engine = baseline.describe()["engine"]
        assert (engine["dtype"], engine["max_num_seqs"], engine["runner"]) == (
            "bfloat16",
            3,
            "TorchRunner",
        )
    finally:
        baseline.close()


def test_failed_requests_count_as_not_measured():
    run = {"label": "grpc", "mode": "concurrency", "concurrency": 4, "num_prompts": 16}
    run["stats"] = {"failed": 3}
    lines = report.problems({"skipped": [], "runs": [run]})
    assert lines == ["grpc at c=4: 3 of 16 failed"]


def test_the_gpu_monitor_keeps_the_peak_and_mean_utilization():
    readings = iter([(100.0, 0.0), (900.0, 80.0)])
    monitor = GpuMonitor(lambda: next(readings, (400.0, 100.0)), poll_s=0.01).start()
    time.sleep(0.1)
    figures = monitor.stop()
    assert figures.memory_used_start_mib == 100.0 and figures.memory_used_max_mib == 900.0
    assert figures.samples >= 3 and 0 < figures.utilization_mean < 100


def test_a_gpu_reader_that_dies_mid_run_ends_sampling_not_the_run():
    readings = iter([(50.0, None)])

    def read():
        try:
            return next(readings)
        except StopIteration:
            raise RuntimeError("driver gone") from None

    monitor = GpuMonitor(read, poll_s=0.01).start()
    time.sleep(0.05)
    figures = monitor.stop()
    assert (figures.memory_used_max_mib, figures.utilization_mean, figures.samples) == (
        50.0,
        None,
        1,
    )


def test_describe_gpu_reads_nvml_where_torch_sees_no_gpu(monkeypatch):
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: f"gpu{i}",
        nvmlSystemGetCudaDriverVersion=lambda: 13000,
        nvmlSystemGetDriverVersion=lambda: b"580.159.03",
        nvmlDeviceGetName=lambda h: b"NVIDIA H200",
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=143771 << 20, used=0),
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    info = describe_gpu("cuda:1")
    assert info["index"] == 1 and info["name"] == "NVIDIA H200"
    assert (info["driver"], info["driver_cuda"], info["memory_total_mib"]) == (
        "580.159.03",
        "13.0",
        143771,
    )
    assert describe_gpu("cpu") is None
    assert (device_index("cuda"), device_index("tensorrt"), device_index("cuda:3")) == (0, 0, 3)


@pytest.mark.parametrize("name", ["hf", "hf-static"])
def test_hf_baselines_are_registered(name):
    from bench.baselines import baseline_class

    assert baseline_class(name).name == name
