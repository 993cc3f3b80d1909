"""Incremental detokenization with stop strings that may span token boundaries.

Two ways to turn one more token into text, both O(1) in the output length:

* a ``step`` function, e.g. ``tokenizers.decoders.DecodeStream.step`` (Rust; it buffers an
  incomplete UTF-8 character itself and returns None until it completes); or
* ``decode`` over a short window of recent tokens (the prefix/read offsets of Hugging Face's
  TGI and vLLM), where a window ending in U+FFFD (an incomplete character) waits for more.

Text that could be the start of a stop string is held back until the next tokens decide it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

_REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 4  # prompt tokens decoded with the first output token (e.g. a leading space)


class IncrementalDetokenizer:
    """Turn one request's output tokens into text deltas, cutting at the first stop string.

    ``decode`` maps token ids to text (e.g. ``tokenizers.Tokenizer.decode``); ``step``, when
    given, maps one new token id to its new text (or None) and is used instead. The matched
    stop string is not part of the output, as in OpenAI's API.
    """

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        stop: Sequence[str] = (),
        context_ids: Sequence[int] = (),
        step: Callable[[int], str | None] | None = None,
    ):
        self._decode = decode
        self._step = step
        self.stop = tuple(stop)
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self._ids: list[int] = list(context_ids[-CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)
        self.text = ""  # all decoded output text (before any stop cut)
        self._emitted = 0  # characters of ``text`` handed out
        self.stopped_on: str | None = None

    def add(self, token_id: int) -> str:
        """Add one token; return the text that is now safe to emit (possibly empty)."""
        if self.stopped_on is not None:
            return ""
        if self._step is not None:
            piece = self._step(token_id)
            if not piece:
                return ""
            if not self.stop:  # nothing to hold back: the piece is the delta (once per token)
                self.text += piece
                self._emitted = len(self.text)
                return piece
            return self._append(piece)
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        if len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT):
            return ""  # no new character yet, or a multi-byte character is incomplete
        self._prefix, self._read = self._read, len(self._ids)
        return self._append(full_text[len(prefix_text) :])

    def _append(self, piece: str) -> str:
        start = max(len(self.text) - self._hold, 0)
        self.text += piece
        return self._release(start)

    def _release(self, search_from: int) -> str:
        text = self.text
        if self.stop:
            hits = [(i, s) for s in self.stop if (i := text.find(s, search_from)) >= 0]
            if hits:
                cut, self.stopped_on = min(hits)
                return self._emit(cut)
            safe = len(text) - _held_back(text, self.stop)
        else:
            safe = len(text)
        return self._emit(safe)

    def _emit(self, upto: int) -> str:
        upto = max(upto, self._emitted)
        delta = self.text[self._emitted : upto]
        self._emitted = upto
        return delta

    def flush(self) -> str:
        """The held-back text, when the request ends for another reason than a stop string."""
        if self.stopped_on is not None:
            return ""
        if self._step is None and len(self._ids) > self._read:  # an incomplete last character
            prefix_text = self._decode(self._ids[self._prefix : self._read])
            self._read = len(self._ids)
            delta = self._append(self._decode(self._ids[self._prefix :])[len(prefix_text) :])
            if self.stopped_on is not None:
                return delta
            return delta + self._emit(len(self.text))
        return self._emit(len(self.text))

    @property
    def output_text(self) -> str:
        """The text emitted so far."""
        return self.text[: self._emitted]

    @property
    def emitted(self) -> int:
        """Characters of ``text`` handed out so far (``text`` only ever grows)."""
        return self._emitted


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
