"""Token streams for the decoder LM: stdlib source split by file, windows, unigram baseline."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from engine.errors import EngineError
from plugins.stdlib_text import encode_files, split_files, stdlib_files, train_tokenizer

TOKENIZER_FILE = "tokenizer.json"


class TokenizerMismatchError(EngineError):
    """Raised when a reused tokenizer has more tokens than the model's vocabulary."""


def load_tokenizer(path: Path):
    """Load a saved ``tokenizers`` tokenizer from ``path``."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def load_streams(
    vocab_size: int, heldout_fraction: float, artifacts_dir: Path | None
) -> tuple[np.ndarray, np.ndarray, object, dict]:
    """Return (train tokens, held-out tokens, tokenizer, info) as uint16 streams.

    The tokenizer is trained on the train files only (cached), or reused from
    ``artifacts_dir/tokenizer.json`` when resuming so token ids never change under a model.
    """
    train_files, heldout_files = split_files(stdlib_files(), heldout_fraction)
    saved = Path(artifacts_dir) / TOKENIZER_FILE if artifacts_dir else None
    if saved is not None and saved.exists():
        tokenizer = load_tokenizer(saved)
    else:
        tokenizer = train_tokenizer(train_files, vocab_size)
    if tokenizer.get_vocab_size() > vocab_size:
        raise TokenizerMismatchError(
            f"tokenizer has {tokenizer.get_vocab_size()} tokens but vocab_size={vocab_size}"
        )
    train = encode_files(tokenizer, train_files, "train")
    heldout = encode_files(tokenizer, heldout_files, "heldout")
    info = {
        "train_files": len(train_files),
        "heldout_files": len(heldout_files),
        "train_tokens": int(train.size),
        "heldout_tokens": int(heldout.size),
        "tokenizer_vocab": tokenizer.get_vocab_size(),
    }
    return train, heldout, tokenizer, info


def heldout_stream(tokenizer, heldout_fraction: float) -> np.ndarray:
    """The held-out stdlib files alone as one uint16 token stream (cached; no train files read)."""
    heldout_files = split_files(stdlib_files(), heldout_fraction)[1]
    return encode_files(tokenizer, heldout_files, "heldout")


def random_windows(
    tokens: np.ndarray, length: int, batch: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """Yield (batch, length) int64 windows starting at uniformly random offsets, forever."""
    offsets = np.arange(length)
    high = tokens.size - length + 1
    while True:
        starts = rng.integers(0, high, size=batch)
        yield tokens[starts[:, None] + offsets].astype(np.int64)


def fixed_windows(tokens: np.ndarray, length: int, count: int) -> np.ndarray:
    """Return (count, length) int64 windows at evenly spaced offsets (the same every call)."""
    starts = np.linspace(0, tokens.size - length, num=count).astype(np.int64)
    return tokens[starts[:, None] + np.arange(length)].astype(np.int64)


def unigram_ce(train: np.ndarray, targets: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of ``targets`` under an add-one unigram fitted on ``train``."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts) - np.log(counts.sum())
    return float(-log_p[targets.reshape(-1)].mean())
