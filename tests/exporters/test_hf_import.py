"""``engine export HF_DIR``: Hugging Face GPT-2, BERT and DistilBERT exported, checked against
transformers itself, and served with the tokens and labels transformers gives."""

from __future__ import annotations

import asyncio
import json
import shutil

import numpy as np
import pytest

from engine.repository import read_manifest
from engine.runtime import Engine, EngineConfig, SamplingParams
from exporters.source import SourceError, source_kind

transformers = pytest.importorskip("transformers", reason="pip install '.[hf]'")
torch = pytest.importorskip("torch")

PROMPTS = ("def main():\n    ", "import os", "The quick brown fox", "x")


def _hf_greedy(hf_dir, ids: list[int], n: int) -> list[int]:
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    config = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        x = torch.tensor([ids])
        out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=config)
    return out[0, len(ids) :].tolist()


def test_our_checkpoints_and_hugging_face_directories_are_told_apart(hf_gpt2, tmp_path):
    assert source_kind(hf_gpt2) == "huggingface"
    ours = tmp_path / "ckpt"
    ours.mkdir()
    # our config.json names an architecture and its config; a model_type key does not confuse it
    meta = {"architecture": "decoder-lm", "config": {}, "model_type": "x", "step": 1}
    (ours / "config.json").write_text(json.dumps(meta))
    assert source_kind(ours) == "checkpoint"
    (ours / "config.json").write_text(json.dumps({"hidden_size": 4}))
    with pytest.raises(SourceError, match="neither an engine architecture"):
        source_kind(ours)
    with pytest.raises(SourceError, match="has no config.json"):
        source_kind(tmp_path)


def test_gpt2_greedy_equals_transformers_generate_through_every_graph(hf_repo, hf_gpt2):
    manifest = read_manifest(hf_repo / "gpt2" / "1")
    ref = manifest.validation["reference"]
    assert ref["class"] == "GPT2LMHeadModel" and ref["prompts"] == 12 and ref["new_tokens"] == 64
    assert set(ref["graphs"]) == {"default", "kv_inplace"} == set(manifest.graphs)
    assert all(g["identical_prompts"] == 12 for g in ref["graphs"].values())
    assert manifest.checkpoint["source"] == "huggingface"
    assert manifest.checkpoint["path"] == str(hf_gpt2.resolve())
    assert manifest.architecture == "decoder-lm" and manifest.serving["eos_token_id"] == 0


def test_served_gpt2_continues_prompts_as_transformers_does_in_one_batch(hf_repo, hf_gpt2):
    engine = Engine.from_repository(hf_repo, "gpt2", threads=1, config=EngineConfig(max_num_seqs=2))
    try:
        greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
        ids = [engine.encode(p) for p in PROMPTS]
        outs = engine.generate_all(ids, greedy)  # 4 requests through 2 slots: continuous batching
    finally:
        engine.close()
    expected = [_hf_greedy(hf_gpt2, i, 24) for i in ids]
    assert [o.token_ids for o in outs] == expected
    assert len({t for e in expected for t in e}) > 30  # the model does not repeat one token


def test_fp16_gpt2_agrees_with_transformers_top1(hf_gpt2, tmp_path):
    from exporters.base import ExportOptions
    from exporters.onnx_export import export_checkpoint

    out = export_checkpoint(
        hf_gpt2, tmp_path / "repo", ExportOptions(name="g16", fp16=True, progress=False)
    )
    ref = read_manifest(out).validation["reference"]
    assert read_manifest(out).precision == "fp16"
    for graph in ("default", "kv_inplace"):
        assert ref["graphs"][graph]["top1_agreement"] >= 0.99
        assert ref["graphs"][graph]["teacher_forced_steps"] > 12 * 64


