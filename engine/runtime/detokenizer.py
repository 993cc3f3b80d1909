"""Incremental detokenization with stop strings that may span token boundaries.

Text is decoded from a short window of recent tokens (the prefix/read offsets of Hugging
Face's TGI and vLLM), so each step costs O(1) in the output length, and a window that ends in
an incomplete UTF-8 character (U+FFFD) waits for the next token. Text that could be the start
of a stop string is held back until the next tokens decide it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turn one request's output tokens into text deltas, cutting at the first stop string.

    ``decode`` maps token ids to text (e.g. ``tokenizers.Tokenizer.decode``). The matched stop
    string is not part of the output, as in OpenAI's API.
    """

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        stop: Sequence[str] = (),
        context_ids: Sequence[int] = (),
    ):
        self._decode = decode
        self.stop = tuple(stop)
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        # A few prompt tokens give the first output token its context (e.g. a leading space).
        self._ids: list[int] = list(context_ids[-4:])
        self._prefix = 0
        self._read = len(self._ids)
        self.text = ""  # all decoded output text (before any stop cut)
        self._emitted = 0  # characters of ``text`` handed out
        self.stopped_on: str | None = None

    def push(self, token_id: int) -> tuple[list[int], list[int]] | None:
        """Add one token; return the two id windows to decode (None once stopped).

        Callers decode the windows (for many requests at once with ``decode_batch``) and pass
        the texts to :meth:`accept`; :meth:`add` does both for one request.
        """
        if self.stopped_on is not None:
            return None
        self._ids.append(token_id)
        return self._ids[self._prefix : self._read], self._ids[self._prefix :]

    def accept(self, prefix_text: str, full_text: str) -> str:
        """Take the decoded windows of the last :meth:`push`; return the text safe to emit."""
        if len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT):
            return ""  # no new character yet, or a multi-byte character is incomplete
        start = max(len(self.text) - self._hold, 0)
        self.text += full_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        return self._release(start)

    def add(self, token_id: int) -> str:
        """Add one token; return the text that is now safe to emit (possibly empty)."""
        windows = self.push(token_id)
        if windows is None:
            return ""
        return self.accept(self._decode(windows[0]), self._decode(windows[1]))

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
        if len(self._ids) > self._read:  # tokens still waiting for a complete character
            prefix_text = self._decode(self._ids[self._prefix : self._read])
            start = max(len(self.text) - self._hold, 0)
            self.text += self._decode(self._ids[self._prefix :])[len(prefix_text) :]
            self._read = len(self._ids)
            delta = self._release(start)
            if self.stopped_on is not None:
                return delta
            return delta + self._emit(len(self.text))
        return self._emit(len(self.text))

    @property
    def output_text(self) -> str:
        """The text emitted so far."""
        return self.text[: self._emitted]


def detokenize_batch(
    detokenizers: Sequence[IncrementalDetokenizer],
    token_ids: Sequence[int],
    decode: Callable[[list[int]], str],
) -> list[str]:
    """Add one token to each detokenizer; return the text deltas.

    One ``decode`` call per window: ``tokenizers``' ``decode_batch`` hands small batches to a
    thread pool, which cost ~10 ms a step on a busy 2-core machine against ~3 us a window here.
    """
    deltas = []
    for d, t in zip(detokenizers, token_ids):
        windows = d.push(t)
        deltas.append("" if windows is None else d.accept(decode(windows[0]), decode(windows[1])))
    return deltas


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
