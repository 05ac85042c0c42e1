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
import os
from collections.abc import Iterable
from functools import cache
from pathlib import Path

_MADV_DONTNEED = 4


@cache
def _madvise() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    name = ctypes.util.find_library("c")
    if name is None or not os.path.exists("/proc/self/maps"):
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    func = libc.madvise
    func.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    func.restype = ctypes.c_int
    return func


def _private_mappings(paths: set[str]) -> list[tuple[int, int]]:
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            if len(parts) < 6 or parts[5].strip() not in paths:
                continue
            # only private ("p"), read-only-backed mappings: the 4th permission letter
            if parts[1][3] != "p":
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((start, end))
    return ranges


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
    """Calls :func:`release` on ``files`` once every ``every`` bytes reported to :meth:`read`."""

    def __init__(self, files: Iterable[str | Path], every: int = 256 * 1024 * 1024) -> None:
        self.files = list(files)
        self.every = every
        self._pending = 0

    def read(self, nbytes: int) -> None:
        """Note that ``nbytes`` more of the files were read; release them when enough were."""
        self._pending += nbytes
        if self._pending >= self.every:
            release(self.files)
            self._pending = 0
