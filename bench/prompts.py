"""Prompts from held-out text: windows of exactly ``input_len`` ids under the model's tokenizer.

The text is the standard library's held-out files (read offline, split by path hash as the
decoder LM splits them), so no served model trained on it. A window is kept only if decoding
it and encoding the text again gives the same ids: then the gRPC runner, which sends text, and
the baselines, which take ids, run exactly the same prompts. Image models get seeded digits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import EngineError

HELDOUT_FRACTION = 0.1  # decoder-lm's default, for exports whose manifest lacks the config
MAX_TRIES_PER_PROMPT = 50  # windows straddling a special token or a split character are redrawn


class PromptError(EngineError):
    """No prompts of the asked length could be drawn (corpus too short, length too large)."""


@dataclass(frozen=True)
class PromptSet:
    """``count`` prompts as token ids, and the text each decodes to (empty for digits)."""

    token_ids: list[list[int]]
    texts: list[str]
    source: str  # where the prompts came from, for the report

    def __len__(self) -> int:
        return len(self.token_ids)


def load_tokenizer(version_path: Path, serving: dict[str, Any]):
    """The model version's own tokenizer (``serving.tokenizer``, default tokenizer.json)."""
    from tokenizers import Tokenizer

    path = Path(version_path) / serving.get("tokenizer", "tokenizer.json")
    if not path.exists():
        raise PromptError(f"{version_path} has no tokenizer ({path.name}) to build prompts with")
    return Tokenizer.from_file(str(path))


def heldout_stream(tokenizer, fraction: float = HELDOUT_FRACTION) -> np.ndarray:
    """The held-out stdlib files as one token stream under ``tokenizer`` (cached on disk)."""
    from plugins.stdlib_text import encode_files, split_files, stdlib_files

    _, heldout = split_files(stdlib_files(), fraction)
    return encode_files(tokenizer, heldout, "heldout")


def text_windows(
    tokenizer, lengths: list[int], seed: int = 0, fraction: float = HELDOUT_FRACTION
) -> tuple[list[list[int]], list[str], str]:
    """Held-out windows of the given lengths (ids, texts, source) that re-tokenize unchanged.

    ``fraction`` is the held-out share the model was trained with (its checkpoint config).
    """
    if not lengths:
        return [], [], ""
    if min(lengths) < 1:
        raise PromptError(f"prompt lengths must be at least 1, got {min(lengths)}")
    stream = heldout_stream(tokenizer, fraction)
    if stream.size <= max(lengths):
        raise PromptError(
            f"the held-out text has {stream.size} tokens; a prompt of {max(lengths)} is asked"
        )
    special = {tokenizer.token_to_id(t.content) for t in _special_tokens(tokenizer)}
    rng = np.random.default_rng(seed)
    ids_out: list[list[int]] = []
    texts: list[str] = []
    for length in lengths:
        for start in rng.integers(0, stream.size - length, MAX_TRIES_PER_PROMPT):
            window = stream[start : start + length].astype(np.int64).tolist()
            if special.intersection(window):
                continue
            text = tokenizer.decode(window)
            if tokenizer.encode(text).ids != window:
                continue
            ids_out.append(window)
            texts.append(text)
            break
        else:
            raise PromptError(
                f"found no held-out window of {length} tokens that re-tokenizes exactly in "
                f"{MAX_TRIES_PER_PROMPT} tries; try shorter prompts"
            )
    return ids_out, texts, f"stdlib held-out files ({fraction:.0%} split)"


def text_prompts(
    tokenizer, input_len: int, count: int, seed: int = 0, fraction: float = HELDOUT_FRACTION
) -> PromptSet:
    """``count`` held-out windows of exactly ``input_len`` ids (see :func:`text_windows`)."""
    if input_len < 1:
        raise PromptError(f"--input-len must be at least 1, got {input_len}")
    ids, texts, source = text_windows(tokenizer, [input_len] * count, seed, fraction)
    return PromptSet(ids, texts, source)


def digit_prompts(num_classes: int, count: int, seed: int = 0) -> PromptSet:
    """``count`` requests of one seeded random digit each, for image models."""
    digits = np.random.default_rng(seed).integers(0, num_classes, count)
    return PromptSet([[int(d)] for d in digits], [], f"uniform digits 0..{num_classes - 1}")


def _special_tokens(tokenizer) -> list[Any]:
    """The tokenizer's added special tokens (end-of-text, pad, ...)."""
    decoder = tokenizer.get_added_tokens_decoder()
    return [tok for tok in decoder.values() if tok.special]
