"""GPT-2 byte-level BPE tokenizer (through tiktoken), usable offline.

``tiktoken.get_encoding("gpt2")`` downloads its vocabulary from OpenAI's blob store. Where that
host is unreachable but the Python package index is not, the same ranks are taken from the
``gpt2.tiktoken`` file shipped in the ``openai-whisper`` source distribution on PyPI (byte-for-byte
the r50k/GPT-2 ranks; its SHA-256 is checked) and cached under ``cache_root()/tokenizer/``.

Public API::

    tok = get_tokenizer()          # process-wide, loaded once
    ids = tok.encode("Hello world")              # [15496, 995]
    text = tok.decode(ids)                       # invalid / partial UTF-8 -> U+FFFD
    dec = tok.stream_decoder(); dec.feed(id)...  # incremental decoding for printing samples
"""
from __future__ import annotations

import codecs
import functools
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
from pathlib import Path
from typing import Iterable, Sequence

from .cache import cache_root, file_lock

EOT_TOKEN = 50256
EOT_TEXT = "<|endoftext|>"
N_VOCAB = 50257

# The GPT-2 pre-tokenisation regex in the form tiktoken uses (equivalent to the original release's).
GPT2_PAT_STR = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
# SHA-256 of the GPT-2 ranks file (identical to tiktoken's r50k_base.tiktoken).
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
WHISPER_SDIST = "openai-whisper==20250625"
WHISPER_MEMBER = "whisper/assets/gpt2.tiktoken"
TIKTOKEN_TIMEOUT_S = 15.0


class TokenizerError(RuntimeError):
    """The GPT-2 vocabulary could not be obtained."""


def ranks_path() -> Path:
    """Where the fallback ranks file is cached."""
    return cache_root() / "tokenizer" / "gpt2.tiktoken"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fetch_ranks_from_pypi(dest: Path) -> None:
    """Download the openai-whisper sdist with pip and extract its gpt2.tiktoken to ``dest``."""
    with tempfile.TemporaryDirectory(prefix="gpt2gen-tok-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--no-binary", ":all:", WHISPER_SDIST, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sdists = sorted(Path(tmp).glob("*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            raise TokenizerError(
                "could not obtain the GPT-2 vocabulary: tiktoken's download failed and "
                f"`pip download {WHISPER_SDIST}` failed too:\n{proc.stderr.strip()[-2000:]}")
        with tarfile.open(sdists[0], "r:gz") as tar:
            member = next((m for m in tar.getmembers()
                           if m.isfile() and m.name.endswith("/" + WHISPER_MEMBER)), None)
            if member is None:
                raise TokenizerError(f"{sdists[0].name} has no {WHISPER_MEMBER}")
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
    if hashlib.sha256(data).hexdigest() != RANKS_SHA256:
        raise TokenizerError(f"{WHISPER_MEMBER} from {WHISPER_SDIST} has an unexpected SHA-256")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    tmp_path.write_bytes(data)
    os.replace(tmp_path, dest)


def _encoding_from_ranks(path: Path):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(path))
    if len(ranks) != EOT_TOKEN:
        raise TokenizerError(f"{path}: expected {EOT_TOKEN} ranks, found {len(ranks)}")
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks,
                             special_tokens={EOT_TEXT: EOT_TOKEN}, explicit_n_vocab=N_VOCAB)


def _tiktoken_gpt2(timeout: float):
    """tiktoken's own gpt2 encoding, or None if it cannot be had within ``timeout`` seconds."""
    import tiktoken

    result: dict = {}

    def work():
        try:
            result["enc"] = tiktoken.get_encoding("gpt2")
        except Exception as e:  # network errors come in many types
            result["err"] = e

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(timeout)
    return result.get("enc")


@functools.lru_cache(maxsize=1)
def get_encoding():
    """The GPT-2 ``tiktoken.Encoding`` (cached ranks, then tiktoken's download, then PyPI)."""
    path = ranks_path()
    if path.is_file() and _sha256(path) == RANKS_SHA256:
        return _encoding_from_ranks(path)
    if os.environ.get("GPT2GEN_TOKENIZER_NO_TIKTOKEN") != "1":
        enc = _tiktoken_gpt2(TIKTOKEN_TIMEOUT_S)
        if enc is not None:
            return enc
    with file_lock(path.with_name("gpt2.tiktoken.lock")):
        if not (path.is_file() and _sha256(path) == RANKS_SHA256):
            print(f"gpt2gen: tiktoken could not download the GPT-2 vocabulary; taking it from the "
                  f"{WHISPER_SDIST} sdist on PyPI (cached in {path})", file=sys.stderr)
            _fetch_ranks_from_pypi(path)
    return _encoding_from_ranks(path)


class StreamDecoder:
    """Turns a stream of token ids into text, holding back incomplete UTF-8 sequences.

    GPT-2 tokens are byte sequences; one character may span several tokens. ``feed`` returns the
    text completed so far; ``flush`` returns what is left (an unfinished sequence becomes U+FFFD).
    """

    def __init__(self, encoding):
        self._enc = encoding
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        return self._dec.decode(self._enc.decode_single_token_bytes(int(token)))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


class Tokenizer:
    """A thin wrapper over the GPT-2 encoding with the conventions the trainer needs."""

    def __init__(self, encoding=None):
        self.encoding = encoding if encoding is not None else get_encoding()
        self.eot = EOT_TOKEN
        self.n_vocab = self.encoding.n_vocab

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids of ``text``; ``<|endoftext|>`` in the text is a special token only if allowed."""
        if allow_special:
            return self.encoding.encode(text, allowed_special={EOT_TEXT})
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(list(texts))

    def decode_bytes(self, tokens: Iterable[int]) -> bytes:
        return self.encoding.decode_bytes([int(t) for t in tokens])

    def decode(self, tokens: Iterable[int]) -> str:
        """Text of ``tokens``; byte sequences that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(tokens).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self.encoding)


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    """The process-wide GPT-2 tokenizer."""
    return Tokenizer()
