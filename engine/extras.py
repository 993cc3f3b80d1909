"""Optional parts of the install (pyproject extras) and the error for a missing one.

The base install serves ONNX models; training and export need the ``train`` extra (torch and
friends), scale-out needs ``ray``, checking a Hugging Face import or conversion against
transformers needs ``hf``. A command that reaches a module of a missing extra fails with
one line naming the extra to install, instead of a ModuleNotFoundError traceback.
"""

from __future__ import annotations

from contextlib import ContextDecorator

from engine.errors import EngineError

# Top-level modules each extra brings, as `import` names (not distribution names).
EXTRAS: dict[str, tuple[str, ...]] = {
    "train": ("torch", "safetensors", "sklearn", "onnx", "onnxscript", "PIL"),
    "ray": ("ray", "starlette", "fastapi"),
    "hf": ("transformers",),
}
# torch first, from its pinned CPU build: a bare torch requirement would pull CUDA.
_INSTALL = {
    "train": "pip install torch==2.13.0 && pip install 'edge-engine[train]' "
    "(from a clone: pip install -e '.[train]')",
    "ray": "pip install 'edge-engine[ray]' (from a clone: pip install -e '.[ray]')",
    "hf": "pip install 'edge-engine[hf]' (from a clone: pip install -e '.[hf]')",
}


class MissingExtraError(EngineError):
    """A command needs an optional part of the install that is not there."""


def missing_extra(what: str, extra: str, module: str) -> MissingExtraError:
    """The error for ``what`` needing ``extra``, whose ``module`` is not installed."""
    return MissingExtraError(
        f"{what} needs the '{extra}' extra ({module} is not installed): {_INSTALL[extra]}"
    )


class needs(ContextDecorator):  # noqa: N801 - used as a decorator and a `with` block
    """Turn a missing module of ``extra`` raised inside into :class:`MissingExtraError`."""

    def __init__(self, extra: str, what: str):
        self.extra, self.what = extra, what

    def __enter__(self) -> needs:
        return self

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, ModuleNotFoundError):
            root = (exc.name or "").split(".")[0]
            if root in EXTRAS[self.extra]:
                raise missing_extra(self.what, self.extra, root) from None
