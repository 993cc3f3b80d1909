"""The out-of-tree example plugin: a real install is found through its entry point and trains.

The package is installed with ``pip install --no-deps --target DIR`` (real ``.dist-info``
entry-point metadata, nothing written into the developer's venv) and the engine runs in
subprocesses with ``PYTHONPATH=DIR``, exactly as it would after ``pip install``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, run_cli

EXAMPLE = ROOT / "examples" / "plugins" / "cnn-lstm-digits"
NAME = "cnn-lstm-digits"
# wide enough that rich does not truncate table cells; one thread: tiny models on a busy machine
QUIET = {"COLUMNS": "250", "OMP_NUM_THREADS": "1", "ENGINE_PLUGINS": ""}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """Install the example into a fresh target directory and return that directory."""
    tmp = tmp_path_factory.mktemp("example")
    # build from a copy so setuptools' build/ and *.egg-info never land in the source tree
    src = shutil.copytree(
        EXAMPLE, tmp / "src", ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    target = tmp / "site"
    # --no-build-isolation: use the venv's setuptools instead of fetching one from an index
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--no-build-isolation", "--target", str(target), str(src)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return target


def _env(site: Path) -> dict[str, str]:
    return {**QUIET, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}"}


def test_install_writes_the_entry_point(site):
    (dist,) = site.glob("engine_cnn_lstm_digits-*.dist-info")
    entry_points = (dist / "entry_points.txt").read_text()
    assert "[engine.plugins]" in entry_points
    assert "cnn-lstm-digits = cnn_lstm_digits" in entry_points


def test_engine_finds_the_architecture_only_when_installed(site):
    probe = (
        "from engine.plugins import architectures\n"
        "found = architectures().get('cnn-lstm-digits')\n"
        "arch, info = found or (None, None)\n"
        "print('absent' if found is None else f'{arch.task}|{info.source}|{info.version}')"
    )

    def run(env):
        return subprocess.run(
            [sys.executable, "-c", probe], env={**os.environ, **env},
            capture_output=True, text=True, timeout=300, cwd=ROOT,
        )  # fmt: skip

    installed = run(_env(site))
    assert installed.returncode == 0, installed.stderr
    assert installed.stdout.strip() == "classify|entry point (engine-cnn-lstm-digits)|0.1.0"
    bare = run({**QUIET, "PYTHONPATH": str(ROOT)})
    assert bare.stdout.strip() == "absent", bare.stderr


def test_engine_plugins_lists_it_as_an_entry_point(site):
    result = run_cli("plugins", env=_env(site))
    assert result.returncode == 0, result.stderr
    (row,) = [line for line in result.stdout.splitlines() if NAME in line and "classify" in line]
    assert "entry point" in row and "0.1.0" in row


@pytest.fixture(scope="module")
def trained(site, tmp_path_factory):
    """The example trained with its default config: (checkpoint dir, the command's output)."""
    out = tmp_path_factory.mktemp("example-run") / "ckpt"
    result = run_cli("train", NAME, "--out", str(out), "--no-progress", env=_env(site))
    assert result.returncode == 0, result.stderr
    return out, result.stdout


def test_engine_train_meets_the_bar(trained):
    out, stdout = trained
    assert "PASS" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy"] >= 0.95 > metrics["baseline_accuracy"]
    assert metrics["quality"]["passed"]
    meta = json.loads((out / "config.json").read_text())
    assert meta["architecture"] == NAME and meta["task"] == "classify"
    assert (out / "model.safetensors").exists()


def test_the_example_exports_serves_and_classifies_through_tritonclient(site, trained, tmp_path):
    """The serving contract: a tensor classifier (pixels in) served over KServe."""
    grpcclient = pytest.importorskip("tritonclient.grpc")
    from sklearn.datasets import load_digits

    from tests.server.conftest import ServerProcess

    ckpt, _ = trained
    repo = tmp_path / "repo"
    done = run_cli("export", str(ckpt), "--repo", str(repo), "--no-progress", env=_env(site))
    assert done.returncode == 0, done.stderr
    server = ServerProcess("--repo", str(repo), "--grace", "2")
    try:
        client = grpcclient.InferenceServerClient(server.target)
        assert client.is_model_ready(NAME)
        metadata = client.get_model_metadata(NAME)
        assert [(i.name, i.datatype, list(i.shape)) for i in metadata.inputs] == [
            ("pixels", "FP32", [-1, 1, 8, 8])
        ]
        digits = load_digits()
        pixels = (digits.images[:64] / 16.0).astype(np.float32)[:, None]  # (64, 1, 8, 8)
        tensor = grpcclient.InferInput("pixels", list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels)
        result = client.infer(NAME, [tensor])
        labels = [int(x.decode()) for x in result.as_numpy("label")]
        assert np.mean(np.array(labels) == digits.target[:64]) >= 0.9
        assert result.as_numpy("probabilities").shape == (64, 10)
    finally:
        assert server.terminate() == 0
        server.kill()
