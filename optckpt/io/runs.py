"""Bytes of described storages (:mod:`optckpt.described`), copied from file to file.

A writer of described tensors never makes a tensor: it copies each storage's bytes from the
file they are in, inside the kernel (``os.copy_file_range``, as ``cp`` does) where it can,
else with ``os.pread`` in slices. :func:`~optckpt.described.runs` cuts a range of a storage
into the runs of files it lies in (one, or several for a DCP tensor saved as row chunks,
:class:`~optckpt.described.JoinedStorage`); :func:`copy_runs` copies them,
:func:`crc32_runs` checksums them (the torch zip writer needs each record's CRC32) one
buffer at a time, so memory stays flat, and :func:`read_runs` reads small ones.

None of them reads a file through a mapping: a file cut short after it was read (another
process rewriting it) is reported as :class:`~optckpt.errors.UnreadableCheckpointError`,
where touching a mapping past the new end would kill the process (SIGBUS) and leave the
temporary output behind.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from optckpt.described import DescribedStorage, Run, file_identity
from optckpt.errors import UnreadableCheckpointError
from optckpt.io.outfile import write_all
from optckpt.io.pages import copy_range

_SLICE = 16 * 1024 * 1024  # bytes per write call when not copied in the kernel


class Files:
    """The input files of described storages, each opened once (a context manager).

    A file is opened again by its path to be copied from, so it must still be the file that
    was read (:attr:`~optckpt.described.DescribedStorage.identity`): one renamed over it
    since (a trainer saving its next checkpoint) or changed is refused when opened, and one
    changed while it was copied when the block ends without an error; either would
    otherwise give a file of the old tree with other bytes.
    """

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._identities: dict[Path, tuple[int, ...]] = {}

    def fd(self, storage: DescribedStorage) -> int:
        """A read-only descriptor of ``storage``'s file, opened on first use.

        Raises:
            UnreadableCheckpointError: the file is not as it was read.
        """
        path = storage.file
        assert path is not None  # a storage read from a file
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
            if storage.identity is not None:
                self._identities[path] = storage.identity
                self._check(path)
        return self._fds[path]

    def _check(self, path: Path) -> None:
        if file_identity(self._fds[path]) != self._identities[path]:
            raise UnreadableCheckpointError(
                f"{path}: changed since it was read (replaced or rewritten); run again"
            )

    def __enter__(self) -> Files:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        try:
            if kind is None:
                for path in self._identities:
                    self._check(path)
        finally:
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
    fd, at = files.fd(storage), storage.start + begin
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
            done = copy_range(files.fd(storage), storage.start + begin, f.fileno(), nbytes)
        if progress is not None and done:
            progress(done)
        for start in range(done, nbytes, _SLICE):
            piece = _read(storage, begin + start, min(_SLICE, nbytes - start), files)
            write_all(f, piece)
            if progress is not None:
                progress(len(piece))


def crc32_runs(found: Sequence[Run], files: Files) -> int:
    """The CRC32 of the bytes of ``found``, one after another (as ``zlib.crc32`` of them).

    A file is read (``os.preadv``) into one buffer of at most :data:`_SLICE` bytes, so
    memory stays flat; ``preadv`` and ``zlib.crc32`` release the GIL, so this runs beside a
    copy in another thread. Open the files (:meth:`Files.fd`) in the thread that owns
    ``files`` first.

    Raises:
        UnreadableCheckpointError: a file is shorter than when it was read.
    """
    crc = 0
    buffer = memoryview(bytearray(min(_SLICE, sum(n for _, _, n in found))))
    for storage, begin, nbytes in found:
        if storage.file is None:
            for start in range(0, nbytes, _SLICE):
                crc = zlib.crc32(storage.read(begin + start, min(_SLICE, nbytes - start)), crc)
            continue
        fd = files.fd(storage)
        at, end = storage.start + begin, storage.start + begin + nbytes
        while at < end:
            n = os.preadv(fd, [buffer[: end - at]], at)
            if n == 0:
                raise _cut_short(storage.file, end)
            crc = zlib.crc32(buffer[:n], crc)
            at += n
    return crc
