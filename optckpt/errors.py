"""Errors optckpt raises on bad input, each carrying the exit code the CLI returns for it.

The CLI's single exit point (:mod:`optckpt.cli.app`) turns any :class:`OptckptError` into one
``error: ...`` line on stderr and ``exit_code``; other failures have their own codes there
(:class:`ExitCode`), and anything it does not know is a bug (traceback, ``ExitCode.BUG``).
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit codes of the command line (DESIGN.md, "Exit codes"); CI scripts depend on them."""

    OK = 0
    DIFFERENT = 1  # diff: differences found; resume-step: a check failed
    USAGE = 2
    UNREADABLE = 3
    INCOMPATIBLE = 4
    BUG = (
        70  # EX_SOFTWARE: an exception optckpt did not expect (never 1, which CI reads as "differ")
    )
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
    TERMINATED = 143  # SIGTERM (128 + SIGTERM)


class OptckptError(Exception):
    """Base class of every error caused by the user's input rather than by a bug."""

    exit_code: ExitCode = ExitCode.UNREADABLE


class Terminated(BaseException):
    """Raised by the command line's SIGTERM handler, so that cleanup runs as for Ctrl-C.

    A :class:`BaseException`, as :class:`KeyboardInterrupt` is, so that no ``except
    Exception`` swallows it; the exit map turns it into ``ExitCode.TERMINATED``.
    """


class UsageError(OptckptError):
    """An option or argument that cannot work (a key path that does not exist, ...)."""

    exit_code = ExitCode.USAGE


class UnreadableCheckpointError(OptckptError):
    """The input is missing, empty, truncated, not a checkpoint, or not of a known format."""

    exit_code = ExitCode.UNREADABLE


class UnsafeCheckpointError(UnreadableCheckpointError):
    """The pickle needs globals that ``torch.load(weights_only=True)`` does not allow."""

    def __init__(self, message: str, unsafe_globals: list[str]) -> None:
        super().__init__(message)
        self.unsafe_globals = unsafe_globals


class NoOptimizerStateError(UnreadableCheckpointError):
    """The checkpoint was read, but holds no optimizer state dict."""


class UnwritableOutputError(OptckptError, OSError):
    """The output cannot be written: read-only or full file system, no permission, ...

    The message names the output and the reason. It is also an :class:`OSError`, the type
    the failed call raised, so callers catching that keep working.
    """

    exit_code = ExitCode.UNREADABLE


class IncompatibleStateError(OptckptError, ValueError):
    """State that cannot be applied to the given parameters.

    It is also a :class:`ValueError`, the type torch raises for the same conditions, so code
    written against ``torch.optim`` keeps catching it.
    """

    exit_code = ExitCode.INCOMPATIBLE


class GroupCountMismatchError(IncompatibleStateError):
    """The checkpoint and the optimizer have a different number of parameter groups."""


class GroupSizeMismatchError(IncompatibleStateError):
    """A parameter group has a different number of parameters in the checkpoint."""
