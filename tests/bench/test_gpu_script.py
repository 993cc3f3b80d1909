"""``bench/gpu.sh``: the GPU run's every step on tiny shapes on CPU, and its loud failures."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from plugins.decoder_lm.model import GPT2_MEDIUM, GPT2_SMALL

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu.sh"
MAX_FILES = 8  # what one device run brings back


def _gpu_sh(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout
    )


@pytest.mark.parametrize(("shape", "preset"), [("small", GPT2_SMALL), ("medium", GPT2_MEDIUM)])
def test_the_cuda_presets_in_the_script_are_gpt2_shapes(shape, preset):
    line = re.search(rf"\*:{shape}\) echo \"(\d+) ([^\"]*)\"", SCRIPT.read_text())
    overrides = dict(kv.split("=") for kv in line.group(2).split())
    assert {k: overrides[k] for k in preset} == {k: str(v) for k, v in preset.items()}


def test_the_dry_run_measures_everything_asked_and_brings_back_only_the_report(tmp_path):
    pytest.importorskip("transformers", reason="the hf baselines need the bench extra")
    out, work = tmp_path / "out", tmp_path / "work"
    done = _gpu_sh("--device", "cpu", "--out", str(out), "--work", str(work))
    assert done.returncode == 0, done.stdout[-4000:]
    log = (out / "gpu.log").read_text()
    assert log.rstrip().endswith("gpu.sh: done") and "FAIL" not in log
    versions = log.splitlines()[1]  # right after the header: the stubs refuse older ones
    assert re.match(r"grpcio [\d.]+, protobuf [\d.]+", versions), versions
    before_training = log.split("engine train")[0]  # the gpu tests run first
    assert "pytest -m gpu" in before_training
    assert re.search(r"\d+ (passed|skipped)", before_training)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert len(files) <= MAX_FILES and files == [
        "gpu.log",
        *(
            f"{s}/{f}"
            for s in ("medium", "small")
            for f in ("bench.json", "latency_vs_throughput.png", "throughput_vs_concurrency.png")
        ),
    ]
    for shape in ("small", "medium"):
        manifest = json.loads((work / "repo" / shape / "1" / "manifest.json").read_text())
        assert manifest["format"] == "torch"
        assert not (work / f"{shape}-ckpt").exists()  # checkpoints removed after their bench
    assert not list(work.rglob("*.onnx"))  # ONNX is off by default
    small = json.loads((out / "small" / "bench.json").read_text())
    ran = {(r["label"], r["concurrency"]) for r in small["runs"]}
    expected = {(b, c) for b in ("grpc", "inprocess", "hf") for c in (1, 2)} | {("hf-static", 1)}
    assert ran == expected and not small["skipped"]
    others = [r["same_tokens"] for r in small["runs"] if r["label"] != "grpc"]
    assert all(same["identical_prefix"] == same["compared"] == 4 for same in others)
    medium = json.loads((out / "medium" / "bench.json").read_text())
    assert {r["label"] for r in medium["runs"]} == {"grpc", "inprocess", "hf"}
    assert medium["settings"]["max_num_seqs"] == 2 and medium["model"]["name"] == "medium"


def test_an_unknown_shape_fails_the_run_loudly(tmp_path):
    done = _gpu_sh("--device", "cpu", "--shapes", "bogus", "--no-tests", "--out", str(tmp_path))
    assert done.returncode == 1
    assert "gpu.sh: FAILED: unknown shape bogus" in (tmp_path / "gpu.log").read_text()


def test_a_spent_time_budget_fails_the_run_instead_of_reporting_done(tmp_path):
    args = ["--device", "cpu", "--shapes", "small", "--no-tests", "--budget-s", "1"]
    done = _gpu_sh(*args, "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"))
    assert done.returncode == 1
    log = (tmp_path / "out" / "gpu.log").read_text()
    assert "small: no time left of the 1 s budget" in log and "gpu.sh: done" not in log
