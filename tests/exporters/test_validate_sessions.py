"""Validation goes graph by graph: one onnxruntime session open at a time, and no transformers
model alive while one is (at GPT-2 small, each costs 0.6-0.8 GiB of the export's peak)."""

from __future__ import annotations

import weakref

import pytest

from engine.repository import read_manifest
from exporters import validate
from exporters.base import ExportOptions
from exporters.onnx_export import export_checkpoint

pytest.importorskip("transformers", reason="pip install '.[hf]'")


class Live:
    """Counts the sessions validation opens and the transformers models it loads, while alive."""

    def __init__(self, monkeypatch):
        from exporters.hf.reference import TransformersReference

        self.sessions = self.models = 0
        self.opened = 0
        self.most_sessions = 0
        self.models_at_open: list[int] = []  # transformers models alive as each session opens
        self.sessions_at_load: list[int] = []  # sessions alive as each transformers model loads
        open_session, load_model = validate.ort_session, TransformersReference.model

        def counted_session(path):
            self.models_at_open.append(self.models)
            session = open_session(path)
            self.sessions += 1
            self.opened += 1
            self.most_sessions = max(self.most_sessions, self.sessions)
            weakref.finalize(session, self._closed, "sessions")
            return session

        def counted_model(reference):
            fresh = reference._model is None
            model = load_model(reference)
            if fresh:
                self.sessions_at_load.append(self.sessions)
                self.models += 1
                weakref.finalize(model, self._closed, "models")
            return model

        monkeypatch.setattr(validate, "ort_session", counted_session)
        monkeypatch.setattr(TransformersReference, "model", counted_model)

    def _closed(self, kind: str) -> None:
        setattr(self, kind, getattr(self, kind) - 1)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_hf_gpt2_validation_holds_one_session_and_no_transformers_model_beside_it(
    hf_gpt2, tmp_path, monkeypatch, precision
):
    live = Live(monkeypatch)
    options = ExportOptions(name="g", fp16=precision == "fp16", progress=False)
    version = export_checkpoint(hf_gpt2, tmp_path / "repo", options)
    manifest = read_manifest(version)
    assert set(manifest.validation["reference"]["graphs"]) == {"default", "kv_inplace"}
    assert live.opened == 2 and live.most_sessions == 1 and live.sessions == 0
    assert live.sessions_at_load == [0] and live.models == 0  # loaded once, before, then dropped
    assert live.models_at_open == [0, 0]


def test_int8_validation_holds_one_session_at_a_time(tmp_path, monkeypatch):
    from tests.served_repo import checkpoints

    live = Live(monkeypatch)
    options = ExportOptions(name="lm", int8=True, progress=False)
    version = export_checkpoint(checkpoints() / "ckpt-lm", tmp_path / "repo", options)
    graphs = read_manifest(version).validation["task"]["graphs"]
    assert set(graphs) == {"default", "kv_inplace"} and live.opened == 2
    assert live.most_sessions == 1 and live.sessions == 0
