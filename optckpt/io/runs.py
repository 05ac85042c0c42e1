"""Bytes of described storages (:mod:`optckpt.described`), copied from file to file.

A writer of described tensors never makes a tensor: it copies each storage's bytes from the
file they are in, inside the kernel (``os.copy_file_range``, as ``cp`` does) where it can,
else with ``os.pread`` in slices. :func:`~optckpt.described.runs` cuts a range of a storage
into the runs of files it lies in (one, or several for a DCP tensor saved as row chunks,
:class:`~optckpt.described.JoinedStorage`); :func:`copy_runs` copies them and
:func:`crc32_runs` checksums them (the torch zip writer needs each record's CRC32) through a
window of the file mapped at a time, so memory stays flat; :func:`read_runs` reads small ones.

A file cut short after it was read (another process rewriting it) is reported as
:class:`~optckpt.errors.UnreadableCheckpointError`: the copy and ``os.pread`` see the short
file, where touching its mapping past the new end would kill the process (SIGBUS) and leave
the temporary output behind. (A file cut during the checksum of a mapped window still can.)
"""

from __future__ import annotations

import mmap
import os
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from optckpt.described import DescribedStorage, Run
from optckpt.errors import UnreadableCheckpointError
from optckpt.io.outfile import write_all
from optckpt.io.pages import copy_range

_SLICE = 16 * 1024 * 1024  # bytes per write call when not copied in the kernel
_WINDOW = 64 * 1024 * 1024  # bytes of a file mapped at once to checksum it


class Files:
    """The input files of described storages, each opened once (a context manager)."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def fd(self, path: Path) -> int:
        """A read-only descriptor of ``path``, opened on first use."""
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def __enter__(self) -> Files:
        return self

    def __exit__(self, *exc: Any) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _cut_short(path: Path, end: int) -> UnreadableCheckpointError:
    return UnreadableCheckpointError(
        f"{path}: changed while being copied (it now ends before byte {end})"
    )


def _read(storage: DescribedStorage, begin: int, nbytes: int, files: Files) -> bytes:
    """``nbytes`` of ``storage`` from byte ``begin``, read from its file (``os.pread``)."""
    if storage.file is None:
        return storage.read(begin, nbytes)
    fd, at = files.fd(storage.file), storage.start + begin
    data = os.pread(fd, nbytes, at)
    while len(data) < nbytes:  # a short read: the rest, or the end of the file
        more = os.pread(fd, nbytes - len(data), at + len(data))
        if not more:
            raise _cut_short(storage.file, at + nbytes)
        data += more
    return data


def read_runs(found: Sequence[Run], files: Files) -> bytes:
    """The bytes of ``found``, one after another, read from their files.

    Raises:
        UnreadableCheckpointError: a file is shorter than when it was read.
    """
    return b"".join(_read(storage, begin, nbytes, files) for storage, begin, nbytes in found)


def copy_runs(
    found: Sequence[Run], f: Any, files: Files, progress: Callable[[int], None] | None
) -> None:
    """Append the bytes of ``found`` to the raw file ``f``: in the kernel where it can, else
    read from the file, in slices.

    Raises:
        UnreadableCheckpointError: a file is shorter than when it was read.
    """
    for storage, begin, nbytes in found:
        done = 0
        if storage.file is not None:
            done = copy_range(files.fd(storage.file), storage.start + begin, f.fileno(), nbytes)
        if progress is not None and done:
            progress(done)
        for start in range(done, nbytes, _SLICE):
            piece = _read(storage, begin + start, min(_SLICE, nbytes - start), files)
            write_all(f, piece)
            if progress is not None:
                progress(len(piece))


def crc32_runs(found: Sequence[Run], files: Files) -> int:
    """The CRC32 of the bytes of ``found``, one after another (as ``zlib.crc32`` of them).

    A file is read through a read-only mapping of :data:`_WINDOW` bytes at a time, unmapped
    before the next, so its pages never add up in memory; ``zlib.crc32`` releases the GIL,
    so this runs beside a copy in another thread. Open the files (:meth:`Files.fd`) in the
    thread that owns ``files`` first.

    Raises:
        UnreadableCheckpointError: a file is shorter than when it was read.
    """
    crc = 0
    for storage, begin, nbytes in found:
        if storage.file is None:
            for start in range(0, nbytes, _SLICE):
                crc = zlib.crc32(storage.read(begin + start, min(_SLICE, nbytes - start)), crc)
            continue
        fd = files.fd(storage.file)
        first = storage.start + begin
        end = first + nbytes
        if os.fstat(fd).st_size < end:  # else mapping past the end fails, touching it kills
            raise _cut_short(storage.file, end)
        while first < end:
            base = first - first % mmap.ALLOCATIONGRANULARITY
            length = min(end, base + _WINDOW) - base
            with mmap.mmap(fd, length, access=mmap.ACCESS_READ, offset=base) as window:
                view = memoryview(window)
                piece = view[first - base : length]
                crc = zlib.crc32(piece, crc)
                piece.release()
                view.release()
            first = base + length
    return crc
