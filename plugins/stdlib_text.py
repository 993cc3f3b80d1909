"""The Python standard library's own source as an offline text corpus, plus its BPE tokenizer.

Shared by the decoder LM (next-token prediction) and the text classifier (MLM pretraining).
The split is by file and keyed on a hash of the relative path, so it is the same on every
machine with the same Python, and no file contributes to both splits.
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.atomic import write_bytes
from engine.paths import cache_dir

EOT = "<|endoftext|>"
PAD = "<|pad|>"
MASK = "<|mask|>"
CLS = "<|cls|>"
SPECIAL_TOKENS = (EOT, PAD, MASK, CLS)  # ids 0..3 in this order
_EXCLUDED_PARTS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "turtledemo"}


@dataclass(frozen=True)
class SourceFile:
    """One stdlib source file: its path relative to the stdlib root and its absolute path."""

    rel: str
    path: Path

    @property
    def top_module(self) -> str:
        """The top-level module or package the file belongs to (``email/utils.py`` -> ``email``)."""
        return self.rel.split("/")[0].removesuffix(".py")


def stdlib_root() -> Path:
    """Return the running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[SourceFile]:
    """List the stdlib's ``.py`` files, tests and third-party packages excluded, sorted by path."""
    root = stdlib_root()
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if _EXCLUDED_PARTS.intersection(rel.parts) or rel.parts[0].startswith("test"):
            continue
        out.append(SourceFile(rel.as_posix(), path))
    return sorted(out, key=lambda f: f.rel)


def is_heldout(rel: str, fraction: float) -> bool:
    """Deterministically assign a file to the held-out split by hashing its relative path."""
    h = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big")
    return (h % 10_000) < fraction * 10_000


def split_files(files: list[SourceFile], fraction: float = 0.1):
    """Split files into (train, heldout) by path hash."""
    train = [f for f in files if not is_heldout(f.rel, fraction)]
    heldout = [f for f in files if is_heldout(f.rel, fraction)]
    return train, heldout


def read_text(f: SourceFile) -> str:
    """Read a source file as UTF-8, replacing the rare undecodable byte."""
    return f.path.read_text(encoding="utf-8", errors="replace")


def _fingerprint(files: list[SourceFile], *extra: object) -> str:
    h = hashlib.sha256(f"{sys.version_info[:2]}|{extra}".encode())
    for f in files:
        h.update(f"{f.rel}:{f.path.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def train_tokenizer(files: list[SourceFile], vocab_size: int = 8192):
    """Train (or load from cache) a byte-level BPE tokenizer on ``files``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = cache_dir() / f"bpe-{vocab_size}-{_fingerprint(files, vocab_size)}.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((read_text(f) for f in files), trainer=trainer)
    write_bytes(path, tok.to_str().encode())
    return tok


def encode_files(tokenizer, files: list[SourceFile], tag: str) -> np.ndarray:
    """Encode files into one uint16 token stream, files separated by end-of-text (cached)."""
    key = _fingerprint(
        files,
        tag,
        tokenizer.get_vocab_size(),
        hashlib.sha256(tokenizer.to_str().encode()).hexdigest(),
    )
    path = cache_dir() / f"tokens-{tag}-{key}.npy"
    if path.exists():
        return np.load(path)
    eot = tokenizer.token_to_id(EOT)
    encodings = tokenizer.encode_batch([read_text(f) for f in files])
    parts = []
    for enc in encodings:
        parts.append(np.asarray(enc.ids, dtype=np.uint16))
        parts.append(np.asarray([eot], dtype=np.uint16))
    arr = np.concatenate(parts) if parts else np.zeros(0, np.uint16)
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    write_bytes(path, buf.getvalue())
    return arr
