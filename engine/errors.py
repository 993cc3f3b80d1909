"""The base exception: every failure a user can act on derives from it and becomes a message."""


class EngineError(Exception):
    """A failure with a message meant for a person; the CLI prints it and exits non-zero."""

    exit_code = 2
