"""Seeded random mutations of llm.c token files (header fields, truncations, odd sizes, flipped bytes, garbage)
through gpt2gen.data's readers. Each file is either read correctly -- the tokens are exactly those its bytes
hold -- or refused with a DataError that names it; never another exception, a hang or a large allocation."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from gpt2gen import data as D

N_TOKENS = 300
INT32 = (-2**31, 2**31 - 1)
ALLOC_LIMIT = 8 << 20   # bytes a reader may allocate for a 1.6 KB file (a header count trusted blindly: GBs)


def _valid_file(rng) -> bytes:
    tokens = rng.integers(0, 1000, N_TOKENS).astype("<u2")
    header = np.zeros(D.HEADER_INTS, "<i4")
    header[:3] = D.DATA_MAGIC, D.DATA_VERSION, N_TOKENS
    return header.tobytes() + tokens.tobytes()


def _set_header_int(rng, raw: bytes) -> bytes:
    """One header int (mostly magic, version or count) set to an interesting or a random value."""
    i = int(rng.choice([0, 1, 2])) if rng.random() < 0.8 else int(rng.integers(3, D.HEADER_INTS))
    n = N_TOKENS
    value = int(rng.choice([0, -1, 1, 2, n - 1, n + 1, 2 * n, n // 2, D.DATA_MAGIC, 20240326, *INT32,
                            int(rng.integers(*INT32))]))
    out = bytearray(raw)
    if 4 * i + 4 <= len(out):   # a truncated file keeps its length
        out[4 * i:4 * i + 4] = np.array([value], "<i4").tobytes()
    return bytes(out)


def _truncate(rng, raw: bytes) -> bytes:
    return raw[:int(rng.integers(0, len(raw)))]


def _odd_size(rng, raw: bytes) -> bytes:
    return raw[:-1] if rng.random() < 0.5 else raw + bytes(rng.integers(0, 256, int(rng.integers(1, 4)), np.uint8))


def _flip_bytes(rng, raw: bytes) -> bytes:
    out = bytearray(raw)
    for pos in rng.integers(0, len(out), int(rng.integers(1, 6))):
        out[pos] ^= int(rng.integers(1, 256))
    return bytes(out)


def _garbage(rng, raw: bytes) -> bytes:
    return bytes(rng.integers(0, 256, int(rng.integers(0, 3000)), np.uint8))


MUTATIONS = [_set_header_int, _truncate, _odd_size, _flip_bytes, _garbage]


def _mutate(rng) -> tuple[bytes, list[str]]:
    raw = _valid_file(rng)
    applied = []
    for _ in range(int(rng.integers(1, 3))):
        m = MUTATIONS[int(rng.integers(len(MUTATIONS)))]
        raw = m(rng, raw)
        applied.append(m.__name__)
    return raw, applied


def _expected_tokens(raw: bytes) -> np.ndarray | None:
    """What a correct reader must return for ``raw``: its tokens, or None when the file must be refused."""
    if len(raw) < D.HEADER_BYTES:
        return None
    magic, version, count = (int(v) for v in np.frombuffer(raw[:12], "<i4"))
    if magic != D.DATA_MAGIC or version != D.DATA_VERSION or count < 0 or len(raw) != D.HEADER_BYTES + 2 * count:
        return None
    return np.frombuffer(raw[D.HEADER_BYTES:], "<u2")


def _read_all(path, vocab: int, B: int, T: int, shuffle: bool) -> np.ndarray:
    """Every reader on one file; returns the tokens read_tokens gives."""
    n = D.read_header(path)
    tokens = np.array(D.read_tokens(path))
    assert n == tokens.size
    try:
        D.read_tokens(path, vocab_size=vocab)
        assert tokens.size == 0 or int(tokens.max()) < vocab
    except D.DataFormatError as e:
        assert int(tokens.max()) >= vocab and str(path) in str(e)
    try:
        loader = D.DataLoader(path, B, T, shuffle=shuffle, seed=1)
    except D.DataFormatError as e:
        assert tokens.size < B * T + 1 and str(path) in str(e)
    else:
        x, y = loader.next_batch()
        assert x.shape == (B, T) and np.array_equal(x[:, 1:], y[:, :-1])
        if not shuffle:
            assert np.array_equal(x.ravel(), tokens[:B * T])
    return tokens


@pytest.mark.parametrize("seed", range(4))
def test_mutated_token_files_are_read_correctly_or_refused_cleanly(tmp_path, seed):
    rng = np.random.default_rng([20240520, seed])
    path = tmp_path / "tokens.bin"
    outcomes = {"read": 0, "refused": 0}
    for case in range(400):
        raw, applied = _mutate(rng)
        path.write_bytes(raw)
        want = _expected_tokens(raw)
        vocab, B, T = int(rng.choice([500, 1000, 50257])), int(rng.integers(1, 5)), int(rng.integers(1, 40))
        shuffle = bool(rng.random() < 0.5)
        what = f"case {case} (seed {seed}: {', '.join(applied)}; {len(raw)} bytes)"
        tracemalloc.start()
        try:
            got = _read_all(path, vocab, B, T, shuffle)
        except D.DataError as e:
            assert want is None, f"{what}: a valid file was refused: {e}"
            assert str(path) in str(e), f"{what}: the message does not name the file: {e}"
            outcomes["refused"] += 1
        except Exception as e:   # noqa: BLE001 - anything else is the bug this test looks for
            pytest.fail(f"{what}: {type(e).__name__}: {e}")
        else:
            assert want is not None, f"{what}: an invalid file was accepted"
            assert np.array_equal(got, want), f"{what}: the tokens read differ from the file's"
            outcomes["read"] += 1
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert peak < ALLOC_LIMIT, f"{what}: the readers allocated {peak:,} bytes"
    assert outcomes["read"] and outcomes["refused"], outcomes   # both paths were exercised


def test_odd_sizes_and_special_files(tmp_path):
    """Every size around the header's, and what is not a regular file."""
    header = np.zeros(D.HEADER_INTS, "<i4")
    header[:3] = D.DATA_MAGIC, D.DATA_VERSION, 0
    path = tmp_path / "t.bin"
    for size in (0, 1, 3, 4, 1020, 1023, 1024, 1025, 1026, 1027):
        path.write_bytes((header.tobytes() + b"\1\0\2\0")[:size])
        if size == 1024:
            assert D.read_header(path) == 0 and D.read_tokens(path).size == 0
            with pytest.raises(D.DataFormatError, match="too few"):
                D.DataLoader(path, 1, 1)
            continue
        with pytest.raises(D.DataFormatError, match=str(path)):
            D.read_tokens(path)
    with pytest.raises(IsADirectoryError, match="is a directory, not a token file"):
        D.read_tokens(tmp_path)
    with pytest.raises(D.DataError, match="is not a regular file"):
        D.read_tokens("/dev/zero")    # an endless file is refused, not read
