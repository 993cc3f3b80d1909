"""A command that reaches a module of a missing extra says which extra to install."""

from __future__ import annotations

import pytest

from engine.extras import MissingExtraError, needs


def test_a_missing_train_module_names_the_extra_and_the_torch_pin():
    @needs("train", "`engine train`")
    def train() -> None:
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    with pytest.raises(MissingExtraError) as info:
        train()
    message = str(info.value)
    assert "`engine train` needs the 'train' extra (torch is not installed)" in message
    assert "pip install torch==2.13.0 && pip install 'edge-engine[train]'" in message
    assert info.value.exit_code == 2


def test_other_missing_modules_are_not_blamed_on_the_extra():
    with pytest.raises(ModuleNotFoundError), needs("train", "export"):
        raise ModuleNotFoundError("No module named 'nothing_here'", name="nothing_here")


def test_a_submodule_counts_as_its_package():
    with pytest.raises(MissingExtraError, match="sklearn is not installed"), needs("train", "x"):
        raise ModuleNotFoundError("No module named 'sklearn.svm'", name="sklearn.svm")


def test_serve_ray_without_ray_names_the_ray_extra(monkeypatch, tmp_path):
    import sys

    from engine.server.ray_serve import serve_on_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(MissingExtraError, match="needs the 'ray' extra"):
        serve_on_ray(tmp_path, 2, 0, None, "latest:1", {})
