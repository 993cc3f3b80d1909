"""A decoder-lm's weights as a GGUF file in llama.cpp's GPT-2 layout, written with ``gguf``.

Tensor names come from ``gguf``'s own GPT-2 name map (our parameter names are Hugging Face
GPT-2's), metadata and tensor types follow llama.cpp's ``convert_hf_to_gguf.py`` for
``GPT2LMHeadModel``: ``nn.Linear`` weights are already (out, in), the tied head is not written
(llama.cpp reads ``token_embd`` as the output matrix when ``output`` is absent), 1-D tensors,
norms and ``position_embd`` stay f32, and ``q8_0`` quantizes every other 2-D weight, the token
embedding (and so the output head) included. The vocabulary is the model's own byte-level BPE
(``tokenizer.ggml.model = gpt2``, GPT-2's pre-tokenizer regex). Numpy only: no torch, no
llama.cpp needed to write or read the file back.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import EngineError

QTYPES = ("f32", "q8_0")
ARCH = "gpt2"
TOKENIZER_PRE = "gpt-2"  # ByteLevel(add_prefix_space=False) splits with GPT-2's regex


class GGUFError(EngineError):
    """The weights cannot be written as GPT-2 GGUF (not GPT-2-shaped, or no ``gguf`` package)."""


def read_weights(weights_dir: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``model.safetensors`` as numpy arrays and the checkpoint's config (a torch-format version
    or a checkpoint directory)."""
    from safetensors.numpy import load_file

    from engine.checkpoint import CONFIG, WEIGHTS

    state = load_file(str(Path(weights_dir) / WEIGHTS))
    meta = json.loads((Path(weights_dir) / CONFIG).read_text())
    if meta.get("architecture") != "decoder-lm":
        raise GGUFError(f"{weights_dir} holds a {meta.get('architecture')!r}, not a decoder-lm")
    # the tied table is stored once under either name
    state.setdefault("transformer.wte.weight", state.get("lm_head.weight"))
    state.pop("lm_head.weight", None)
    return state, dict(meta["config"])


def gpt2_tensors(state: dict[str, np.ndarray], n_layer: int) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for every weight, in llama.cpp's GPT-2 naming."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, n_layer)
    for name in sorted(state):
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # HF's causal-mask buffers
            continue
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise GGUFError(f"no GPT-2 GGUF tensor for {name!r}: the weights are not GPT-2-shaped")
        yield new, np.ascontiguousarray(state[name], dtype=np.float32)


def tensor_qtype(name: str, array: np.ndarray, qtype: str) -> Any:
    """The GGML type convert_hf_to_gguf.py picks for one tensor under ``--outtype qtype``."""
    import gguf

    if (
        qtype == "f32"
        or array.ndim <= 1
        or name.endswith("_norm.weight")
        or not name.endswith(".weight")
        or name.startswith("position_embd")
        or array.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    ):
        return gguf.GGMLQuantizationType.F32
    return gguf.GGMLQuantizationType.Q8_0


def write_gguf(
    state: dict[str, np.ndarray],
    config: dict[str, Any],
    tokenizer_file: Path,
    out: Path,
    qtype: str,
) -> Path:
    """Write ``out`` (atomically: a temporary file renamed into place); return it."""
    try:
        import gguf
    except ImportError as exc:
        raise GGUFError(f"the gguf package is missing ({exc}); pip install -e '.[bench]'") from None
    if qtype not in QTYPES:
        raise GGUFError(f"unknown GGUF type {qtype!r}; choose one of {', '.join(QTYPES)}")
    n_layer, n_embd = int(config["n_layer"]), int(config["n_embd"])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_name(f"decoder-lm {n_layer}x{n_embd}")
        writer.add_block_count(n_layer)
        writer.add_context_length(int(config["block_size"]))
        writer.add_embedding_length(n_embd)
        writer.add_feed_forward_length(4 * n_embd)
        writer.add_head_count(int(config["n_head"]))
        writer.add_layer_norm_eps(1e-5)
        writer.add_file_type(
            gguf.LlamaFileType.ALL_F32 if qtype == "f32" else gguf.LlamaFileType.MOSTLY_Q8_0
        )
        _add_vocab(writer, Path(tokenizer_file), int(config["vocab_size"]))
        for name, array in gpt2_tensors(state, n_layer):
            kind = tensor_qtype(name, array, qtype)
            if kind == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(name, array)
            else:
                writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _add_vocab(writer: Any, tokenizer_file: Path, vocab_size: int) -> None:
    """Tokens, their types, BPE merges and special ids from the model's ``tokenizer.json``."""
    import gguf

    spec = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    vocab: dict[str, int] = dict(spec["model"]["vocab"])
    special = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    vocab.update(special)
    by_id = {i: tok for tok, i in vocab.items()}
    if sorted(by_id) != list(range(len(by_id))) or len(by_id) > vocab_size:
        raise GGUFError(f"{tokenizer_file}: token ids are not 0..{vocab_size - 1}")
    # rows the model has past the tokenizer's ids get placeholder names, as convert_hf does
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [
        gguf.TokenType.CONTROL if t in special else
        gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED
        for i, t in enumerate(tokens)
    ]  # fmt: skip
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(TOKENIZER_PRE)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    eos = special.get("<|endoftext|>", 0)
    writer.add_bos_token_id(eos)  # GPT-2 has one end-of-text token for both
    writer.add_eos_token_id(eos)
    if "<|pad|>" in special:
        writer.add_pad_token_id(special["<|pad|>"])
    writer.add_add_bos_token(False)


def cached_gguf(weights_dir: Path, qtype: str, cache: Path | None = None) -> Path:
    """The GGUF of ``weights_dir`` in ``qtype``, written once and kept under the engine cache.

    Keyed by the sha256 of the weights and the tokenizer, so retrained weights get a new file.
    """
    from engine.checkpoint import WEIGHTS
    from engine.paths import cache_dir

    weights_dir = Path(weights_dir)
    tokenizer = weights_dir / "tokenizer.json"
    if not tokenizer.exists():
        raise GGUFError(f"{weights_dir} has no tokenizer.json to write the GGUF vocabulary from")
    h = hashlib.sha256()
    for path in (weights_dir / WEIGHTS, tokenizer):
        h.update(path.read_bytes())
    out = (cache or cache_dir() / "gguf") / f"decoder-lm-{h.hexdigest()[:16]}-{qtype}.gguf"
    if not out.exists():
        state, config = read_weights(weights_dir)
        write_gguf(state, config, tokenizer, out, qtype)
    return out
