"""The GPT-2 tokenizer (offline fallback through the openai-whisper sdist's ranks file)."""
from __future__ import annotations

import pytest

from gpt2gen import tokenizer as tk


@pytest.fixture(scope="module")
def tok():
    return tk.get_tokenizer()


def test_known_ids(tok):
    assert tok.n_vocab == 50257 and tok.eot == 50256
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262]
    assert tok.encode("<|endoftext|>", allow_special=True) == [50256]
    assert tok.encode("<|endoftext|>") != [50256]  # plain text unless allowed


@pytest.mark.parametrize("text", [
    "", "First Citizen:\nBefore we proceed any further, hear me speak.\n",
    "naïve café — “quotes” ☃ 日本語 🙂", "  spaces\t\ttabs\n\n\nnewlines ", "1234567890 3.14159",
    "don't won't they'll we've I'm you're he'd",
])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_partial_utf8(tok):
    ids = tok.encode("a🙂b")
    assert len(ids) > 3  # the emoji spans several byte-level tokens
    text_cut = tok.decode(ids[:2])  # ends inside the emoji
    assert text_cut.startswith("a") and "\ufffd" in text_cut
    dec = tok.stream_decoder()
    pieces = [dec.feed(i) for i in ids]
    assert "".join(pieces) + dec.flush() == "a🙂b"
    assert "\ufffd" not in "".join(pieces)
    dec = tok.stream_decoder()
    for i in ids[:2]:
        dec.feed(i)
    assert dec.flush() == "\ufffd"


def test_fallback_ranks_file_gives_the_same_encoding(tok):
    # The offline fallback (gpt2.tiktoken from the openai-whisper sdist) must be the GPT-2 vocabulary,
    # whichever way this session's tokenizer was built: fetch the file if tiktoken supplied it instead.
    path = tk.ranks_path()
    if not path.exists():
        tk._fetch_ranks_from_pypi(path)
    assert tk._sha256(path) == tk.RANKS_SHA256
    enc = tk._encoding_from_ranks(path)
    text = "To be, or not to be, that is the question."
    assert enc.encode_ordinary(text) == tok.encode(text)
