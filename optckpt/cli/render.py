"""Rendering helpers shared by the commands."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from functools import cache
from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:
    from pathlib import Path

    from rich.console import Console

    from optckpt.io.write import ProgressStart

_SHORT_DTYPES = {
    "float32": "f32",
    "float64": "f64",
    "float16": "f16",
    "bfloat16": "bf16",
    "int64": "i64",
    "int32": "i32",
    "int8": "i8",
    "uint8": "u8",
    "bool": "bool",
}


# What a checkpoint or a path may hold that must not reach a terminal as it is: C0 and C1
# controls and DEL (escape sequences, \r, \b), Unicode line separators and bidirectional
# overrides (text that reorders what is shown), and the lone surrogates that stand for the
# bytes of a non-UTF-8 file name (which stdout cannot encode).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _visible(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    if char in _NAMED:
        return _NAMED[char]
    if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's stand-in for the byte code - 0xDC00
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def safe(value: object, *, markup: bool = True) -> str:
    """``str(value)`` fit to print: control characters as visible escapes, markup escaped.

    A checkpoint is untrusted input: a parameter name may hold an escape sequence that
    recolours or rewrites the terminal, or ``[/]`` that rich reads as markup (and fails on).
    Control characters (``ESC`` becomes ``\\x1b``, a newline ``\\n``), bidirectional
    overrides and the bytes of non-UTF-8 file names (``\\xff``) are shown as escapes; with
    ``markup`` (for rich's ``print`` and table cells), rich markup is escaped too. Use
    ``markup=False`` for text written to a plain stream.
    """
    from rich.markup import escape

    text = _UNPRINTABLE.sub(_visible, str(value))
    return escape(text) if markup else text


def plain_json(value: Any) -> Any:
    """``value`` as JSON can hold it, by the one policy every ``--json`` follows (DESIGN.md):
    non-finite floats as the strings ``"nan"``, ``"inf"``, ``"-inf"`` (JSON has no such
    numbers), tuples as lists, paths as strings, any other object as its ``str``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, Mapping):
        return {
            plain_json(k) if isinstance(k, float) else k: plain_json(v) for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def print_json(data: Mapping[str, Any], notes: Iterable[str] = ()) -> None:
    """Print a command's one ``--json`` object on stdout, ``notes`` (what optckpt says about
    its own run) added to its ``"notes"``; control characters come out escaped."""
    out = {**data, "notes": [*data.get("notes", ()), *notes]}
    sys.stdout.write(json.dumps(plain_json(out), indent=2, allow_nan=False) + "\n")


def print_result(
    as_json: bool, data: Mapping[str, Any], lines: Iterable[str], notes: Iterable[str]
) -> None:
    """A writing command's report: ``data`` as its ``--json`` object, or ``lines`` on stdout
    (escaped, no markup); then ``notes`` (on stderr, or in the object's ``"notes"``)."""
    if as_json:
        print_json(data, notes)
        return
    for line in lines:
        sys.stdout.write(safe(line, markup=False) + "\n")
    print_notes(notes)


def fields(result: object, *names: str) -> dict[str, Any]:
    """``{name: result.name}`` for each name, in order: a result's fields for ``--json``."""
    return {name: getattr(result, name) for name in names}


def print_notes(notes: Iterable[str]) -> None:
    """Print ``note: ...`` lines on stderr: what optckpt says about its own run stays out of
    the report on stdout (DESIGN.md, one rule for streams)."""
    for note in notes:
        sys.stderr.write(f"note: {safe(note, markup=False)}\n")


@cache
def console() -> Console:
    """The stdout console; wide when piped, so tables are not squeezed to 80 columns."""
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            # rich exits 1 here; the CLI's exit map owns that decision (a quiet 0).
            self.quiet = True
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE), "<stdout>")

    probe = Console()
    return _Console(highlight=False, width=None if probe.is_terminal else 160)


def print_prefixes_stripped(out: Console, prefixes: Iterable[str]) -> None:
    """The wrapper prefixes stripped to pair names (diff, remap), if any."""
    if prefixes:
        out.print(
            "wrapper prefixes stripped to match names: "
            + safe(", ".join(prefixes))
            + " (as torch's _get_fqns strips them)",
            soft_wrap=True,
        )


def bytes_written(out: Path) -> int:
    """Bytes of an output: a file's size, or the files of a folder (a DCP checkpoint, a
    training folder), however deep."""
    from optckpt.io.folders import files_under

    return out.stat().st_size if out.is_file() else sum(p.stat().st_size for p in files_under(out))


def human_bytes(n: int) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def short_dtype(dtype: str) -> str:
    """``"float32"`` -> ``"f32"``."""
    return _SHORT_DTYPES.get(dtype, dtype)


LARGE = 256 * 1024 * 1024  # bytes of work worth a progress bar


@contextmanager
def progress_when_writing(
    label: str, *, quiet: bool = False
) -> Iterator[Callable[[int], Callable[[int], None] | None]]:
    """For work whose size is known only when its writing starts: a ``start(total)`` that
    opens :func:`byte_progress` then (closed with this block) and returns its callback."""
    with ExitStack() as stack:
        yield lambda total: stack.enter_context(byte_progress(label, total, quiet=quiet))


class Writing(TypedDict):
    """The keyword arguments every rewriting command's library function takes alike."""

    force: bool
    link: bool
    allow_globals: Iterable[str]
    progress: ProgressStart


@contextmanager
def writing(
    label: str, *, as_json: bool, force: bool, link: bool, allow_global: list[str] | None
) -> Iterator[Writing]:
    """The flags a rewriting command (convert, move, remap) passes on as they are, with the
    progress of :func:`progress_when_writing` (off under ``--json``)."""
    with progress_when_writing(label, quiet=as_json) as progress:
        yield Writing(force=force, link=link, allow_globals=allow_global or (), progress=progress)


@contextmanager
def byte_progress(
    label: str, total: int, *, quiet: bool = False
) -> Iterator[Callable[[int], None] | None]:
    """A byte-count callback drawing a rich progress bar on stderr, or ``None``.

    The bar shows only when stderr is a terminal, the work is large and ``quiet`` is off
    (``--json``), so piped output and CI logs stay clean.
    """
    if quiet or total < LARGE or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)
