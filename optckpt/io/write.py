"""Writing checkpoints: atomically, never over an input or a special file, never half a file.

Every writing command first calls :func:`check_output` with everything it reads, then goes
through :func:`atomic_output`: the data goes to a temporary file in the target folder, is
flushed and fsynced, then renamed over the target with ``os.replace`` (atomic on POSIX), and
the folder is fsynced so the rename survives a crash. On any exception, Ctrl-C and SIGTERM
included, the temporary file is removed and nothing appears at the target; an
:class:`OSError` there (disk full, read-only file system) becomes
:class:`~optckpt.errors.UnwritableOutputError`, which names the output and the reason.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from optckpt.described import DescribedTensor, is_tensor
from optckpt.errors import Terminated, UnwritableOutputError, UsageError
from optckpt.io.outfile import is_deferred
from optckpt.locate import KeyPath, tensor_paths

FORMATS = ("pt", "safetensors")


def format_for(path: Path, requested: str | None = None) -> str:
    """The output format: ``requested`` if given, else from the extension (``pt`` by default).

    Raises:
        UsageError: an unknown ``requested`` format.
    """
    if requested is not None:
        if requested not in FORMATS:
            raise UsageError(f"unknown format {requested!r}; choose one of: {', '.join(FORMATS)}")
        return requested
    return "safetensors" if path.suffix == ".safetensors" else "pt"


def _kind(mode: int) -> str | None:
    """What a file that is not a regular file is ("a FIFO", ...); ``None`` for a regular one."""
    kinds = (
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a folder"),
    )
    return next((name for test, name in kinds if test(mode)), None)


def _reason(error: OSError) -> str:
    """The reason an :class:`OSError` gives (``"No space left on device"``), without its path."""
    return error.strerror or str(error) or type(error).__name__


def _names_one_of(error: OSError, *paths: Path) -> bool:
    """Whether ``error`` names no file (a write to an open file) or one of ``paths``."""
    if error.filename is None or isinstance(error.filename, int):
        return True
    return os.fsdecode(error.filename) in {os.fspath(p) for p in paths}


def _resolved(path: Path) -> Path:
    """``path`` with its symlinks followed as far as they go (``Path.resolve`` raises on a
    symlink loop; a loop is the input's problem, reported when it is read)."""
    return Path(os.path.realpath(path))


def check_output(out: Path, inputs: Iterable[object], *, force: bool) -> None:
    """Refuse an output that is an input, is not a regular file, or exists without ``force``.

    Every writing command calls this before it reads anything, with every file it reads:
    the checkpoint, layouts (``--to``, ``--from``, ``--layout``), model weights (``--model``).
    ``-o`` must be absent or a regular file: a device node, FIFO or socket (or a symlink to
    one) is refused, because the atomic rename would replace it with a regular file. A
    symlink is judged by what it points to, so one that leads to an input is refused too.

    Args:
        out: the ``-o`` path.
        inputs: what the command reads; entries that are not paths (``None``, an in-memory
            :class:`~optckpt.layout.Layout`) are skipped, so callers may pass their
            arguments as they are.
        force: replace an existing regular file.

    Raises:
        UsageError: the output would overwrite an input, is not a regular file, exists
            without ``force``, or its folder does not exist.
        UnwritableOutputError: the output's folder cannot be written (read-only file
            system, no permission).
    """
    sources = [Path(p) for p in inputs if isinstance(p, (str, os.PathLike))]
    resolved = _resolved(out)
    for source in sources:
        same_file = out.exists() and source.exists() and out.samefile(source)
        if resolved == _resolved(source) or same_file:
            which = "" if str(source) == str(out) else f" {source}"
            raise UsageError(f"-o {out} is the input{which}; write to a new file")
        if source.is_dir() and resolved.is_relative_to(_resolved(source)):
            raise UsageError(f"-o {out} is inside the input folder {source}")
    if out.exists():  # follows a symlink: what it points to is what would be lost
        kind = _kind(out.stat().st_mode)
        if kind == "a folder":
            raise UsageError(f"-o {out} is a folder; give a file name")
        if kind is not None:
            raise UsageError(f"-o {out} is {kind}, not a regular file; optckpt writes only files")
    if os.path.lexists(out) and not force:
        raise UsageError(f"{out} exists; pass --force to overwrite it")
    check_folder(out, out.parent)


def check_folder(out: Path, folder: Path) -> None:
    """Refuse, before anything is written, an output ``out`` whose ``folder`` is missing or
    cannot be written.

    Raises:
        UsageError: ``folder`` does not exist.
        UnwritableOutputError: ``folder`` cannot be written (read-only file system, no
            permission).
    """
    if not folder.is_dir():
        raise UsageError(f"-o {out}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        read_only = os.statvfs(folder).f_flag & os.ST_RDONLY
        reason = "read-only file system" if read_only else "permission denied"
        raise UnwritableOutputError(f"cannot write {out}: {reason} (folder {folder})")


def fsync(path: Path) -> None:
    """Flush a file's or a folder's data (a folder's: its entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Called with the bytes about to be written, when writing starts; returns the per-write
# byte callback of save_checkpoint (or None), e.g. a progress bar sized then.
ProgressStart = Callable[[int], Callable[[int], None] | None]


def tensor_bytes(tree: Any) -> int:
    """The bytes of every tensor in a checkpoint tree, casts made when written
    (:class:`~optckpt.io.torch_format.Deferred`) included: what writing it mostly costs."""
    total = 0
    stack = [tree]
    while stack:
        node = stack.pop()
        if is_tensor(node) or is_deferred(node):
            total += node.numel() * node.element_size()
        elif isinstance(node, Mapping):
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return total


@contextlib.contextmanager
def atomic_output(out: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``out``; on success move it to ``out``, else delete it.

    Raises:
        UnwritableOutputError: creating, writing or renaming the file failed with an
            :class:`OSError` (no space left, read-only file system, no permission); the
            message names ``out`` and the reason.
        KeyboardInterrupt, Terminated: as raised inside the block, after the cleanup.
    """
    try:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as e:
        raise UnwritableOutputError(f"cannot write {out}: {_reason(e)}") from e
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        # mkstemp makes the file private (0600); give it the mode a new file gets.
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)
        os.replace(tmp, out)
        fsync(out.parent)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        # torch's zip writer turns an exception raised inside a write into a RuntimeError when
        # it closes the archive; report it as the Ctrl-C, SIGTERM or OSError it was.
        cause = e.__context__ if isinstance(e, RuntimeError) else e
        if isinstance(cause, (KeyboardInterrupt, Terminated)):
            raise cause from None
        # An OSError naming a file other than ours comes from reading an input: not ours.
        if (
            isinstance(cause, OSError)
            and not isinstance(cause, UnwritableOutputError)
            and _names_one_of(cause, tmp, out)
        ):
            raise UnwritableOutputError(f"cannot write {out}: {_reason(cause)}") from cause
        raise


def save_checkpoint(
    tree: Any,
    out: Path,
    fmt: str,
    *,
    progress: Callable[[int], None] | None = None,
    sources: Iterable[str | Path] = (),
    placement: Mapping[KeyPath, str] | None = None,
) -> None:
    """Write ``tree`` to ``out`` atomically, as a torch zip file (``pt``) or safetensors.

    Call :func:`check_output` first; this function does not ask whether ``out`` may be
    replaced.

    Args:
        tree: the checkpoint; may hold :class:`optckpt.io.torch_format.Deferred` casts,
            made one at a time as they are written.
        out: the target file.
        fmt: ``"pt"`` (the bytes ``torch.save`` writes; a tree of described tensors is
            written so without torch, :mod:`optckpt.io.zip_writer`) or ``"safetensors"``.
        progress: called with the number of bytes of each write.
        sources: the memory-mapped files ``tree`` was read from (private mappings that were
            never written to); their pages are released as they are copied, so memory stays
            flat, and tensors that are views of them are copied from the files in the
            kernel.
        placement: the device to record for CPU tensors, by key path (a
            :class:`~optckpt.io.Checkpoint`'s ``placement``, kept in step with the tree), so
            that a checkpoint saved from CUDA and read to the CPU is written back as it was.
    """
    sources = list(sources)
    with atomic_output(out) as tmp:
        if fmt == "safetensors":  # writes described tensors (optckpt.described) without torch
            from optckpt.io.safetensors_format.writer import write_safetensors

            write_safetensors(tree, tmp, progress=progress, sources=sources, placement=placement)
            return
        if any(isinstance(t, DescribedTensor) for _, t in tensor_paths(tree)):
            from optckpt.io.zip_writer import write_described  # read without torch: ``convert``

            write_described(tree, tmp, progress=progress, placement=placement)
            return
        from optckpt.io.torch_format import save_torch

        save_torch(tree, tmp, progress=progress, sources=sources, placement=placement)
