"""Every ``engine ... --help`` reads cleanly: click usage lines, whole names, help text verbatim."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from engine.cli import app


def _commands(command, path=()):
    """(path, click command) for the root, every group and every command below it."""
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _commands(sub, (*path, name))


ROOT = typer.main.get_command(app)
COMMANDS = list(_commands(ROOT))


def _help(path: tuple[str, ...]) -> str:
    result = CliRunner().invoke(app, [*path, "--help"], prog_name="engine", terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.output


def test_every_command_is_checked():
    names = {" ".join(p) for p, _ in COMMANDS}
    assert {"train", "export", "serve", "client generate", "bench run"} <= names
    assert len(names) >= 17


@pytest.mark.parametrize(
    "path, command", COMMANDS, ids=[" ".join(p) or "engine" for p, _ in COMMANDS]
)
def test_help_reads_cleanly(path, command):
    text = _help(path)
    flat = " ".join(text.split())
    usage = text.splitlines()[0]
    assert usage.startswith(f"Usage: {' '.join(('engine', *path))} [OPTIONS]")
    assert "{" not in usage and "}" not in usage, usage
    assert "<bool>" not in text
    assert "…" not in text  # nothing cut at 80 columns
    # "name ." or "name ," but not "... and" or ".[bench]"
    stray = re.search(r".{0,30}\s([,;:]|\.)(?=\s|$)", flat)
    assert not stray, stray
    ctx = typer.Context(command)
    for param in command.get_params(ctx):
        if param.param_type_name == "argument":
            name = (param.metavar or param.name).upper()
            assert re.search(rf"\b{name}\b", usage), (name, usage)
        else:
            for opt in (*param.opts, *param.secondary_opts):
                assert opt in flat, (opt, path)
        if param.help:  # printed verbatim: no markup eats "[default]" or "`code`"
            assert " ".join(param.help.split()) in flat.replace("- ", "-"), param.help


def test_required_arguments_and_variadic_ones_read_as_in_click():
    assert _help(("client", "generate")).splitlines()[0].endswith("[OPTIONS] MODEL PROMPT")
    assert _help(("classify",)).splitlines()[0].endswith("[OPTIONS] TEXTS...")
    assert _help(("client",)).splitlines()[0].endswith("[OPTIONS] COMMAND [ARGS]...")


def test_a_default_in_brackets_survives():
    assert "Model name [architecture]." in _help(("export",))
