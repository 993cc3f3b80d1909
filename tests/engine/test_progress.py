"""Progress on a pipe: a plain line every few seconds, and one when a run ends."""

from __future__ import annotations

import io
import time

import pytest

import engine.progress as progress
import exporters.progress as stages_mod
from tests.conftest import TOY_ENV, run_cli


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_line_every_interval_and_at_the_end(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    out = io.StringIO()
    with progress.LineProgress("loss {loss:.2f}", interval=5.0, stream=out) as bar:
        task = bar.add_task("lm", total=100, loss=float("nan"))
        for step in range(100):
            clock.now += 0.5  # 2 steps a second: a line every 10 steps
            bar.update(task, advance=1, loss=10.0 - step / 20)
    lines = out.getvalue().splitlines()
    assert len(lines) == 10
    assert lines[0] == "lm  10/100  loss 9.55  elapsed 0:00:05  ETA 0:00:45"
    assert lines[-1] == "lm  100/100  loss 5.05  elapsed 0:00:50"


def test_a_run_shorter_than_the_interval_still_reports_its_end(monkeypatch):
    out = io.StringIO()
    with progress.LineProgress(interval=60.0, stream=out) as bar:
        task = bar.add_task("gan", total=None)
        bar.update(task, advance=3)
    assert out.getvalue() == "gan  3  elapsed 0:00:00\n"


def test_train_on_a_pipe_prints_progress_lines(tmp_path):
    res = run_cli(
        "train", "toy-regression", "--out", str(tmp_path / "ckpt"), "--steps", "30", env=TOY_ENV
    )
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    assert lines[0] == "toy-regression: preparing data (cached after the first run)"
    assert any(line.startswith("toy-regression  30/30  loss ") for line in lines), lines
    assert "toy-regression: evaluating on held-out data" in lines
    assert "━" not in res.stderr + res.stdout  # no bar drawn into a pipe


def test_export_stages_on_a_pipe_beat_while_running_and_leave_a_failure_to_its_error(
    monkeypatch, capsys
):
    monkeypatch.setattr(stages_mod, "is_terminal", lambda: False)
    monkeypatch.setattr(stages_mod, "LINE_INTERVAL_S", 0.02)
    with pytest.raises(ValueError), stages_mod.Stages() as stages:
        with stages.stage("trace default"):
            time.sleep(0.15)
        with stages.stage("validate default"):
            raise ValueError("graph differs")
    lines = capsys.readouterr().err.splitlines()
    beats = [line for line in lines if line.startswith("  trace default  0:00:0")]
    assert len(beats) >= 2 and lines[len(beats)].startswith("✓ trace default  0:00:0")
    assert not any("validate" in line for line in lines)  # the error alone says what failed
