"""The CLI's one exit map (DESIGN.md, "Exit codes"), each mapping through CliRunner, and the
process-level ones (signals, a closed stdout) through ``python -m optckpt``."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pytest
import typer
from checks import assert_one_line_error, run

import optckpt.inspect
import optckpt.io.write
from optckpt.cli import inspect_cmd
from optckpt.errors import IncompatibleStateError, Terminated, UsageError

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
CKPT = FIXTURES / "adamw_train.pt"


def _raising(error: BaseException):  # type: ignore[no-untyped-def]
    def fail(*args: object, **kwargs: object) -> None:
        raise error

    return fail


def _python(*args: str, **kwargs: object) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("OPTCKPT_DEBUG", None)
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [sys.executable, *args], env=env, stderr=subprocess.PIPE, **kwargs
    )


# OptckptError: its code, one line -----------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "code"), [(UsageError("bad --key"), 2), (IncompatibleStateError("size 3 vs 4"), 4)]
)
def test_optckpt_error_is_its_code_and_one_line(
    monkeypatch: pytest.MonkeyPatch, error: Exception, code: int
) -> None:
    monkeypatch.setattr(optckpt.inspect, "inspect_checkpoint", _raising(error))
    result = run("inspect", CKPT)
    assert result.exit_code == code
    assert result.stdout == ""
    assert_one_line_error(result.stderr, str(error))


def test_debug_shows_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(optckpt.inspect, "inspect_checkpoint", _raising(UsageError("bad")))
    result = run("inspect", CKPT, env={"OPTCKPT_DEBUG": "1"})
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and result.stderr.endswith("error: bad\n")


def test_error_line_escapes_control_characters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        optckpt.inspect, "inspect_checkpoint", _raising(UsageError("no key '\x1b[31mred\r'"))
    )
    result = run("inspect", CKPT)
    assert result.exit_code == 2
    assert "\x1b" not in result.stderr and "\r" not in result.stderr
    assert_one_line_error(result.stderr, "no key '\\x1b[31mred")  # \r: a space


# OSError: 3, the path and the reason ------------------------------------------------------


def test_unreadable_input_is_3_with_path_and_reason(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Tests run as root, which chmod 000 does not stop: make the open itself fail.
    source = tmp_path / "locked.pt"
    source.write_bytes(CKPT.read_bytes())
    real_open = Path.open

    def open_(self: Path, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        if self.name == "locked.pt":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_open(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "open", open_)
    result = run("inspect", source)
    assert result.exit_code == 3
    assert_one_line_error(result.stderr, f"{source}: Permission denied")
    assert "Usage" not in result.stderr


def test_a_folder_where_a_layout_file_is_expected_is_3(tmp_path: Path) -> None:
    folder = tmp_path / "layout.json"
    folder.mkdir()
    result = run("remap", CKPT, "--to", folder, "--dry-run")
    assert result.exit_code == 3, result.output
    assert_one_line_error(result.stderr, str(folder))


def test_missing_non_utf8_path_is_named_not_called_corrupt(tmp_path: Path) -> None:
    missing = tmp_path / os.fsdecode(b"ckpt\xff.pt")
    result = run("inspect", missing)
    assert result.exit_code == 3
    assert_one_line_error(result.stderr, "ckpt\\xff.pt", "no such file")


def test_non_utf8_output_path_is_written_and_reported(tmp_path: Path) -> None:
    out = tmp_path / os.fsdecode(b"out\xff.pt")
    result = run("convert", CKPT, "-o", out)
    assert result.exit_code == 0, result.output
    assert out.exists()
    assert "out\\xff.pt" in result.stdout


def _assert_unwritable(folder: Path, reason: str, *command: str | Path) -> None:
    """``optckpt COMMAND... -o FOLDER/out.pt`` exits 3 with one line "cannot write OUT" (and
    ``reason``, if given), and leaves nothing in ``folder``."""
    out = folder / "out.pt"
    result = run(*command, "-o", out)
    assert result.exit_code == 3
    assert_one_line_error(result.stderr, f"cannot write {out}" + (f": {reason}" if reason else ""))
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize(
    ("code", "reason"),
    [(errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system")],
)
def test_output_that_cannot_be_written_is_3_and_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, code: int, reason: str
) -> None:
    def failing_replace(src: object, dst: object) -> None:
        raise OSError(code, os.strerror(code), os.fspath(src), os.fspath(dst))  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", failing_replace)
    _assert_unwritable(tmp_path, reason, "convert", CKPT)


def test_temporary_file_that_cannot_be_made_is_3(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def no_permission(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / ".out.pt.x.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", no_permission)
    _assert_unwritable(tmp_path, "Permission denied", "move", CKPT, "--device", "cpu")


def test_read_only_folder_is_refused_before_reading(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # root writes anywhere but on a read-only mount, where access(W_OK) fails: play that.
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode)
    )
    read = []
    monkeypatch.setattr(optckpt.io.write, "save_checkpoint", lambda *a, **k: read.append(a))
    _assert_unwritable(tmp_path, "", "convert", CKPT)
    assert read == []


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_output_in_proc_is_3() -> None:
    result = run("convert", CKPT, "-o", "/proc/optckpt-out.pt")
    assert result.exit_code == 3
    assert_one_line_error(result.stderr, "cannot write /proc/optckpt-out.pt")


def test_checkpoint_exception_is_unwrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.distributed.checkpoint.api import CheckpointException

    inner = NotADirectoryError(errno.ENOTDIR, "Not a directory", "/x/out.dcp")
    wrapped = CheckpointException("save failed", {0: (inner, traceback.StackSummary.from_list([]))})
    monkeypatch.setattr(optckpt.inspect, "inspect_checkpoint", _raising(wrapped))
    result = run("inspect", CKPT)
    assert result.exit_code == 3
    assert_one_line_error(result.stderr, "/x/out.dcp: Not a directory")


# interrupts, bugs, a closed stdout --------------------------------------------------------


@pytest.mark.parametrize(("error", "code"), [(KeyboardInterrupt(), 130), (Terminated(), 143)])
def test_interrupt_is_its_code_and_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, error: BaseException, code: int
) -> None:
    import optckpt.io.torch_format as torch_format

    real_write_all = torch_format.write_all
    calls = []

    def interrupted(f: object, data: object) -> None:
        calls.append(1)
        if len(calls) > 1:
            raise error
        real_write_all(f, data)

    monkeypatch.setattr(torch_format, "write_all", interrupted)
    result = run("move", CKPT, "--device", "cpu", "--dtype", "float64", "-o", tmp_path / "o.pt")
    assert result.exit_code == code
    assert "Traceback" not in result.stderr
    assert len(calls) > 1 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error", [RuntimeError("boom"), MemoryError(), RecursionError()])
def test_a_bug_is_70_with_its_traceback_never_1(
    monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    monkeypatch.setattr(optckpt.inspect, "inspect_checkpoint", _raising(error))
    result = run("inspect", CKPT)
    assert result.exit_code == 70
    assert "Traceback" in result.stderr and type(error).__name__ in result.stderr
    assert "bug in optckpt" in result.stderr


def test_closed_stdout_is_a_quiet_0(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inspect_cmd, "render", _raising(BrokenPipeError(errno.EPIPE, "pipe")))
    result = run("inspect", CKPT)
    assert result.exit_code == 0
    assert result.stderr == ""


def test_click_exits_keep_their_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    assert run("--help").exit_code == 0
    assert run("inspect", "--help").exit_code == 0
    usage = run("inspect", CKPT, "--no-such-option")
    assert usage.exit_code == 2 and "No such option" in usage.stderr
    monkeypatch.setattr(optckpt.inspect, "inspect_checkpoint", _raising(typer.Exit(5)))
    assert run("inspect", CKPT).exit_code == 5


@pytest.mark.parametrize(
    "args",
    [
        ("inspect", str(CKPT)),
        ("inspect", str(CKPT), "--json"),
        ("--help",),
        ("--version",),
    ],
)
def test_closed_stdout_process_exits_0_quietly(args: tuple[str, ...]) -> None:
    process = _python("-m", "optckpt", *args, stdout=subprocess.PIPE)
    assert process.stdout is not None
    process.stdout.close()  # the reader is gone before anything is written: EPIPE for sure
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr.decode()
    assert stderr == b""


def test_head_c1_exits_0_quietly() -> None:
    done = subprocess.run(
        f"set -o pipefail; {sys.executable} -m optckpt inspect {CKPT} --all | head -c1",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == b"" and len(done.stdout) == 1


_SLOW_WRITER = """
import sys, time
from pathlib import Path
import optckpt.io.torch_format as torch_format  # the writers import them when they write
import optckpt.io.zip_writer as zip_writer

ready = Path(sys.argv.pop(1))

def slow(tree, path, **kwargs):
    path.write_bytes(b"partial")
    ready.touch()
    time.sleep(120)

torch_format.save_torch = zip_writer.write_described = slow
from optckpt.cli.app import main
main()
"""


@pytest.mark.parametrize(
    ("source", "out"),
    [(CKPT, "out.pt"), (FIXTURES / "hf_trainer", "checkpoint-2")],  # a file; a training folder
)
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_midway_removes_the_temporary_file(
    tmp_path: Path, signum: int, code: int, source: Path, out: str
) -> None:
    script = tmp_path / "slow.py"
    script.write_text(_SLOW_WRITER)
    ready, out_dir = tmp_path / "ready", tmp_path / "out"
    out_dir.mkdir()
    process = _python(
        str(script), str(ready), "convert", str(source), "-o", str(out_dir / out),
        stdout=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the writer never started"
        time.sleep(0.05)
    (temporary,) = out_dir.iterdir()
    assert temporary.name.startswith(f".{out}.")
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr.decode()
    assert_one_line_error(stderr.decode())
    assert stdout == b""
    assert list(out_dir.iterdir()) == []
