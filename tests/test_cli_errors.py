"""Every command-line entry point reports a user error as one `gpt2gen: error: ...` message with exit
status 2 (130 for Ctrl-C), never a traceback; a bug (an untyped exception) still shows its traceback."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from gpt2gen import cli
from gpt2gen import data as D


def _user_error(capsys, argv, *needles):
    """Run ``gpt2gen ARGV`` in-process: exit status 2, one error message holding every needle, no traceback."""
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("gpt2gen: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture
def files(tmp_path):
    """A directory, a non-UTF-8 file, a plain text file, a token file and a training log."""
    d = tmp_path / "adir"
    d.mkdir()
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"name: x\n\xff\xfe\x00junk")
    text = tmp_path / "notes.txt"
    text.write_text("my notes\n")
    tokens = D.write_tokens(tmp_path / "t.bin", np.arange(100) % 50)
    log = tmp_path / "run.jsonl"
    log.write_text(json.dumps({"type": "train", "step": 1, "loss": 3.0}) + "\n")
    return {"dir": d, "binary": binary, "text": text, "tokens": tokens, "log": log}


# ------------------------------------------------------------------------------ the subcommands

def test_model_file_that_is_a_directory_or_not_utf8(capsys, files):
    for cmd in ("build", "layout"):
        _user_error(capsys, [cmd, "--model", str(files["dir"])], str(files["dir"]))
        _user_error(capsys, [cmd, "--model", str(files["binary"])], "UTF-8")


def test_build_out_that_is_an_existing_file_is_refused_before_compiling(capsys, files, monkeypatch):
    monkeypatch.setattr(cli, "compile_model", lambda *a, **k: pytest.fail("compiled despite a bad --out"))
    _user_error(capsys, ["build", "--out", str(files["text"])],
                f"--out {files['text']}: is an existing file, not a directory", "hint:")
    assert files["text"].read_text() == "my notes\n"


def test_set_values_are_checked_when_parsed(capsys):
    for bad in ("L", "=3", "L=x", "L=nan", "C=inf"):
        with pytest.raises(SystemExit) as e:
            cli.main(["layout", "--set", bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "argument --set" in err and "Traceback" not in err


def test_prepro_errors(capsys, files, tmp_path):
    _user_error(capsys, ["prepro", "text", str(files["dir"])], f"{files['dir']} is a directory, not a text file")
    _user_error(capsys, ["prepro", "text", str(tmp_path / "missing.txt")], "a text file not found")
    # an output that is a file, and an existing output that is not a token file: refused, left as it was
    _user_error(capsys, ["prepro", "text", str(files["text"]), "--out-dir", str(files["text"])],
                f"--out-dir {files['text']}: is an existing file")
    victim = tmp_path / "o" / "notes_val.bin"
    victim.parent.mkdir()
    victim.write_text("not tokens")
    _user_error(capsys, ["prepro", "text", str(files["text"]), "--out-dir", str(victim.parent)],
                f"{victim}: exists and is not an llm.c token file")
    assert victim.read_text() == "not tokens"
    _user_error(capsys, ["prepro", "tinyshakespeare", "--data-dir", str(files["text"])],
                "--data-dir", "is a file, so no directory can be created")


def test_plot_errors(capsys, files, tmp_path):
    _user_error(capsys, ["plot", str(files["dir"])], "is a directory, not a training log")
    _user_error(capsys, ["plot", str(tmp_path / "nope.jsonl")], "a training log not found")
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"type": "config"}\n{"type": "sample", "text": "caf\xe9"}\n')
    _user_error(capsys, ["plot", str(latin1)], f"{latin1}:2: not UTF-8 text")
    for n, line in enumerate(["[" * 100_000, "3", '{"type": "train", "step": "x", "loss": 1}',
                              '{"type": "val", "step": 1, "loss": [1]}',
                              '{"type": "train", "step": 1, "loss": 1' + "0" * 400 + '}',   # past a float
                              '{"type": "train", "step": 1' + "0" * 30 + ', "loss": 1}'], 1):   # past int64
        bad = tmp_path / f"bad{n}.jsonl"
        bad.write_text('{"type": "config"}\n' + line + "\n")
        _user_error(capsys, ["plot", str(bad)], f"{bad}:2: ")
    _user_error(capsys, ["plot", str(files["log"]), "-o", str(files["dir"])],
                f"--output {files['dir']}: is an existing directory")
    _user_error(capsys, ["plot", str(files["log"]), "-o", str(files["text"])], "exists and is not a PNG image")
    _user_error(capsys, ["plot", str(files["log"]), "-o", str(files["log"])], "is also the LOG input")
    assert files["text"].read_text() == "my notes\n" and files["log"].read_text().startswith('{"type"')
    for smooth in ("1", "-0.5", "nan"):
        with pytest.raises(SystemExit) as e:
            cli.main(["plot", str(files["log"]), "--smooth", smooth])
        assert e.value.code == 2 and "argument --smooth: must be a finite number in [0, 1)" in capsys.readouterr().err


def test_train_errors_through_gpt2gen(capsys, files):
    _user_error(capsys, ["train", "--train-data", str(files["dir"]), "--no-progress"],
                f"{files['dir']} is a directory, not a token file")


# ------------------------------------------------------------------------------ the wrapper itself

def test_the_wrapper_reports_os_memory_and_decode_errors(capsys, monkeypatch, tmp_path):
    import errno

    def raising(exc):
        def compile_model(*a, **k):
            raise exc
        return compile_model
    cases = [
        (OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x")),
         [f"{tmp_path / 'x'}: No space left on device", "hint: free some disk space"]),
        (PermissionError(errno.EACCES, "Permission denied", "/root/x"), ["/root/x: Permission denied", "hint:"]),
        (MemoryError("Unable to allocate 7.28 TiB for an array with shape (2000000000000,)"),
         ["out of memory: Unable to allocate 7.28 TiB", "hint: the model or batch is too large"]),
        (UnicodeDecodeError("utf-8", b"ab\xff", 2, 3, "invalid start byte"),
         ["not UTF-8 text: byte 0xff at byte offset 2 (invalid start byte)", "hint: the file must be UTF-8 text"]),
    ]
    for exc, needles in cases:
        monkeypatch.setattr(cli, "compile_model", raising(exc))
        _user_error(capsys, ["build"], *needles)


def test_a_decode_error_names_the_file_where_the_call_site_knows_it(tmp_path):
    """A UnicodeDecodeError knows its byte offset but not its file: the call site adds it (``where``), and
    checks.read_text, which library code reads text files with, always does."""
    from gpt2gen import checks
    err = UnicodeDecodeError("utf-8", b"ab\xff", 2, 3, "invalid start byte")
    assert checks.describe_error(err, where="notes.txt") == ("notes.txt: not UTF-8 text: byte 0xff at byte offset 2 "
                                                             "(invalid start byte)\n  hint: the file must be UTF-8 text")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9")
    with pytest.raises(checks.UsageError, match=rf"^{bad}: not UTF-8 text: byte 0xe9 at byte offset 3"):
        checks.read_text(bad)


def test_the_library_modules_take_their_checks_from_checks_not_the_command_line():
    """data, plot and train share UsageError, Bounded, Output and check_outputs through gpt2gen.checks, and
    the command line keeps no copies of them (nor an error formatter named like spec.describe)."""
    import ast
    from pathlib import Path

    import gpt2gen
    root = Path(gpt2gen.__file__).parent
    shared = {"UsageError", "Bounded", "Output", "check_outputs", "describe_error", "describe"}
    for module in ("data", "plot", "train", "bench"):
        tree = ast.parse((root / f"{module}.py").read_text())
        from_cli = {a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "cli"
                    for a in node.names}
        assert not from_cli & shared, (module, from_cli & shared)
    assert not hasattr(cli, "describe") and not hasattr(cli, "Bounded")
    assert cli.UsageError is __import__("gpt2gen.checks", fromlist=["x"]).UsageError   # used by cli itself


def test_a_bug_keeps_its_traceback_and_ctrl_c_is_130(capsys, monkeypatch):
    def bug(*a, **k):
        raise RuntimeError("an internal bug")
    monkeypatch.setattr(cli, "compile_model", bug)
    with pytest.raises(RuntimeError, match="an internal bug"):   # not dressed up as a user error
        cli.main(["build"])

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "compile_model", interrupted)
    assert cli.main(["build"]) == 130
    assert capsys.readouterr().err == "gpt2gen: interrupted\n"


@pytest.mark.parametrize("module,argv", [
    ("gpt2gen.cli", ["plot", "{dir}"]),
    ("gpt2gen.train", ["--train-data", "{dir}", "--no-progress"]),
    ("gpt2gen.data", ["prepro", "text", "{dir}"]),
    ("gpt2gen.plot", ["{dir}"]),
    ("gpt2gen.bench", ["--model", "{dir}"]),
])
def test_every_python_m_entry_point(tmp_path, module, argv):
    """The real entry points, in a fresh interpreter: status 2 and one message, no traceback."""
    import os
    from pathlib import Path

    import gpt2gen
    argv = [a.format(dir=tmp_path) for a in argv]
    env = {**os.environ, "PYTHONPATH": str(Path(gpt2gen.__file__).parent.parent)}   # the gpt2gen under test
    proc = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("gpt2gen: error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert f"{tmp_path}: this is a directory" in proc.stderr or f"{tmp_path} is a directory" in proc.stderr
