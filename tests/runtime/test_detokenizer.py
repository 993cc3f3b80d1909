"""Incremental detokenization: deltas add up to the text, stop strings cut across tokens."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.runtime.detokenizer import IncrementalDetokenizer


class ByteTokenizer:
    """Each token is a chunk of UTF-8 bytes, so characters can split across tokens."""

    def __init__(self):
        self.pieces: list[bytes] = []

    def encode_chunks(self, text: str, cuts: list[int]) -> list[int]:
        data = text.encode()
        bounds = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
        ids = []
        for a, b in zip(bounds, bounds[1:]):
            self.pieces.append(data[a:b])
            ids.append(len(self.pieces) - 1)
        return ids

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")

    def stream(self):
        """A step function like tokenizers' DecodeStream: None until a character completes."""
        pending = bytearray()

        def step(token_id: int) -> str | None:
            pending.extend(self.pieces[token_id])
            try:
                text = pending.decode()
            except UnicodeDecodeError:
                return None
            pending.clear()
            return text

        return step


def run(text: str, cuts: list[int], stop: tuple[str, ...], streaming: bool = False):
    tok = ByteTokenizer()
    ids = tok.encode_chunks(text, cuts)
    pieces = [tok.pieces[i] for i in ids]
    detok = IncrementalDetokenizer(tok.decode, stop, step=tok.stream() if streaming else None)
    deltas = []
    for i in ids:
        deltas.append(detok.add(i))
        if detok.stopped_on is not None:
            break
    deltas.append(detok.flush())
    return deltas, detok, pieces


def reference(pieces: list[bytes], stop: tuple[str, ...]) -> str:
    """Generation stops at the first token after which a stop string is in the text; the
    output ends before the leftmost one. Text is checked whenever it ends on a whole character.
    """
    data = b""
    for piece in pieces:
        data += piece
        try:
            text = data.decode()
        except UnicodeDecodeError:
            continue  # the last character is incomplete: wait for the next token
        hits = [i for s in stop if (i := text.find(s)) >= 0]
        if hits:
            return text[: min(hits)]
    return data.decode()


alphabet = st.sampled_from(list("ab \n") + ["é", "€", "😀"])


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet, max_size=40),
    st.lists(st.integers(0, 200), max_size=30),
    st.lists(st.text(alphabet, min_size=1, max_size=4), max_size=3),
    st.booleans(),
)
def test_deltas_add_up_to_the_text_cut_at_the_first_stop_string(text, cuts, stop, streaming):
    deltas, detok, pieces = run(text, cuts, tuple(stop), streaming)
    assert "".join(deltas) == reference(pieces, tuple(stop))
    assert all("\ufffd" not in d for d in deltas)  # never half a character
    if detok.stopped_on is not None:
        assert detok.stopped_on in stop


def test_a_stop_string_split_over_three_tokens_is_caught_and_held_back_until_decided():
    tok = ByteTokenizer()
    ids = [tok.encode_chunks(piece, [])[0] for piece in ["def f():", "\n", "\n", "cl", "ass"]]
    detok = IncrementalDetokenizer(tok.decode, stop=("\n\nclass",))
    out = [detok.add(i) for i in ids]
    assert out == ["def f():", "", "", "", ""] and detok.stopped_on == "\n\nclass"
    assert detok.output_text == "def f():" and detok.flush() == ""


def test_text_held_back_for_a_stop_string_that_never_comes_is_flushed_at_the_end():
    tok = ByteTokenizer()
    ids = [tok.encode_chunks(piece, [])[0] for piece in ["x = 1", "\n"]]
    detok = IncrementalDetokenizer(tok.decode, stop=("\n\n",))
    assert [detok.add(i) for i in ids] == ["x = 1", ""]
    assert detok.flush() == "\n" and detok.stopped_on is None
