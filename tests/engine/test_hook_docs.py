"""Meta-test: every hook and every Architecture method has a docstring, a docs line and a test."""

import inspect
from pathlib import Path

import pytest

from engine import hookspecs
from engine.architecture import Architecture

ROOT = Path(__file__).resolve().parents[2]
DOCS = (ROOT / "docs" / "plugins.md").read_text()
HOOKS = sorted(n for n in dir(hookspecs) if n.startswith("engine_"))
METHODS = sorted(
    n for n, f in vars(Architecture).items() if inspect.isfunction(f) and not n.startswith("_")
)


def _test_sources() -> str:
    own = Path(__file__).resolve()
    return "\n".join(p.read_text() for p in (ROOT / "tests").rglob("*.py") if p.resolve() != own)


@pytest.mark.parametrize("name", HOOKS + METHODS)
def test_documented_and_tested(name):
    obj = getattr(hookspecs, name, None) or getattr(Architecture, name)
    assert (obj.__doc__ or "").strip(), f"{name} has no docstring"
    assert f"`{name}(" in DOCS, f"{name} has no line in docs/plugins.md"
    assert f"{name}(" in _test_sources() or f".{name}" in _test_sources(), f"{name} has no test"


def test_hook_list_is_not_empty():
    assert len(HOOKS) >= 3 and len(METHODS) >= 15
