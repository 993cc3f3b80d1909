"""GPT-2 small at full size (124M parameters, vocabulary 50257, context 1024), offline: built
from a config with a fixed seed, exported in fp32 and fp16, checked against transformers, and
served with transformers' greedy tokens. Slow (tens of minutes on 2 cores); the memory figures
are measured by bench/hf_scale.py, not asserted here."""

from __future__ import annotations

import pytest

from bench.hf_scale import GPT2_SMALL, VOCAB, build
from engine.repository import read_manifest

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers", reason="pip install '.[hf]'")


@pytest.fixture(scope="module")
def gpt2_small(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt2-small") / "gpt2-small"
    build(out, seed=0, vocab_size=VOCAB, shape=GPT2_SMALL)
    return out


@pytest.mark.parametrize("fp16", [False, True])
def test_gpt2_small_exports_validates_and_serves(gpt2_small, tmp_path, fp16):
    import torch

    from engine.runtime import Engine, EngineConfig, SamplingParams
    from exporters.base import ExportOptions
    from exporters.onnx_export import export_checkpoint

    version = export_checkpoint(
        gpt2_small, tmp_path, ExportOptions(name="gpt2-small", fp16=fp16, progress=False)
    )
    manifest = read_manifest(version)
    assert manifest.serving["context_length"] == 1024 and manifest.serving["vocab_size"] == VOCAB
    ref = manifest.validation["reference"]["graphs"]
    for graph in ("default", "kv_inplace"):
        if fp16:
            assert ref[graph]["top1_agreement"] >= 0.99
        else:
            assert ref[graph]["identical_prompts"] == 12
    engine = Engine.from_repository(
        tmp_path, "gpt2-small", config=EngineConfig(max_num_seqs=2, max_model_len=128)
    )
    try:
        ids = engine.encode("def main():\n    ")
        out = engine.generate_all(
            [ids], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
        )[0]
    finally:
        engine.close()
    if not fp16:
        model = transformers.GPT2LMHeadModel.from_pretrained(gpt2_small).eval()
        x = torch.tensor([ids])
        with torch.no_grad():
            want = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16,
                                  do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip
        assert out.token_ids == want[0, len(ids) :].tolist()
