"""The Typer app and its single exit map (DESIGN.md, "Exit codes").

Every failure leaves through :func:`exit_code_for`, so CI can trust the code:

* :class:`~optckpt.errors.OptckptError` — its ``exit_code``, one ``error: ...`` line;
* an :class:`OSError` (an input that cannot be opened, an output that cannot be written) — 3,
  one line with the path and the reason;
* Ctrl-C — 130; SIGTERM — 143 (the handler :func:`main` installs raises
  :class:`~optckpt.errors.Terminated`, so temporary files are removed on the way out as for
  Ctrl-C);
* a closed stdout (``optckpt inspect x | head -1``) — a quiet 0;
* torch.distributed.checkpoint's ``CheckpointException`` — the error it wraps, mapped as above;
* anything else is a bug — its traceback and 70 (never 1, which CI reads as "differences").

User errors print their traceback too when ``OPTCKPT_DEBUG=1``. :class:`_Group` applies the
map to parsing and to the commands (so ``typer.testing.CliRunner`` sees the same codes), and
:func:`main` to what is left (the final flush of stdout). Usage errors (2), ``--help`` and
``typer.Exit`` pass through as click makes them. Commands import torch lazily, so
``optckpt --help`` stays instant.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup

from optckpt import __version__
from optckpt.cli import (
    convert_cmd,
    diff_cmd,
    inspect_cmd,
    move_cmd,
    regenerate_cmd,
    remap_cmd,
    resume_cmd,
)
from optckpt.cli.render import safe
from optckpt.errors import ExitCode, OptckptError, Terminated

# click's own ways out (typer vendors click): usage errors (2), --help and typer.Exit (their
# code), Abort.
_CLICK_EXITS = (typer.Exit, typer.TyperException, typer.Abort)


def _error(message: str) -> None:
    """One ``error: ...`` line on stderr, whatever the message holds."""
    line = safe(" ".join(message.split()), markup=False)
    sys.stderr.write(f"error: {line}\n")
    sys.stderr.flush()


def _unwrap(error: BaseException) -> BaseException:
    """The error a torch.distributed.checkpoint ``CheckpointException`` wraps (the first
    rank's); any other error as it is. Matched by name: importing torch.distributed here
    would slow every command down."""
    while (
        type(error).__name__ == "CheckpointException"
        and type(error).__module__.startswith("torch.distributed.checkpoint")
        and getattr(error, "failures", None)
    ):
        failures = error.failures  # type: ignore[attr-defined]
        wrapped = failures[min(failures)]
        error = wrapped[0] if isinstance(wrapped, tuple) else wrapped
    return error


def _describe(error: OSError) -> str:
    """``path: reason`` (``out.pt: No space left on device``), both paths of a rename."""
    reason = error.strerror or str(error) or type(error).__name__
    paths = [
        os.fsdecode(p) for p in (error.filename, error.filename2) if isinstance(p, (str, bytes))
    ]
    return f"{' -> '.join(paths)}: {reason}" if paths else reason


def _silence_stdout() -> None:
    """Point stdout at /dev/null: its reader is gone, and the flush at exit must not fail
    again (the recipe of the Python docs, "Note on SIGPIPE")."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test's capture)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def exit_code_for(error: BaseException) -> int:
    """Report ``error`` on stderr as the exit map says, and return the exit code.

    Args:
        error: anything a command raised, except click's own exits (usage errors,
            ``typer.Exit``), which keep their codes.

    Returns:
        The process's exit code (:class:`~optckpt.errors.ExitCode`).
    """
    error = _unwrap(error)
    debug = os.environ.get("OPTCKPT_DEBUG") == "1"
    if isinstance(error, Terminated):
        _error("terminated (SIGTERM)")
        return ExitCode.TERMINATED
    if isinstance(error, KeyboardInterrupt):
        _error("interrupted")
        return ExitCode.INTERRUPTED
    if isinstance(error, OSError) and error.errno == errno.EPIPE:
        _silence_stdout()  # the reader of stdout left (| head): not a failure
        return ExitCode.OK
    if isinstance(error, OptckptError | OSError):
        if debug:
            traceback.print_exception(error, file=sys.stderr)
        # An OptckptError says what went wrong; a bare OSError, which path and why.
        _error(str(error) if isinstance(error, OptckptError) else _describe(error))
        return error.exit_code if isinstance(error, OptckptError) else ExitCode.UNREADABLE
    traceback.print_exception(error, file=sys.stderr)
    sys.stderr.write(
        f"optckpt {__version__}: this is a bug in optckpt (exit {int(ExitCode.BUG)}); "
        "please report it with the traceback above\n"
    )
    return ExitCode.BUG


@contextmanager
def _exit_map() -> Iterator[None]:
    """Turn whatever escapes the block into its exit code (a ``typer.Exit``)."""
    try:
        yield
    except (*_CLICK_EXITS, SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # the one place every failure is mapped
        raise typer.Exit(exit_code_for(e)) from None


class _Group(TyperGroup):
    """The app's group: applies the exit map to parsing (``--help``, ``--version``) and to
    the command it runs."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:  # click.Context
        with _exit_map():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:  # click.Context, vendored by typer
        with _exit_map():
            return super().invoke(ctx)


app = typer.Typer(
    cls=_Group,
    name="optckpt",
    help="Inspect, diff, remap, move, convert, regenerate and resume-step PyTorch optimizer checkpoints.",
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"optckpt {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
) -> None:
    """Inspect, diff, remap, move, convert, regenerate and resume-step PyTorch optimizer checkpoints."""


app.command("inspect")(inspect_cmd.inspect)
app.command("diff")(diff_cmd.diff)
app.command("move")(move_cmd.move)
app.command("convert")(convert_cmd.convert)
app.command("remap")(remap_cmd.remap)
app.command("regenerate")(regenerate_cmd.regenerate)
app.command("resume-step")(resume_cmd.resume_step)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Raise, so that the cleanup of atomic writes runs as for Ctrl-C; a second SIGTERM
    # during that cleanup is ignored rather than left to cut it short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


def main() -> NoReturn:
    """Run the command line (the ``optckpt`` console script and ``python -m optckpt``)."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    # Started with stdout or stderr closed (>&-): Python leaves it None. Hold the descriptor
    # with /dev/null, so that no file opened later (an output) becomes fd 1 or 2.
    if sys.stdout is None:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - kept open for the life of the process
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115
    code: int | str | None = 0
    try:
        try:
            app()
        except SystemExit as e:
            code = e.code
        # Flush now, inside the map: a reader that left (| head) is seen here or at exit.
        sys.stdout.flush()
    except BaseException as e:  # what _Group did not see (the flush above)
        code = exit_code_for(e)
    sys.exit(code)
