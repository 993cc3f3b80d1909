"""deploy/slim_venv.py: what a serving image may drop (the hub only if tokenizers alone uses it)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("slim_venv", ROOT / "deploy" / "slim_venv.py")
slim = importlib.util.module_from_spec(spec)
spec.loader.exec_module(slim)


class Dist:
    """A distribution with only what hub_orphans reads."""

    def __init__(self, *requires: str):
        self.requires = list(requires)


def test_hub_and_what_only_it_needs_go_when_tokenizers_alone_requires_it():
    dists = {
        "tokenizers": Dist("huggingface-hub>=0.16,<3.0"),
        "huggingface-hub": Dist("hf-xet>=1.6", "packaging>=20.9", "pyyaml>=5.1"),
        "hf-xet": Dist(),
        "pyyaml": Dist(),
        "packaging": Dist(),
        "onnxruntime": Dist("packaging", "numpy>=1.21"),
        "numpy": Dist(),
        "windows-only": Dist(),
    }
    dists["huggingface-hub"].requires.append('windows-only; sys_platform == "win32"')
    # packaging stays: onnxruntime needs it too; a marker false here is not a requirement
    assert slim.hub_orphans(dists) == ["hf-xet", "huggingface-hub", "pyyaml"]


def test_hub_stays_when_anything_else_requires_it():
    dists = {
        "tokenizers": Dist("huggingface-hub"),
        "transformers": Dist("huggingface-hub>=0.30", "tokenizers"),
        "huggingface-hub": Dist("hf-xet"),
        "hf-xet": Dist(),
    }
    assert slim.hub_orphans(dists) == []
    assert slim.hub_orphans({"tokenizers": Dist()}) == []


def test_extras_do_not_count_as_requirements():
    assert slim.requirements(Dist("a>=1", 'b; extra == "dev"', "C_d.e")) == {"a", "c-d-e"}


def test_not_a_venv_is_a_clear_error(tmp_path, capsys):
    assert slim.main([str(tmp_path)]) == 2
    assert "not a venv" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="not a venv"):
        slim.site_packages(tmp_path)
