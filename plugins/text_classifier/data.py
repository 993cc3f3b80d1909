"""Labeled stdlib docstrings (which package is this from?) plus the unlabeled MLM token stream.

The labeled set: every module/class/function docstring of the stdlib, labeled by the top-level
package of its file (``email/utils.py`` -> ``email``), restricted to the ``num_classes``
multi-file packages with the most docstrings. The held-out split is by *source file*, chosen
per class so every class appears in both splits and no file contributes to both.

The unlabeled set: the train files of :func:`plugins.stdlib_text.split_files`, minus every file
of the classifier's held-out split, as one token stream for masked-language-model pretraining.
"""

from __future__ import annotations

import ast
import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from plugins.stdlib_text import CLS, PAD, SourceFile, read_text, stdlib_files

MIN_FILES = 3  # a package needs a few files so that both splits get some of them


@dataclass(frozen=True)
class Docstring:
    """One docstring with the file it came from and its label (the file's top-level package)."""

    text: str
    rel: str
    label: str


@dataclass
class LabeledSplit:
    """Token ids right-padded to ``max_len`` (``[CLS]`` first), their lengths and class ids."""

    ids: np.ndarray  # (N, max_len) int64
    lengths: np.ndarray  # (N,) int64
    labels: np.ndarray  # (N,) int64
    texts: list[str]  # the untruncated docstrings (for the TF-IDF baseline and inspection)
    files: list[str]  # distinct source files in this split


def _file_docstrings(f: SourceFile, min_words: int) -> list[str]:
    try:
        tree = ast.parse(read_text(f))
    except SyntaxError:  # lib2to3 fixtures and the like; not our problem
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = (ast.get_docstring(n) for n in ast.walk(tree) if isinstance(n, kinds))
    return [d.strip() for d in docs if d and len(d.split()) >= min_words]


@lru_cache(maxsize=4)
def all_docstrings(min_words: int = 3) -> tuple[Docstring, ...]:
    """Every stdlib docstring of at least ``min_words`` words, exact duplicates dropped.

    Duplicates (copied boilerplate such as the codec modules' headers) are dropped after their
    first occurrence in path order so the same text can never be in both splits.
    """
    seen: set[str] = set()
    out = []
    for f in stdlib_files():
        for text in _file_docstrings(f, min_words):
            if text not in seen:
                seen.add(text)
                out.append(Docstring(text, f.rel, f.top_module))
    return tuple(out)


def choose_labels(docs: tuple[Docstring, ...], num_classes: int) -> list[str]:
    """The ``num_classes`` packages (of >= MIN_FILES files) with the most docstrings, by name."""
    counts = Counter(d.label for d in docs)
    files = defaultdict(set)
    for d in docs:
        files[d.label].add(d.rel)
    eligible = [(-n, name) for name, n in counts.items() if len(files[name]) >= MIN_FILES]
    if len(eligible) < num_classes:
        raise ValueError(f"only {len(eligible)} stdlib packages qualify, asked for {num_classes}")
    return sorted(name for _, name in sorted(eligible)[:num_classes])


def _hash(rel: str) -> int:
    return int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big")


def heldout_files(docs: tuple[Docstring, ...], labels: list[str], fraction: float) -> set[str]:
    """Pick held-out files per class: about ``fraction`` of its docstrings, at least one file.

    Files are visited in path-hash order and held out while the class's held-out docstrings stay
    within ``fraction``; a class whose files are all too big holds out its smallest one. Every
    class thus keeps files in both splits (packages have >= MIN_FILES files).
    """
    per_file = Counter(d.rel for d in docs)
    by_label: dict[str, list[str]] = defaultdict(list)
    for rel in per_file:
        by_label[rel.split("/")[0]].append(rel)
    out: set[str] = set()
    for label in labels:
        rels = sorted(by_label[label], key=_hash)
        target = fraction * sum(per_file[r] for r in rels)
        held, taken = 0, []
        for rel in rels:
            if held + per_file[rel] <= target:
                taken.append(rel)
                held += per_file[rel]
        if not taken:
            taken = [min(rels, key=lambda r: (per_file[r], _hash(r)))]
        out.update(taken)
    return out


def encode_texts(tokenizer, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize to ``[CLS] + ids`` truncated to ``max_len``, right-padded; return (ids, lengths)."""
    cls_id, pad_id = tokenizer.token_to_id(CLS), tokenizer.token_to_id(PAD)
    ids = np.full((len(texts), max_len), pad_id, dtype=np.int64)
    lengths = np.zeros(len(texts), dtype=np.int64)
    for i, enc in enumerate(tokenizer.encode_batch(texts) if texts else []):
        row = [cls_id, *enc.ids[: max_len - 1]]
        ids[i, : len(row)] = row
        lengths[i] = len(row)
    return ids, lengths


def labeled_splits(
    tokenizer, labels: list[str], min_words: int, fraction: float, max_len: int
) -> tuple[LabeledSplit, LabeledSplit, set[str]]:
    """Build the (train, held-out) labeled splits; also return the held-out file set."""
    docs = all_docstrings(min_words)
    held = heldout_files(docs, labels, fraction)
    index = {name: i for i, name in enumerate(labels)}
    chosen = [d for d in docs if d.label in index]

    def make(part: list[Docstring]) -> LabeledSplit:
        ids, lengths = encode_texts(tokenizer, [d.text for d in part], max_len)
        y = np.asarray([index[d.label] for d in part], dtype=np.int64)
        return LabeledSplit(ids, lengths, y, [d.text for d in part], sorted({d.rel for d in part}))

    train = make([d for d in chosen if d.rel not in held])
    heldout = make([d for d in chosen if d.rel in held])
    return train, heldout, held
