"""Writing checkpoints: atomically, never over the input, never half a file.

Every writing command goes through :func:`atomic_output`: the data goes to a temporary file
in the target folder, is flushed and fsynced, then renamed over the target with
``os.replace`` (atomic on POSIX), and the folder is fsynced so the rename survives a crash.
On any exception, Ctrl-C included, the temporary file is removed and nothing appears at the
target.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from optckpt.errors import UsageError
from optckpt.io.safetensors_format import write_safetensors
from optckpt.io.torch_format import save_torch
from optckpt.locate import tensors_in

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


def check_output(out: Path, inputs: Iterable[Path], *, force: bool) -> None:
    """Refuse an output that is one of the inputs, or that exists without ``force``.

    Raises:
        UsageError: the output would overwrite an input or an existing file.
    """
    for source in inputs:
        same_file = out.exists() and source.exists() and out.samefile(source)
        if out.resolve() == source.resolve() or same_file:
            raise UsageError(f"-o {out} is the input; write to a new file")
        if source.is_dir() and out.resolve().is_relative_to(source.resolve()):
            raise UsageError(f"-o {out} is inside the input folder {source}")
    if out.is_dir():
        raise UsageError(f"-o {out} is a folder; give a file name")
    if out.exists() and not force:
        raise UsageError(f"{out} exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise UsageError(f"-o {out}: folder {out.parent} does not exist")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Called with the bytes about to be written, when writing starts; returns the per-write
# byte callback of save_checkpoint (or None), e.g. a progress bar sized then.
ProgressStart = Callable[[int], Callable[[int], None] | None]


def tensor_bytes(tree: Any) -> int:
    """The bytes of every tensor in a checkpoint tree (what writing it mostly costs)."""
    return sum(t.numel() * t.element_size() for _, t in tensors_in(tree))


@contextlib.contextmanager
def atomic_output(out: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``out``; on success move it to ``out``, else delete it."""
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
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
        _fsync_dir(out.parent)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        # torch's zip writer turns an interrupt raised inside a write into a RuntimeError when
        # it closes the archive; report it as the Ctrl-C it was.
        if isinstance(e.__context__, KeyboardInterrupt):
            raise e.__context__ from None
        raise


def save_checkpoint(
    tree: Any,
    out: Path,
    fmt: str,
    *,
    progress: Callable[[int], None] | None = None,
    sources: Iterable[str | Path] = (),
    saved_devices: Mapping[int, str] | None = None,
) -> None:
    """Write ``tree`` to ``out`` atomically, as a torch zip file (``pt``) or safetensors.

    Call :func:`check_output` first; this function does not ask whether ``out`` may be
    replaced.

    Args:
        tree: the checkpoint; may hold :class:`optckpt.io.torch_format.Deferred` casts,
            made one at a time as they are written.
        out: the target file.
        fmt: ``"pt"`` (the bytes ``torch.save`` writes) or ``"safetensors"``.
        progress: called with the number of bytes of each write.
        sources: the memory-mapped files ``tree`` was read from (private mappings that were
            never written to); their pages are released as they are copied, so memory stays
            flat, and tensors that are views of them are copied from the files in the
            kernel.
        saved_devices: the device to record for CPU tensors, by storage address (a
            :class:`~optckpt.io.Checkpoint`'s ``saved_devices``, less the tensors moved), so
            that a checkpoint saved from CUDA and read to the CPU is written back as it was.
    """
    sources = list(sources)
    with atomic_output(out) as tmp:
        if fmt == "safetensors":
            write_safetensors(
                tree, tmp, progress=progress, sources=sources, saved_devices=saved_devices
            )
            return
        save_torch(tree, tmp, progress=progress, sources=sources, saved_devices=saved_devices)
