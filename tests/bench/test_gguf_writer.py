"""The GGUF writer: llama.cpp's GPT-2 names, shapes and values, read back with gguf's reader."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.gguf_writer import GGUFError, cached_gguf, read_weights, write_gguf
from tests.runtime import conftest as runtime

gguf = pytest.importorskip("gguf", reason="the gguf package is missing: pip install '.[bench]'")
lm_checkpoint = runtime.lm_checkpoint  # the runtime tests' tiny LM weights (session fixture)

LAYER_TENSORS = {
    "attn_norm.weight": "transformer.h.{i}.ln_1.weight",
    "attn_norm.bias": "transformer.h.{i}.ln_1.bias",
    "attn_qkv.weight": "transformer.h.{i}.attn.c_attn.weight",
    "attn_qkv.bias": "transformer.h.{i}.attn.c_attn.bias",
    "attn_output.weight": "transformer.h.{i}.attn.c_proj.weight",
    "attn_output.bias": "transformer.h.{i}.attn.c_proj.bias",
    "ffn_norm.weight": "transformer.h.{i}.ln_2.weight",
    "ffn_norm.bias": "transformer.h.{i}.ln_2.bias",
    "ffn_up.weight": "transformer.h.{i}.mlp.c_fc.weight",
    "ffn_up.bias": "transformer.h.{i}.mlp.c_fc.bias",
    "ffn_down.weight": "transformer.h.{i}.mlp.c_proj.weight",
    "ffn_down.bias": "transformer.h.{i}.mlp.c_proj.bias",
}
GLOBAL_TENSORS = {
    "token_embd.weight": "transformer.wte.weight",
    "position_embd.weight": "transformer.wpe.weight",
    "output_norm.weight": "transformer.ln_f.weight",
    "output_norm.bias": "transformer.ln_f.bias",
}


@pytest.fixture(scope="module")
def written(lm_checkpoint, tmp_path_factory):
    """The tiny LM written as f32 and q8_0; the weights and config it came from."""
    out = tmp_path_factory.mktemp("gguf")
    state, config = read_weights(lm_checkpoint)
    files = {
        q: write_gguf(state, config, lm_checkpoint / "tokenizer.json", out / f"m-{q}.gguf", q)
        for q in ("f32", "q8_0")
    }
    return files, state, config


def _fields(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def _expected(state: dict, n_layer: int) -> dict[str, np.ndarray]:
    names = {**GLOBAL_TENSORS}
    for i in range(n_layer):
        names.update({f"blk.{i}.{k}": v.format(i=i) for k, v in LAYER_TENSORS.items()})
    return {gguf_name: state[ours] for gguf_name, ours in names.items()}


def test_f32_holds_every_gpt2_tensor_with_our_values(written):
    files, state, config = written
    reader = gguf.GGUFReader(files["f32"])
    expected = _expected(state, config["n_layer"])
    got = {t.name: t for t in reader.tensors}
    assert set(got) == set(expected)  # no output.weight: llama.cpp reuses token_embd (tied)
    for name, want in expected.items():
        tensor = got[name]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32, name
        assert list(tensor.shape) == list(reversed(want.shape)), name  # GGML's order: ne0 first
        np.testing.assert_array_equal(np.asarray(tensor.data).reshape(want.shape), want)


def test_q8_0_quantizes_the_matrices_and_keeps_norms_biases_positions_f32(written):
    files, state, config = written
    reader = gguf.GGUFReader(files["q8_0"])
    expected = _expected(state, config["n_layer"])
    q8 = gguf.GGMLQuantizationType.Q8_0
    for tensor in reader.tensors:
        want = expected[tensor.name]
        matrix = want.ndim == 2 and tensor.name != "position_embd.weight"
        assert (tensor.tensor_type == q8) == matrix, tensor.name
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(want.shape)
        # q8_0: one scale per 32 values, 8-bit: error below half a step of the block's range
        bound = np.abs(want).max() / 127 if matrix else 0.0
        assert np.abs(values - want).max() <= bound + 1e-7, tensor.name
    assert files["q8_0"].stat().st_size < 0.4 * files["f32"].stat().st_size


def test_metadata_and_vocabulary_are_what_llama_cpp_reads_for_gpt2(written, lm_checkpoint):
    files, state, config = written
    fields = _fields(gguf.GGUFReader(files["f32"]))
    assert fields["general.architecture"] == "gpt2"
    assert fields["gpt2.block_count"] == config["n_layer"]
    assert fields["gpt2.context_length"] == config["block_size"]
    assert fields["gpt2.embedding_length"] == config["n_embd"]
    assert fields["gpt2.feed_forward_length"] == 4 * config["n_embd"]
    assert fields["gpt2.attention.head_count"] == config["n_head"]
    assert fields["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert fields["general.file_type"] == gguf.LlamaFileType.ALL_F32
    tokenizer = json.loads((lm_checkpoint / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == config["vocab_size"]
    assert all(tokens[i] == t for t, i in vocab.items())
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.eos_token_id"] == vocab["<|endoftext|>"] == 0
    assert fields["tokenizer.ggml.padding_token_id"] == vocab["<|pad|>"]
    assert fields["tokenizer.ggml.token_type"][:5] == [3, 3, 3, 3, 1]  # specials: CONTROL
    merges = fields["tokenizer.ggml.merges"]
    first = tokenizer["model"]["merges"][0]
    assert merges[0] == (first if isinstance(first, str) else " ".join(first))
    assert _fields(gguf.GGUFReader(files["q8_0"]))["general.file_type"] == 7  # MOSTLY_Q8_0


def test_cached_file_is_reused_and_a_non_gpt2_checkpoint_is_refused(lm_checkpoint, tmp_path):
    first = cached_gguf(lm_checkpoint, "f32", cache=tmp_path)
    stamp = first.stat().st_mtime_ns
    assert cached_gguf(lm_checkpoint, "f32", cache=tmp_path) == first
    assert first.stat().st_mtime_ns == stamp and not list(tmp_path.glob(".*.tmp"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architecture": "gan-generator"}))
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(2, np.float32)}, str(other / "model.safetensors"))
    with pytest.raises(GGUFError, match="not a decoder-lm"):
        read_weights(other)
    with pytest.raises(GGUFError, match="unknown GGUF type"):
        write_gguf({}, {"n_layer": 1, "n_embd": 8}, other / "t.json", tmp_path / "x.gguf", "q4_0")
