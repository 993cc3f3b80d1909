"""The serving install: `pip install .` in a fresh venv, without torch, serves a repository.

Builds the environment a serving image gets (no extras, then trimmed by deploy/slim_venv.py as
the image is), checks torch is absent, that a training command names the extra it needs, and
serves the tiny repository to tritonclient.
Needs pip to reach the package index (or its cache); about a minute here.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "engine", "plugins", "exporters", "bench")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dir_mib(path: Path) -> float:
    """Bytes under ``path`` in MiB (files only, links not followed)."""
    total = sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return total / 2**20


@pytest.fixture(scope="module")
def serving_venv(tmp_path_factory) -> Path:
    """A fresh venv with the base package only, installed from a copy of the sources."""
    work = tmp_path_factory.mktemp("serving-install")
    src = work / "src"
    for name in SOURCES:
        item = ROOT / name
        if item.is_dir():
            shutil.copytree(item, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(item, src / name)
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    done = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", str(src)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode != 0:
        if "Could not find a version" in done.stderr or "No matching distribution" in done.stderr:
            pytest.skip(f"pip cannot reach the package index: {done.stderr.strip()[-300:]}")
        raise AssertionError(done.stderr[-3000:])
    installed = dir_mib(venv)
    # The image's last build step (deploy/Dockerfile): everything below runs on the trimmed venv.
    slim = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "slim_venv.py"), str(venv)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert slim.returncode == 0, slim.stdout + slim.stderr
    site = next((venv / "lib").glob("python3*/site-packages"))
    assert not list((site / "onnxruntime" / "capi").glob("libonnxruntime.so*"))
    assert not (site / "huggingface_hub").exists() and not list(venv.rglob("__pycache__"))
    assert dir_mib(venv) < installed - 40, (installed, dir_mib(venv))
    return venv


def test_serving_install_has_no_torch_and_names_the_train_extra(serving_venv):
    py = str(serving_venv / "bin" / "python")
    probe = "import importlib.util as u; print([m for m in ('torch', 'sklearn') if u.find_spec(m)])"
    assert subprocess.run([py, "-c", probe], capture_output=True, text=True).stdout.strip() == "[]"
    done = subprocess.run(
        [str(serving_venv / "bin" / "engine"), "train", "decoder-lm", "--steps", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "'train' extra" in lines[0] and "torch==2.13.0" in lines[0], lines
    site = next((serving_venv / "lib").glob("python3*/site-packages"))
    print(f"serving venv: {dir_mib(serving_venv):.0f} MiB, site-packages {dir_mib(site):.0f} MiB")


def test_serving_install_serves_a_repository_to_tritonclient(serving_venv, served_repo):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    port = _free_port()
    log = open(serving_venv.parent / "serve.log", "w+")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(serving_venv / "bin" / "engine"), "serve", "--repo", str(served_repo)]
        + ["--port", str(port), "--no-metrics", "--grace", "2"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        deadline = time.monotonic() + 120
        while True:
            try:
                if client.is_server_ready():
                    break
            except Exception:
                pass
            assert proc.poll() is None, log.seek(0) or log.read()[-3000:]
            assert time.monotonic() < deadline, "the server did not get ready in 120 s"
            time.sleep(0.5)
        text = grpcclient.InferInput("text", [1], "BYTES")
        text.set_data_from_numpy(np.array([b"Return the sum of a list."], dtype=object))
        result = client.infer("clf", [text])
        probs = result.as_numpy("probabilities")
        assert probs.shape[0] == 1 and abs(float(probs.sum()) - 1.0) < 1e-4
        prompt = grpcclient.InferInput("text_input", [1], "BYTES")
        prompt.set_data_from_numpy(np.array([b"def f(x):"], dtype=object))
        out = client.infer("lm", [prompt], parameters={"max_tokens": 4, "temperature": 0.0})
        assert out.as_numpy("completion_tokens")[0] == 4
    finally:
        proc.terminate()
        code = proc.wait(30)
        log.close()
    assert code == 0
