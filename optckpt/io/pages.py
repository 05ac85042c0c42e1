"""Keep memory flat while streaming through memory-mapped checkpoints.

Pages of a file mapped with ``mmap`` count in the process's resident set once touched, so
reading every tensor of a 3 GB checkpoint would show 3 GB of RSS even though the kernel could
drop those pages at any time. :func:`release` tells the kernel we are done with them
(``madvise(MADV_DONTNEED)``) for every mapping of the given files.

That is safe only for *private, unmodified* file mappings, which is what optckpt makes:
``torch.load(mmap=True)`` maps with ``MAP_PRIVATE`` and optckpt's safetensors reader with
``ACCESS_COPY``, and optckpt never writes into loaded tensors (every change makes new ones).
A dropped page that is needed again is read back from the file. On systems without
``/proc/self/maps`` this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

_MADV_DONTNEED = 4
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@cache
def _libc_function(name: str) -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """The C library's function ``name``, or ``None``: looked up among the symbols the
    interpreter already has (``dlopen(NULL)``: no ``ldconfig`` run, which
    ``ctypes.util.find_library`` spawns), else in the library found by name."""
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        pass
    found = ctypes.util.find_library("c")
    if found is None:
        return None
    return getattr(ctypes.CDLL(found, use_errno=True), name, None)


@cache
def _madvise() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    func = _libc_function("madvise")
    if func is None or not os.path.exists("/proc/self/maps"):
        return None
    func.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    func.restype = ctypes.c_int
    return func


@dataclass(frozen=True)
class FileMapping:
    """One private mapping of a file: addresses ``[start, end)`` show the file from ``offset``."""

    start: int
    end: int
    offset: int
    inode: int
    path: str


def _mappings(paths: set[str]) -> list[FileMapping]:
    """The private mappings of ``paths`` in this process (``[]`` without ``/proc/self/maps``)."""
    if not os.path.exists("/proc/self/maps"):
        return []
    found = []
    # file names are bytes: a name that is not UTF-8 must compare equal to os.fsdecode(path)
    with open("/proc/self/maps", errors="surrogateescape") as maps:
        for line in maps:
            # address perms offset dev inode path
            parts = line.split(maxsplit=5)
            if len(parts) < 6 or parts[5].strip() not in paths:
                continue
            # only private ("p"), read-only-backed mappings: the 4th permission letter
            if parts[1][3] != "p":
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            found.append(
                FileMapping(start, end, int(parts[2], 16), int(parts[4]), parts[5].strip())
            )
    return found


@cache
def _malloc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    func = _libc_function("malloc_trim")  # glibc only
    if func is not None:
        func.argtypes = [ctypes.c_size_t]
        func.restype = ctypes.c_int
    return func


def trim_heap() -> None:
    """Give the heap's free memory back to the system (glibc's ``malloc_trim``; else no-op).

    glibc serves allocations below its dynamic mmap threshold (up to 32 MB) from the heap
    and keeps freed heap pages resident; a writer that makes and frees one cast tensor after
    another would otherwise see its RSS creep up by hundreds of MB.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _private_mappings(paths: set[str]) -> list[tuple[int, int]]:
    return [(m.start, m.end) for m in _mappings(paths)]


def release(files: Iterable[str | Path]) -> None:
    """Drop the resident pages of every private mapping of ``files`` (see module doc)."""
    madvise = _madvise()
    if madvise is None:
        return
    paths = {str(Path(f).resolve()) for f in files}
    if not paths:
        return
    for start, end in _private_mappings(paths):
        madvise(start, end - start, _MADV_DONTNEED)


class Releaser:
    """Calls :func:`release` on ``files`` once every ``every`` bytes reported to :meth:`read`.

    A list is kept as given, not copied: a DCP folder's list of mapped files grows as its
    chunks are read (:class:`optckpt.io.dcp.storage.Files`), and each release sees them all.
    """

    def __init__(self, files: Iterable[str | Path], every: int = 256 * 1024 * 1024) -> None:
        self.files = files if isinstance(files, list) else list(files)
        self.every = every
        self._pending = 0

    def read(self, nbytes: int) -> None:
        """Note that ``nbytes`` more of the files were read; release them when enough were."""
        self._pending += nbytes
        if self._pending >= self.every:
            release(self.files)
            self._pending = 0


class FileRanges:
    """Finds where in their files the bytes of memory-mapped tensors lie.

    Built once from ``/proc/self/maps`` for the given (private, unmodified, see module doc)
    mappings, so that a writer can copy a mapped tensor's bytes from its file inside the
    kernel (``os.copy_file_range``, as ``cp`` does) instead of through user space. A mapping
    whose file was replaced since it was mapped (another inode at the path) is ignored.
    :meth:`drop` releases the pages of one tensor once it has been read. Use as a context
    manager: it holds the files open.
    """

    def __init__(self, files: Iterable[str | Path]) -> None:
        self._fds: dict[str, int] = {}
        self._maps: list[FileMapping] = []
        paths = {str(Path(f).resolve()) for f in files}
        for m in _mappings(paths):
            if m.path not in self._fds:
                try:
                    fd = os.open(m.path, os.O_RDONLY)
                except OSError:
                    continue
                self._fds[m.path] = fd
            if os.fstat(self._fds[m.path]).st_ino == m.inode:
                self._maps.append(m)

    def find(self, address: int, nbytes: int) -> tuple[int, int] | None:
        """``(fd, file offset)`` of ``nbytes`` mapped at ``address``, or ``None``."""
        for m in self._maps:
            if m.start <= address and address + nbytes <= m.end:
                return self._fds[m.path], m.offset + address - m.start
        return None

    def drop(self, address: int, nbytes: int) -> None:
        """Release the pages under ``nbytes`` at ``address`` if a mapping of these files holds
        them (see :func:`release`; whole pages, so a neighbour's pages may go too, which is
        harmless: they are read back from the file when needed)."""
        madvise = _madvise()
        if madvise is None or nbytes <= 0:
            return
        for m in self._maps:
            if m.start <= address < m.end:
                start = max(m.start, address - address % _PAGE)
                end = min(m.end, address + nbytes + (-(address + nbytes) % _PAGE))
                madvise(start, end - start, _MADV_DONTNEED)
                return

    def close(self) -> None:
        """Close the files."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._maps.clear()

    def __enter__(self) -> FileRanges:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def copy_range(src: int, offset: int, dst: int, nbytes: int) -> int:
    """Copy ``nbytes`` of file ``src`` from ``offset`` to ``dst`` at its position, in the kernel.

    Returns the bytes copied: fewer than ``nbytes`` (possibly 0) where the kernel cannot copy
    between these files (another file system, no ``copy_file_range``) or the source is short;
    the caller writes the rest itself. ``dst``'s position advances by what was copied.
    """
    copy = getattr(os, "copy_file_range", None)
    done = 0
    if copy is None:
        return 0
    while done < nbytes:
        try:
            n = copy(src, dst, min(nbytes - done, 1 << 30), offset + done)
        except OSError as e:
            if e.errno in _NO_COPY:
                break
            raise
        if n == 0:
            break
        done += n
    return done


_NO_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}
