"""The text-classifier's task (which stdlib package is a docstring from?) for a BERT tokenizer.

Docstrings, labels and the split by source file are the text-classifier's own
(``plugins.text_classifier.data``); only the tokenization differs: the BERT tokenizer's
post-processor adds [CLS] ... [SEP] and truncates around them, through the very functions the
runtime serves with (``engine.runtime.batched_engines``), so training and serving see the same
ids. Without a tokenizer to start from (training from scratch), a lower-cased WordPiece
tokenizer is trained on the stdlib's train files and cached.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.atomic import write_bytes
from engine.paths import cache_dir
from engine.runtime.batched_engines import encode_texts, prepare_tokenizer
from plugins.stdlib_text import read_text, split_files, stdlib_files
from plugins.text_classifier import data as docdata

TOKENIZER_FILE = "tokenizer.json"
LABELS_FILE = "labels.json"
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4: BERT's convention


@dataclass
class Encoded:
    """Token ids right-padded to the longest row, the mask, class ids and the texts."""

    ids: np.ndarray  # (N, T) int64
    mask: np.ndarray  # (N, T) int64
    labels: np.ndarray  # (N,) int64
    texts: list[str]
    files: list[str]

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per row."""
        return self.mask.sum(axis=1)


def wordpiece_tokenizer(vocab_size: int, max_length: int):
    """A lower-cased BERT WordPiece tokenizer trained on the stdlib's train files (cached)."""
    from tokenizers import Tokenizer
    from tokenizers.implementations import BertWordPieceTokenizer

    files = split_files(stdlib_files())[0]
    key = hashlib.sha256(f"{vocab_size}|{[f.rel for f in files]}".encode()).hexdigest()[:16]
    path = cache_dir() / f"wordpiece-{vocab_size}-{key}.json"
    if not path.exists():
        wp = BertWordPieceTokenizer(lowercase=True)
        texts = (read_text(f) for f in files)
        wp.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=list(SPECIAL))
        write_bytes(path, wp.to_str().encode())
    tokenizer = Tokenizer.from_file(str(path))
    prepare_tokenizer(tokenizer, max_length, None)
    return tokenizer


def encode(tokenizer, texts: list[str], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) as the runtime makes them: [CLS] ... [SEP], truncated, right-padded."""
    if not texts:
        return np.zeros((0, 1), np.int64), np.zeros((0, 1), np.int64)
    out = encode_texts(tokenizer, texts, pad_id)
    return out["input_ids"], out["attention_mask"]


def labeled_splits(
    tokenizer, labels: list[str], min_words: int, fraction: float, pad_id: int
) -> tuple[Encoded, Encoded]:
    """The text-classifier's (train, held-out) docstrings under ``tokenizer``."""
    docs = docdata.all_docstrings(min_words)
    held = docdata.heldout_files(docs, labels, fraction)
    index = {name: i for i, name in enumerate(labels)}
    chosen = [d for d in docs if d.label in index]

    def make(part: list) -> Encoded:
        texts = [d.text for d in part]
        ids, mask = encode(tokenizer, texts, pad_id)
        y = np.asarray([index[d.label] for d in part], dtype=np.int64)
        return Encoded(ids, mask, y, texts, sorted({d.rel for d in part}))

    train = make([d for d in chosen if d.rel not in held])
    heldout = make([d for d in chosen if d.rel in held])
    return train, heldout


def task_labels(min_words: int, num_labels: int, saved: Path | None) -> list[str]:
    """The task's packages: ``saved`` labels when they are such packages (a resumed run)."""
    import json

    docs = docdata.all_docstrings(min_words)
    if saved is not None and saved.is_file():
        names = json.loads(saved.read_text())
        present = {d.label for d in docs}
        if len(names) == num_labels and set(names) <= present:
            return list(names)
    return docdata.choose_labels(docs, num_labels)