def test_sharded_safetensors_and_pytorch_bin_hold_the_same_model(hf_gpt2, tmp_path):
    from safetensors.torch import load_file

    from exporters.hf.source import weight_files
    from exporters.source import open_source
    from tests.hf_models import save_gpt2

    sharded = save_gpt2(tmp_path / "sharded", save={"max_shard_size": "100KB"})
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(weight_files(sharded)) > 2
    binary = tmp_path / "bin"
    shutil.copytree(hf_gpt2, binary)
    torch.save(load_file(str(binary / "model.safetensors")), binary / "pytorch_model.bin")
    (binary / "model.safetensors").unlink()
    states = []
    for path in (hf_gpt2, sharded, binary):
        with open_source(path) as source:
            states.append(source.model.state_dict())
    for other in states[1:]:
        assert all(torch.equal(states[0][k], other[k]) for k in states[0])


@pytest.mark.parametrize("name", ["bert", "distilbert"])
def test_bert_family_logits_match_transformers_on_64_padded_texts(hf_repo, name):
    manifest = read_manifest(hf_repo / name / "1")
    ref = manifest.validation["reference"]
    assert ref["texts"] == 64 and ref["tokenization"].startswith("identical")
    graph = ref["graphs"]["default"]
    assert graph["max_abs_logit_diff"] <= 1e-4 and graph["argmax_agreement"] == 1.0
    assert len(set(graph["padded_widths"])) >= 3  # batches padded to different widths
    assert manifest.serving["labels"] == ["negative", "neutral", "positive"]
    assert manifest.architecture == "bert-classifier"


@pytest.mark.parametrize("name, fixture", [("bert", "hf_bert"), ("distilbert", "hf_distilbert")])
def test_classifier_tokenizes_like_transformers_and_serves_labels_by_name(
    hf_repo, name, fixture, request
):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    hf_dir = request.getfixturevalue(fixture)
    texts = ["Return the EVENT loop.", "ok", "Déjà vu " * 80]  # the last one is truncated
    engine = Engine.from_repository(hf_repo, name, threads=1)
    try:
        feeds = engine.encode(texts)
        results = asyncio.run(engine.classify(texts, top_k=3))
    finally:
        engine.close()
    theirs = AutoTokenizer.from_pretrained(hf_dir)(texts, truncation=True, padding=True)
    np.testing.assert_array_equal(feeds["input_ids"], theirs["input_ids"])  # one [CLS], [SEP] kept
    np.testing.assert_array_equal(feeds["attention_mask"], theirs["attention_mask"])
    assert feeds["input_ids"].shape[1] == 48 and feeds["input_ids"][2, -1] == 3  # ends in [SEP]
    assert ("token_type_ids" in feeds) == (name == "bert")
    model = AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
    inputs = {k: torch.tensor(v) for k, v in theirs.items() if k in feeds}
    with torch.no_grad():
        logits = model(**inputs).logits
    probs = torch.softmax(logits.double(), -1).numpy()
    for row, result in zip(probs, results):
        assert result.label == model.config.id2label[int(row.argmax())]
        assert abs(result.score - row.max()) < 1e-4


def test_engine_sample_runs_a_hugging_face_directory_as_it_runs_a_checkpoint(hf_bert, capsys):
    from engine.cli import main

    assert main(["sample", str(hf_bert), "--text", "Return the EVENT loop."]) == 0
    out = capsys.readouterr().out
    assert all(label in out for label in ("negative", "neutral", "positive")), out


def test_the_tied_embedding_is_stored_once_per_graph(hf_repo):
    """GPT-2's embedding is also its head: one (V, C) table, not it and its transpose."""
    import onnx

    version = hf_repo / "gpt2" / "1"
    manifest = read_manifest(version)
    vocab, width = manifest.serving["vocab_size"], manifest.serving["n_embd"]
    for graph in manifest.graphs.values():
        model = onnx.load(str(version / graph["file"]))
        tables = [t for t in model.graph.initializer if sorted(t.dims) == sorted([vocab, width])]
        assert len(tables) == 1, [t.name for t in tables]
        assert list(tables[0].dims) == [vocab, width]  # the lookup reads rows, not columns
        lookups = [
            n for n in model.graph.node if n.op_type == "Gather" and n.input[0] == tables[0].name
        ]
        assert lookups and all(a.i == 0 for n in lookups for a in n.attribute if a.name == "axis")
        assert graph["optimization"]["shared_transposed_weights"]
