"""`engine bench` end to end on tiny models: the server as a child process, JSON, plots, compare."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from bench.server_process import ServeOptions, ServerProcess
from tests.conftest import run_cli

pytest.importorskip("onnxruntime")

QUICK = ["--num-prompts", "4", "--input-len", "8", "--output-len", "6", "--threads", "1"]


@pytest.fixture(scope="module")
def lm_report(lm_repo, tmp_path_factory):
    """One small sweep of the tiny LM over gRPC, in process and in the bare loop."""
    out = tmp_path_factory.mktemp("bench-lm")
    args = ["bench", "run", "--repo", str(lm_repo), "--concurrency", "1,2", *QUICK]
    result = run_cli(*args, "--out", str(out), "--no-progress", timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, json.loads((out / "bench.json").read_text()), result.stdout


def _plot_is_sane(path):
    image = Image.open(path)
    assert image.format == "PNG" and image.width > 400 and image.height > 300
    assert len(image.convert("RGB").getcolors(1 << 16) or ()) > 10  # lines, not a blank canvas


def test_the_report_has_every_run_with_sane_figures(lm_report):
    out, report, stdout = lm_report
    assert {"machine", "versions", "model", "command", "settings", "runs", "skipped"} <= set(report)
    assert report["command"].startswith("engine bench run")
    assert report["machine"]["cpu_count"] >= 1 and "onnxruntime" in report["versions"]
    assert report["model"]["task"] == "generate" and report["settings"]["output_len"] == 6
    runs = {(r["label"], r["concurrency"]): r for r in report["runs"]}
    assert set(runs) == {(b, c) for b in ("grpc", "inprocess", "bare") for c in (1, 2)}
    for run in runs.values():
        s = run["stats"]
        assert (s["completed"], s["failed"], s["output_tokens"]) == (4, 0, 24)
        assert s["input_tokens"] == 32
        assert 0 < s["ttft_ms"]["p50"] <= s["e2el_ms"]["p50"]
        assert s["ttft_ms"]["p50"] <= s["ttft_ms"]["p90"] <= s["ttft_ms"]["p99"]
        assert s["itl_ms"]["count"] == 4 * 5 and s["tpot_ms"]["count"] == 4
        assert s["output_throughput"] == pytest.approx(6 * s["request_throughput"])
    server = runs[("grpc", 2)]["server"]
    assert server["kv_blocks"] > 0 and server["batch_size_mean"] >= 1
    assert runs[("inprocess", 1)]["server"] is None
    assert "grpc" in stdout and "TTFT" in stdout


def test_every_baseline_produced_the_servers_greedy_tokens(lm_report):
    _, report, stdout = lm_report
    runs = {(r["label"], r["concurrency"]): r["same_tokens"] for r in report["runs"]}
    # every load sends prompts of its own (no run repeats an earlier one's): the server's
    # runs set the reference, each baseline is compared at the same load
    none = {"identical": 0, "identical_prefix": 0, "compared": 0}
    for key in [("grpc", 1), ("grpc", 2)]:
        assert runs[key] == {"reference": "grpc", **none, "prefix_tokens": 32}, key
    same = {"identical": 4, "identical_prefix": 4, "compared": 4}
    for key in [("inprocess", 1), ("inprocess", 2), ("bare", 1), ("bare", 2)]:
        assert runs[key] == {"reference": "grpc", **same, "prefix_tokens": 32}, key
    assert "same tokens" in stdout and "4/4 (4 in first 32)" in stdout


def test_a_baseline_with_other_tokens_is_counted_as_different():
    from bench.baselines.base import RequestRecord
    from bench.runner import Bench

    bench = Bench.__new__(Bench)  # only the token bookkeeping, no model or server
    bench.reference = None
    record = lambda ids: RequestRecord(0.0, [1.0] * len(ids), 3, ids)  # noqa: E731
    assert bench._same_tokens("grpc", [record([5, 6]), record([7, 8])])["compared"] == 0
    other = bench._same_tokens("hf", [record([5, 6]), record([7, 9]), record([1, 2])])
    assert (other["reference"], other["identical"], other["compared"]) == ("grpc", 1, 2)
    assert bench._same_tokens("grpc", [record([5, 6])] * 3)["compared"] == 2  # 3rd joins now
    bench.reference = None
    bench._same_tokens("grpc", [record([1] * 40), record([2] * 40)])
    parted = [record([1] * 40), record([2] * 32 + [3] * 8)]  # the 2nd parts after 32 tokens
    agree = bench._same_tokens("hf", parted)
    assert (agree["identical"], agree["identical_prefix"], agree["prefix_tokens"]) == (1, 2, 32)


def test_the_plots_are_written(lm_report):
    out, _, stdout = lm_report
    for name in ("throughput_vs_concurrency.png", "latency_vs_throughput.png"):
        assert name in stdout
        _plot_is_sane(out / name)


def test_compare_prints_ratios(lm_report, tmp_path):
    out, report, _ = lm_report
    faster = json.loads(json.dumps(report))
    for run in faster["runs"]:
        run["stats"]["request_throughput"] *= 2
    (tmp_path / "b.json").write_text(json.dumps(faster))
    result = run_cli("bench", "compare", str(out / "bench.json"), str(tmp_path / "b.json"))
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if "c=1" in line or "c=2" in line]
    assert len(rows) == 6
    assert all("2.00x" in row and "1.00x" in row for row in rows)


def test_compare_rejects_what_is_not_a_report(lm_report, tmp_path):
    out, _, _ = lm_report
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "other.json").write_text('{"a": 1}')
    for bad, message in (("bad.json", "not valid JSON"), ("other.json", "not an `engine bench")):
        result = run_cli("bench", "compare", str(out / "bench.json"), str(tmp_path / bad))
        assert result.returncode == 2 and message in result.stderr
        assert "Traceback" not in result.stderr


def test_poisson_mode_against_a_running_server(lm_repo, tmp_path):
    with ServerProcess(lm_repo, "tiny-lm", ServeOptions(threads=1)) as server:
        args = ["bench", "run", "--repo", str(lm_repo), "--target", server.target]
        args += ["--metrics-url", server.metrics_url, "--request-rate", "40", *QUICK]
        result = run_cli(*args, "--baselines", "grpc,bare", "--out", str(tmp_path), "--no-plots")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    run, bare = report["runs"]
    assert (run["mode"], run["request_rate"], run["stats"]["completed"]) == ("rate", 40.0, 4)
    assert run["server"]["batch_size_mean"] >= 1
    assert report["server"] == {"target": server.target, "same_weights": True}
    # the static-batch loop takes the same arrivals: a batch holds what came in meanwhile
    assert (bare["label"], bare["request_rate"], bare["stats"]["completed"]) == ("bare", 40.0, 4)
    assert bare["same_tokens"]["identical"] == 4 and not report["skipped"]
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("workload", ["mixed", "shared-prefix"])
def test_the_workload_and_its_parameters_are_in_the_report(lm_repo, tmp_path, workload):
    args = ["bench", "run", "--repo", str(lm_repo), "--concurrency", "4", "--workload", workload]
    args += ["--num-prompts", "8", "--input-len", "8", "--output-len", "6", "--threads", "1"]
    args += ["--baselines", "inprocess,bare", "--goodput-ttft-ms", "5000"]
    result = run_cli(*args, "--out", str(tmp_path), "--no-plots", "--no-progress", timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    spec = report["settings"]["workload"]
    assert spec["kind"] == workload and report["settings"]["goodput_slo"]["ttft_ms"] == 5000
    inprocess, bare = report["runs"]
    for run in (inprocess, bare):
        s = run["stats"]
        assert s["completed"] == 8 and 0 <= s["good"] <= 8 and s["goodput"] is not None
    # the static-batch loop (left-padded, cut at each request's length) gives the same tokens
    same = bare["same_tokens"]
    assert (same["reference"], same["identical"], same["compared"]) == ("inprocess", 8, 8)
    if workload == "mixed":
        assert spec["input_lens"]["max"] >= spec["input_lens"]["min"] and spec["sigma"] == 1.0
        assert len({r["stats"]["output_tokens"] for r in (inprocess, bare)}) == 1
    else:
        assert spec["prefix_len"] == 64 and spec["num_prefixes"] == 4
        assert inprocess["stats"]["input_tokens"] == 8 * (64 + 8)
    assert f"{workload} workload" in result.stdout and "goodput" in result.stdout


def test_bad_input_is_a_message_not_a_traceback(lm_repo, tmp_path):
    cases = [
        (["--repo", str(tmp_path / "nope")], "does not exist"),
        (["--repo", str(lm_repo), "--model", "nope"], "no model 'nope'"),
        (["--repo", str(lm_repo), "--target", "127.0.0.1:1"], "cannot reach a server"),
        (["--repo", str(lm_repo), "--baselines", "grpc,nope"], "unknown baseline 'nope'"),
        (["--repo", str(lm_repo), "--input-len", "90", "--output-len", "90"], "context"),
    ]
    for args, message in cases:
        result = run_cli("bench", "run", *args, "--out", str(tmp_path), timeout=60)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr


def test_dynamic_batching_on_and_off_for_an_image_model(gan_repo, tmp_path):
    args = ["bench", "run", "--repo", str(gan_repo), "--concurrency", "8", "--num-prompts", "32"]
    # a queue delay makes batches form whatever the timing (with none they form only when
    # requests arrive while a batch runs, which a tiny GAN on a busy machine may never see)
    delay = "--serve-arg=--max-queue-delay-ms=20"
    result = run_cli(*args, "--baselines", "grpc", delay, "--out", str(tmp_path), "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    runs = {r["batching"]: r for r in report["runs"]}
    assert set(runs) == {"on", "off"}
    assert all(
        r["stats"]["completed"] == 32 and r["stats"]["output_tokens"] == 32 for r in runs.values()
    )
    # --no-dynamic-batching: every request is its own backend call
    assert runs["off"]["server"]["batch_size_mean"] == 1.0
    assert runs["off"]["server"]["steps"] == 32
    assert runs["on"]["server"]["batch_size_mean"] > 1.0
    _plot_is_sane(tmp_path / "throughput_vs_concurrency.png")


def test_without_matplotlib_the_plots_are_skipped_with_a_message(lm_repo, tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    argv = ["bench", "run", "--repo", str(lm_repo), "--baselines", "bare", "--concurrency", "1"]
    argv += [*QUICK, "--out", str(tmp_path), "--no-progress"]
    code = (
        "import sys; sys.modules['matplotlib'] = None  # as if not installed\n"
        f"from engine.cli import main; sys.exit(main({argv!r}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "plots skipped: matplotlib is not installed" in result.stderr
    assert (tmp_path / "bench.json").exists() and not list(tmp_path.glob("*.png"))
