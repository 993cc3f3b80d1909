"""Hugging Face model directories built offline for tests: small configs, fixed seeds.

Nothing is downloaded: tokenizers are trained with ``tokenizers`` on a few stdlib files and
saved with ``tokenizer.save_pretrained``; models are ``transformers`` classes built from configs
and saved with ``save_pretrained``. Random-init weights are redrawn larger than the default
0.02 std (GPT-2: small token embeddings, large positions, as tests/runtime/conftest.py does)
so greedy text does not collapse into one repeated token or near-ties, which would hide bugs.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Any

GPT2_TINY = {"n_positions": 128, "n_embd": 64, "n_layer": 2, "n_head": 2}
BERT_TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 64,
}
DISTILBERT_TINY = {
    "dim": 64,
    "n_layers": 2,
    "n_heads": 2,
    "hidden_dim": 128,
    "max_position_embeddings": 64,
}
LABELS = ("negative", "neutral", "positive")
MAX_LENGTH = 48  # the BERT tokenizers' model_max_length, below the 64 positions
EOT = "<|endoftext|>"


def stdlib_texts(n: int = 40) -> list[str]:
    """The first ``n`` top-level stdlib modules' source: local text to train tokenizers on."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:n]
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def bpe_tokenizer(vocab_size: int = 1000) -> Any:
    """A GPT-2-style byte-level BPE tokenizer with ``<|endoftext|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(stdlib_texts(), trainer=trainer)
    return tok


def wordpiece_tokenizer(vocab_size: int = 800) -> Any:
    """A lower-cased BERT WordPiece tokenizer ([PAD] [UNK] [CLS] [SEP] [MASK] first)."""
    from tokenizers.implementations import BertWordPieceTokenizer

    wp = BertWordPieceTokenizer(lowercase=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wp.train_from_iterator(stdlib_texts(), vocab_size=vocab_size, special_tokens=specials)
    return wp._tokenizer


def _redraw(model: Any, scales: dict[str, float], default: float, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                scale = next((v for k, v in scales.items() if k in name), default)
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def save_gpt2(
    out: Path, seed: int = 0, tokenizer: Any = None, scale: bool = True, **config: Any
) -> Path:
    """A ``GPT2LMHeadModel`` directory: weights, config.json, tokenizer.json; returns ``out``.

    ``config`` overrides :data:`GPT2_TINY` and any GPT2Config field; ``save`` keyword
    arguments of ``save_pretrained`` go in ``config["save"]``.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    save = config.pop("save", {})
    tokenizer = tokenizer or bpe_tokenizer()
    eot = tokenizer.token_to_id(EOT)
    torch.manual_seed(seed)
    settings = {**GPT2_TINY, "bos_token_id": eot, "eos_token_id": eot, **config}
    hf_config = GPT2Config(vocab_size=tokenizer.get_vocab_size(), **settings)
    model = GPT2LMHeadModel(hf_config)
    if scale:
        _redraw(model, {"wte": 0.1, "wpe": 1.0}, 0.5, seed)
    model.save_pretrained(out, **save)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOT,
        bos_token=EOT,
        unk_token=EOT,
        model_max_length=hf_config.n_positions,
    )
    fast.save_pretrained(out)
    return Path(out)


def save_bert(
    out: Path,
    kind: str = "bert",
    seed: int = 0,
    labels: tuple[str, ...] = LABELS,
    tokenizer: Any = None,
    **config: Any,
) -> Path:
    """A ``BertForSequenceClassification`` (or ``distilbert``) directory; returns ``out``."""
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        BertTokenizerFast,
        DistilBertConfig,
        DistilBertForSequenceClassification,
    )

    tokenizer = tokenizer or wordpiece_tokenizer()
    id2label = dict(enumerate(labels))
    label2id = {v: k for k, v in id2label.items()}
    torch.manual_seed(seed)
    common = {"vocab_size": tokenizer.get_vocab_size(), "id2label": id2label, "label2id": label2id}
    if kind == "bert":
        model = BertForSequenceClassification(BertConfig(**common, **{**BERT_TINY, **config}))
    else:
        hf_config = DistilBertConfig(**common, **{**DISTILBERT_TINY, **config})
        model = DistilBertForSequenceClassification(hf_config)
    _redraw(model, {}, 0.2, seed)  # logits spread over a few units: no near-ties in argmax
    model.save_pretrained(out)
    BertTokenizerFast(tokenizer_object=tokenizer, model_max_length=MAX_LENGTH).save_pretrained(out)
    return Path(out)
