"""CLI behaviour a user sees: listings, training, sampling, and clear errors with exit code 2."""

import json

import pytest

from tests.conftest import TOY_ENV, run_cli


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# Where CUDA exists, --device cuda is no error: that case runs on hosts without a GPU only.
NO_CUDA = pytest.mark.skipif(_cuda_available(), reason="CUDA exists here: --device cuda works")


def test_plugins_lists_architectures_with_source_and_version():
    res = run_cli("plugins")
    assert res.returncode == 0, res.stderr
    for name in ("decoder-lm", "text-classifier", "gan-generator", "built-in", "onnx"):
        assert name in res.stdout


def test_train_toy_writes_a_complete_checkpoint_and_resumes(tmp_path):
    out = tmp_path / "ckpt"
    res = run_cli(
        "train",
        "toy-regression",
        "--out",
        str(out),
        "--steps",
        "40",
        "--no-progress",
        "--config",
        "lr=0.2",
        env=TOY_ENV,
    )
    assert res.returncode == 0, res.stderr
    assert {"model.safetensors", "config.json", "metrics.json", "trainer_state.pt"} <= {
        p.name for p in out.iterdir()
    }
    meta = json.loads((out / "config.json").read_text())
    assert meta["architecture"] == "toy-regression" and meta["config"]["lr"] == 0.2
    assert meta["step"] == 40
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["quality"]["passed"], metrics
    res = run_cli(
        "train",
        "toy-regression",
        "--out",
        str(out),
        "--steps",
        "60",
        "--resume",
        "--no-progress",
        env=TOY_ENV,
    )
    assert res.returncode == 0, res.stderr
    metrics2 = json.loads((out / "metrics.json").read_text())
    assert metrics2["train"]["resumed_from"] == 40 and metrics2["train"]["steps"] == 60
    assert metrics2["mse"] <= metrics["mse"] * 1.5
    res = run_cli("sample", str(out), env=TOY_ENV)
    assert res.returncode == 0 and "weights" in res.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (("train", "nope"), "unknown architecture 'nope'; known:"),
        (("train", "toy-regression", "--config", "bogus=1"), "unknown config key 'bogus'"),
        (("train", "toy-regression", "--config", "steps=ten"), "expected int"),
        pytest.param(("train", "toy-regression", "--device", "cuda"), "CUDA", marks=NO_CUDA),
        (("sample", "/nonexistent/ckpt"), "does not exist"),
    ],
)
def test_bad_input_gets_a_message_and_exit_2_not_a_traceback(args, message):
    res = run_cli(*args, env=TOY_ENV)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert message in " ".join(res.stderr.split()), res.stderr
    assert "Traceback" not in res.stderr


def test_corrupt_checkpoint_is_refused_clearly(tmp_path):
    out = tmp_path / "ckpt"
    assert (
        run_cli(
            "train",
            "toy-regression",
            "--out",
            str(out),
            "--steps",
            "5",
            "--no-progress",
            env=TOY_ENV,
        ).returncode
        == 0
    )
    (out / "model.safetensors").write_bytes(b"\x00garbage")
    res = run_cli("sample", str(out), env=TOY_ENV)
    assert res.returncode == 2 and "corrupt" in res.stderr and "Traceback" not in res.stderr
    (out / "config.json").write_text("{not json")
    res = run_cli("sample", str(out), env=TOY_ENV)
    assert res.returncode == 2 and "corrupt" in res.stderr


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    res = run_cli(
        "train", "toy-regression", "--out", str(tmp_path / "none"), "--resume", env=TOY_ENV
    )
    assert res.returncode == 2 and "does not exist" in res.stderr


def test_torchrun_two_cpu_processes_train_together(tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), **TOY_ENV, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "engine",
            "train",
            "toy-regression",
            "--out",
            str(out),
            "--steps",
            "30",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    meta = json.loads((out / "config.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert meta["world_size"] == 2 and metrics["train"]["world_size"] == 2
    assert metrics["quality"]["passed"]
