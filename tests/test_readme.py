"""The README's first command, as a newcomer types it (less the virtualenv and pip install)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def quick_start() -> str:
    """The first ```bash block of the README's "Fresh machine" section."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Fresh machine", 1)[1]
    return re.search(r"```bash\n(.*?)\n```", section, re.S).group(1).strip()


def test_the_quick_start_sets_up_trains_exports_serves_and_calls_in_one_line():
    command = quick_start()
    assert "\n" not in command  # one line to paste
    setup, _, rest = command.partition("&& engine train")
    assert setup.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install")
    assert "&& engine export" in rest and "engine serve" in rest and "engine client" in rest
    assert "--log-file" in rest  # the server's JSON log stays out of the client's output
    assert "--wait" in rest and "sleep" not in rest  # no guess at how long start-up takes


@pytest.mark.slow
def test_the_quick_start_runs(tmp_path):
    """Train, export, serve and call as the README says, from a fresh cache (minutes)."""
    engine_part = "engine train" + quick_start().partition("&& engine train")[2]
    env = {
        **os.environ,
        "ENGINE_CACHE_DIR": str(tmp_path / "cache"),  # cold, as on a fresh machine
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        ["bash", "-c", engine_part],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # stdout: the training summary, the export line, then the client's completion
    completion = done.stdout.split("exported: ", 1)[1].split("\n", 1)[1]
    assert len(completion.strip()) > 40 and '"event"' not in completion, completion
    # the server's log went to its file, ending with a clean stop
    events = [json.loads(line) for line in (tmp_path / "serve.log").read_text().splitlines()]
    assert events[-1]["event"] == "server stopped"
    # progress went to stderr as plain lines (no terminal here)
    assert re.search(r"^decoder-lm  \d+/\d+  loss ", done.stderr, re.M), done.stderr[-2000:]
