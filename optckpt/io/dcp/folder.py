"""What a DCP folder holds, read without torch: its ``.metadata``, its chunks checked to tile
their tensors, how each tensor is laid out in the ``.distcp`` files.

:class:`DcpFolder` is the :class:`~optckpt.io.Checkpoint` of a DCP folder as far as it needs
no tensor: the metadata, the files, each tensor's :class:`TensorLayout` (its global shape,
dtype and chunks, and the files they are in). :func:`optckpt.io.dcp.read_dcp` returns its
subclass with tensors; :func:`optckpt.io.dcp.describe.describe_dcp` returns one whose
tensors are descriptions (``inspect`` without ``--stats``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from optckpt.described import DType, dtype_name
from optckpt.errors import UnreadableCheckpointError
from optckpt.io.dcp import METADATA
from optckpt.io.dcp.storage import refused_globals
from optckpt.io.dcp.unpickle import (
    BadPickle,
    Chunk,
    Metadata,
    RefusedGlobals,
    Stored,
    TensorEntry,
    read_metadata,
)
from optckpt.io.folders import files_under
from optckpt.io.pickles import MAX_PICKLE_BYTES
from optckpt.io.read import Checkpoint

# Chunks of one tensor checked pairwise for overlap; past this many (thousands of ranks) the
# tensor is zero-filled first instead, so no byte of it is ever left uninitialised.
_PAIRWISE = 4096


def read_metadata_file(folder: Path, allowed: Mapping[str, Any]) -> Metadata:
    """Read and unpickle ``folder/.metadata`` safely.

    Raises:
        UnreadableCheckpointError: too large, corrupt, or not DCP metadata.
        UnsafeCheckpointError: it names globals outside the allow-list.
    """
    path = folder / METADATA
    size = path.stat().st_size
    if size > MAX_PICKLE_BYTES:
        raise UnreadableCheckpointError(
            f"{path}: {size:,} bytes of pickle, over the {MAX_PICKLE_BYTES // 2**20} MiB "
            "that optckpt reads"
        )
    data = path.read_bytes()
    try:
        return read_metadata(data, allowed)
    except RefusedGlobals as e:
        raise refused_globals(str(path), e.names) from e
    except BadPickle as e:
        raise UnreadableCheckpointError(f"{path}: {e}") from e


def check_chunks(where: str, entry: TensorEntry) -> bool:
    """Check that ``entry``'s chunks lie inside the tensor and add up to it.

    Returns:
        Whether they were also checked not to overlap (see :data:`_PAIRWISE`).

    Raises:
        UnreadableCheckpointError: a chunk outside the tensor, of another rank, or chunks
            whose sizes do not add up to the tensor's.
    """
    size = entry.size
    total = 0
    for c in entry.chunks:
        if len(c.offsets) != len(size) or len(c.sizes) != len(size):
            raise UnreadableCheckpointError(
                f"{where}: a chunk of rank {len(c.sizes)} in a tensor of shape {list(size)}"
            )
        if any(o + s > n for o, s, n in zip(c.offsets, c.sizes, size)):
            raise UnreadableCheckpointError(
                f"{where}: a chunk at {list(c.offsets)} of {list(c.sizes)} lies outside the "
                f"tensor's shape {list(size)}"
            )
        total += math.prod(c.sizes)
    if total != math.prod(size):
        raise UnreadableCheckpointError(
            f"{where}: its {len(entry.chunks)} chunks hold {total:,} elements, the tensor "
            f"{math.prod(size):,} (shape {list(size)})"
        )
    chunks = [c for c in entry.chunks if math.prod(c.sizes)]
    if len(chunks) > _PAIRWISE:
        return False
    chunks.sort(key=lambda c: c.offsets)
    for i, a in enumerate(chunks):
        for b in chunks[i + 1 :]:
            if size and b.offsets[0] >= a.offsets[0] + a.sizes[0]:
                break  # sorted by the first offset: no later chunk reaches back into a
            if all(
                ao < bo + bs and bo < ao + as_
                for ao, as_, bo, bs in zip(a.offsets, a.sizes, b.offsets, b.sizes)
            ):
                raise UnreadableCheckpointError(
                    f"{where}: chunks at {list(a.offsets)} and {list(b.offsets)} overlap"
                )
    return True


@dataclass(frozen=True)
class ChunkLayout:
    """One chunk of a tensor: where it starts in the whole tensor, its sizes, its file."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str


