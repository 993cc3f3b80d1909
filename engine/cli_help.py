"""Help screens that read cleanly, whatever typer's defaults: ``engine ... --help``.

Recent typer draws help as rich panels that cut long option names at 80 columns
(``--checkpoint-eve…``), parses help text as rich markup (a default written ``[architecture]``
vanishes, leaving "Model name ."), gives every flag a ``<bool>`` type and wraps required
arguments in braces on the usage line (``{prompt}``). :class:`App` is a ``typer.Typer`` whose
help is click's plain layout: a usage line such as ``MODEL PROMPT [TEXTS]...``, option names in
full, command summaries uncut, no type on flags (``--force / --no-force`` says it all) and help
text printed verbatim.
"""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup


def _usage_name(param: Any) -> str:
    """Click's spelling of an argument on the usage line: NAME, [NAME], NAME..."""
    name = (param.metavar or param.name or "").upper()
    if not param.required:
        name = f"[{name}]"
    return f"{name}..." if param.nargs != 1 else name


def _tidy(param: Any) -> None:
    """Drop the type from a flag and upper-case an argument's name, as click does."""
    if getattr(param, "is_flag", False) and param.metavar is None:
        param.metavar = ""  # a flag's name is its value
    if param.param_type_name == "argument" and param.metavar is None:
        param.metavar = (param.name or "").upper()


class _CleanHelp:
    """Mixin for typer's command and group classes (see the module docstring)."""

    def get_short_help_str(self, limit: int = 45) -> str:
        """The first paragraph of the help, whole: the command list wraps it, never cuts it."""
        text = self.short_help or (self.help or "").split("\n\n")[0]
        return " ".join(text.split())

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        for param in params:
            _tidy(param)
        return params

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                pieces.append(_usage_name(param))
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        if getattr(self, "subcommand_metavar", None):  # a group: COMMAND [ARGS]...
            pieces.append(self.subcommand_metavar)
        return pieces


class Command(_CleanHelp, TyperCommand):
    """A typer command with clean help."""


class Group(_CleanHelp, TyperGroup):
    """A typer group with clean help."""


class App(typer.Typer):
    """``typer.Typer`` with plain help; its group and commands use the classes above."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("cls", Group)
        kwargs.setdefault("rich_markup_mode", None)
        super().__init__(**kwargs)

    def command(self, *args: Any, **kwargs: Any) -> Any:
        """``typer.Typer.command`` with :class:`Command` as the default class."""
        kwargs.setdefault("cls", Command)
        return super().command(*args, **kwargs)
