"""Fixtures for export tests: the test-only architecture registered, checkpoints trained once."""

from __future__ import annotations

import os

import pytest

from engine import plugins

TINY_PLUGIN = "tests.exporters.tiny_arch"


@pytest.fixture(scope="module")
def tiny_plugin():
    """Register ``tests.exporters.tiny_arch`` through ENGINE_PLUGINS for one test module.

    The plugin manager is cached per ENGINE_PLUGINS value, so changing it is enough.
    """
    before = os.environ.get(plugins.ENV_VAR)
    os.environ[plugins.ENV_VAR] = ",".join(filter(None, [before, TINY_PLUGIN]))
    yield TINY_PLUGIN
    if before is None:
        os.environ.pop(plugins.ENV_VAR, None)
    else:
        os.environ[plugins.ENV_VAR] = before


@pytest.fixture(scope="module")
def train_tiny(tiny_plugin, tmp_path_factory):
    """Return a function that trains the tiny classifier with config overrides (cached)."""
    from engine.trainer import train
    from tests.exporters.tiny_arch import NAME

    made = {}

    def make(**overrides):
        key = tuple(sorted(overrides.items()))
        if key not in made:
            out = tmp_path_factory.mktemp("tiny-ckpt") / "ckpt"
            made[key] = train(NAME, out, overrides=overrides, progress=False)
        return made[key]

    return make


@pytest.fixture(scope="module")
def tiny_ckpt(train_tiny):
    """A trained checkpoint of the tiny classifier with its true signature."""
    return train_tiny()
