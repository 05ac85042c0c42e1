"""DCP's stream transforms: entries that ``FileSystemWriter(..., _extensions=[ZStandard()])``
compressed, decompressed with a bound.

torch writes each entry (a ``torch.save`` zip) through its extensions' streams and records
their descriptors in ``.metadata`` (``_StorageInfo.transform_descriptors``, ``"stream.zstd/1"``;
``torch/distributed/checkpoint/_extension.py``). It reads one back whole through
``zstandard``'s ``ZstdDecompressor().stream_reader``. So does :func:`decompress`, with the
``zstandard`` package where it is installed (torch's test extra pins it), into anonymous
memory, and stops at the entry's declared size (:attr:`~optckpt.io.dcp.records.Stored.limit`):
a stream that gives back more is refused, having held at most the limit.
"""

from __future__ import annotations

import importlib
import io
import mmap
from typing import Any

from optckpt.errors import UnreadableCheckpointError
from optckpt.io.dcp.records import Stored

ZSTD = "stream.zstd"
"""The registry name of torch's ``ZStandard`` extension (its descriptor: ``stream.zstd/1``)."""

_BLOCK = 1 << 20


class Decompressed(mmap.mmap):
    """An entry decompressed into anonymous memory: not a file's pages (never released with
    ``MADV_DONTNEED``, which would zero it; never found as a file mapping by writers)."""


def _zstandard(where: str) -> Any:
    try:
        return importlib.import_module("zstandard")
    except ImportError as e:
        raise UnreadableCheckpointError(
            f"{where} is compressed with zstd (torch's ZStandard extension); "
            "install the zstandard package to read it (pip install zstandard)"
        ) from e


def decompress(raw: io.RawIOBase, stored: Stored, where: str) -> tuple[Decompressed, int]:
    """The bytes of an entry stored through ``stored.transforms``, and how many there are.

    Args:
        raw: the stored (compressed) bytes.
        where: how messages name the entry.

    Raises:
        UnreadableCheckpointError: a transform other than torch's ZStandard of version 1,
            no ``zstandard`` package, a corrupt stream, or one that gives back more than
            ``stored.limit`` bytes.
    """
    for descriptor in stored.transforms:
        name, _, version = descriptor.partition("/")
        if name != ZSTD or version.partition(".")[0] != "1":
            raise UnreadableCheckpointError(
                f"{where} is stored through {', '.join(stored.transforms)} (a DCP storage "
                f"extension), which optckpt does not read (it reads {ZSTD}/1)"
            )
    zstandard = _zstandard(where)
    stream: Any = raw
    for _ in stored.transforms:  # torch applies them in the order listed (filesystem.py)
        stream = zstandard.ZstdDecompressor().stream_reader(stream)
    limit = stored.limit
    out = Decompressed(-1, max(limit, 1))
    done = 0
    try:
        while True:
            block = stream.read(min(_BLOCK, limit + 1 - done))
            if not block:
                break
            if done + len(block) > limit:
                out.close()
                raise UnreadableCheckpointError(
                    f"{where}: decompresses to more than the {limit:,} bytes .metadata "
                    "declares for it; refused"
                )
            out[done : done + len(block)] = block
            done += len(block)
    except zstandard.ZstdError as e:
        out.close()
        raise UnreadableCheckpointError(f"{where}: corrupt zstd stream ({e})") from e
    return out, done
