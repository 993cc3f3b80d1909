"""``bench/gpu.sh --device cpu``: the GPU benchmark's every step, on a tiny model, on CPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from plugins.decoder_lm.model import GPT2_SMALL

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu.sh"


def test_the_gpu_preset_in_the_script_is_gpt2_small():
    shape = re.search(r"SHAPE=\((n_layer=12[^)]*)\)", SCRIPT.read_text()).group(1)
    assert dict(kv.split("=") for kv in shape.split()) == {k: str(v) for k, v in GPT2_SMALL.items()}


def test_the_script_trains_exports_and_benchmarks_end_to_end_on_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(SCRIPT), "--device", "cpu", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((tmp_path / "repo" / "lm" / "1" / "manifest.json").read_text())
    assert manifest["format"] == "torch"
    assert (tmp_path / "repo" / "lm-onnx" / "1" / "model.onnx").exists()
    report = json.loads((tmp_path / "bench" / "bench.json").read_text())
    ran = {(r["label"], r["concurrency"]) for r in report["runs"]}
    assert {("grpc", 1), ("grpc", 2)} <= ran
    # hf runs where transformers is installed, and is reported skipped (with why) elsewhere
    hf_ran = {("hf", 1), ("hf", 2)} <= ran
    assert hf_ran or any(s["baseline"] == "hf" for s in report["skipped"])