@dataclass(frozen=True)
class TensorLayout:
    """How one tensor is saved: its global shape and dtype, its chunks and their files.

    Attributes:
        chunks: how many chunks (1: saved whole, by one rank).
        files: the files its chunks are in, in order of first use.
        pieces: each chunk, in the order of ``.metadata``.
    """

    key: str
    shape: tuple[int, ...]
    dtype: DType
    chunks: int
    files: list[str]
    pieces: tuple[ChunkLayout, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """``{"key", "shape", "dtype", "files", "chunks": [{"offsets", "sizes", "file"}]}``."""
        return {
            "key": self.key,
            "shape": list(self.shape),
            "dtype": dtype_name(self.dtype),
            "files": list(self.files),
            "chunks": [
                {"offsets": list(c.offsets), "sizes": list(c.sizes), "file": c.file}
                for c in self.pieces
            ],
        }


def stored_chunks(
    folder: Path, metadata: Metadata
) -> Iterator[tuple[str, TensorEntry, list[tuple[Chunk, Stored]]]]:
    """Each tensor of ``metadata`` (flat key, entry) with its chunks and where each is
    stored, in the order of ``.metadata``.

    Raises:
        UnreadableCheckpointError: a chunk that ``.metadata`` does not say where it is
            stored.
    """
    for key, entry in metadata.entries.items():
        if not isinstance(entry, TensorEntry):
            continue
        pieces = []
        for chunk in entry.chunks:
            stored = metadata.storage.get((key, chunk.offsets))
            if stored is None:
                raise UnreadableCheckpointError(
                    f"{folder}: {key}: .metadata says where no chunk at {list(chunk.offsets)} is"
                )
            pieces.append((chunk, stored))
        yield key, entry, pieces


def tensor_layouts(folder: Path, metadata: Metadata) -> dict[str, TensorLayout]:
    """How each tensor of ``metadata`` is saved, by its flat key; its chunks checked
    (:func:`check_chunks`), in the order of ``.metadata``.

    Raises:
        UnreadableCheckpointError: a chunk that ``.metadata`` does not say where it is
            stored, or chunks that do not tile their tensor.
    """
    found = {}
    for key, entry, stored in stored_chunks(folder, metadata):
        pieces = [ChunkLayout(chunk.offsets, chunk.sizes, where.file) for chunk, where in stored]
        check_chunks(f"{folder}: {key}", entry)
        files = list(dict.fromkeys(p.file for p in pieces))
        found[key] = TensorLayout(
            key, entry.size, entry.described, len(pieces), files, tuple(pieces)
        )
    return found


def folder_files(folder: Path) -> dict[str, int]:
    """Every file of the folder (relative name) and its size in bytes."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in files_under(folder)}


_Folder = TypeVar("_Folder", bound="DcpFolder")


@dataclass
class DcpFolder(Checkpoint):
    """A :class:`~optckpt.io.Checkpoint` read from a DCP folder (``format`` ``"dcp"``).

    DCP records no device: :meth:`saved_device` is ``None`` for every tensor. ``members`` is
    empty (the tree's top-level keys are what the folder holds); ``files`` lists the files.

    Attributes:
        metadata: what ``.metadata`` holds.
        layouts: how each tensor is saved, by its flat key.
        files: every file of the folder and its size in bytes.
    """

    metadata: Metadata | None = None
    layouts: dict[str, TensorLayout] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)

    def saved_device(self, *args: Any, **kwargs: Any) -> str | None:
        """``None``: DCP does not record where a tensor was (whichever tensor is asked for)."""
        return None

    @classmethod
    def made(
        cls: type[_Folder],
        folder: Path,
        metadata: Metadata,
        root: Any,
        *,
        sources: list[Path],
        layouts: dict[str, TensorLayout],
        **extra: Any,
    ) -> _Folder:
        """The checkpoint of ``folder`` once its tree is built: its files and their sizes
        listed now; ``sources``: the files mapped while reading it."""
        sizes = folder_files(folder)
        return cls(
            path=folder,
            format="dcp",
            size=sum(sizes.values()),
            root=root,
            sources=sources,
            files=sizes,
            metadata=metadata,
            layouts=layouts,
            **extra,
        )

    def summary(self) -> dict[str, Any]:
        """How the folder stores the checkpoint: its files, its tensors and their chunks
        (totals), and each tensor's layout (``"layouts"``, in the order of ``.metadata``)."""
        return {
            "files": dict(self.files),
            "tensors": len(self.layouts),
            "chunks": sum(t.chunks for t in self.layouts.values()),
            "sharded": sum(1 for t in self.layouts.values() if t.chunks > 1),
            "layouts": [t.to_json() for t in self.layouts.values()],
        }
