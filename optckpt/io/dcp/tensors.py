"""The tensors of a DCP checkpoint, made from their chunks: placeholders, real tensors, or
casts-style :class:`Assembled` values that the writers make one at a time.

A tensor is saved as chunks that tile it (``ChunkStorageMetadata``: offsets and sizes in the
whole tensor). FSDP2 shards dimension 0 with ``torch.chunk``, so 5 rows over 2 ranks are
chunks of 3 and 2 rows; a replicated tensor (``step``) is one chunk covering it all, saved by
one rank only (not necessarily rank 0). :class:`TensorSource` checks that the chunks tile the
tensor before anything is read (:func:`check_chunks`).
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import Any

import torch

from optckpt.errors import UnreadableCheckpointError
from optckpt.io.dcp.folder import check_chunks
from optckpt.io.dcp.storage import Files, raw_chunk, typed
from optckpt.io.dcp.unpickle import Chunk, Stored, TensorEntry
from optckpt.io.pages import trim_heap
from optckpt.io.torch_format import _DEFERRABLE, Deferred


@dataclass(frozen=True)
class Piece:
    """One chunk of a tensor and where it is stored."""

    chunk: Chunk
    stored: Stored


class TensorSource:
    """One tensor of the checkpoint: its entry, its chunks, and the files they are in."""

    def __init__(self, key: str, entry: TensorEntry, pieces: list[Piece], files: Files) -> None:
        self.key = key
        self.entry = entry
        self.pieces = pieces
        self.files = files
        self._checked_overlap = check_chunks(f"{files.folder}: {key}", entry)

    @property
    def numel(self) -> int:
        return math.prod(self.entry.size)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty(0, dtype=self.entry.dtype).element_size()

    @property
    def file_names(self) -> list[str]:
        """The files its chunks are in, in order of first use."""
        return list(dict.fromkeys(p.stored.file for p in self.pieces))

    def meta(self) -> torch.Tensor:
        """A tensor of its shape and dtype on the ``meta`` device (no data)."""
        return torch.empty(self.entry.size, dtype=self.entry.dtype, device="meta")

    def _whole(self) -> Piece | None:
        """The one piece that covers the whole tensor, if it is saved so."""
        if len(self.pieces) == 1 and self.pieces[0].chunk.sizes == self.entry.size:
            return self.pieces[0]
        return None

    def _raw(self, piece: Piece) -> tuple[torch.Tensor, Any, int]:
        raw, record, start = raw_chunk(self.files, piece.stored, self.key)
        if record.size != piece.chunk.sizes or record.dtype != self.entry.dtype:
            raise UnreadableCheckpointError(
                f"{self.files.folder}: {self.key}: the chunk at {list(piece.chunk.offsets)} "
                f"holds a {record.dtype} tensor of shape {list(record.size)}, .metadata says "
                f"{self.entry.dtype} of {list(piece.chunk.sizes)}"
            )
        return raw, record, start

    def load(self, *, align: bool = True) -> torch.Tensor:
        """The tensor. One chunk covering it all is a view of its file (copied only if
        misaligned and ``align``); a sharded tensor is assembled into new memory, each
        chunk's pages released once copied."""
        whole = self._whole()
        if whole is not None:
            raw, record, _ = self._raw(whole)
            return typed(raw, record, align=align)
        make = torch.empty if self._checked_overlap else torch.zeros
        out = make(self.entry.size, dtype=self.entry.dtype)
        for piece in self.pieces:
            if not math.prod(piece.chunk.sizes):
                continue
            raw, record, start = self._raw(piece)
            place = tuple(slice(o, o + s) for o, s in zip(piece.chunk.offsets, piece.chunk.sizes))
            dest = out[place]
            # FSDP2's row shards: read into place (from the file: not a compressed entry)
            if dest.is_contiguous() and _dense(record) and not piece.stored.transforms:
                self.files.read_into(piece.stored.file, start, _bytes_of(dest))
                continue
            _copy_into(dest, raw, record)
            if not piece.stored.transforms:  # a decompressed chunk's memory is freed with it
                mapped, first, length = self.files.window(piece.stored, self.key)
                self.files.drop(mapped, first, length)
        return out

    def lazy(self, casts: tuple[torch.dtype, ...] = ()) -> torch.Tensor | Assembled:
        """What a writer takes: :class:`Assembled` (made when written, then cast to each of
        ``casts`` in turn) where the writers can defer its dtype, else the tensor itself,
        cast now."""
        if self.numel and all(d in _DEFERRABLE for d in (self.entry.dtype, *casts)):
            return Assembled(self, casts)
        return self.cast(casts)

    def cast(self, casts: tuple[torch.dtype, ...] = ()) -> torch.Tensor:
        """The tensor read now (:meth:`load`), then ``.to(dtype)`` for each of ``casts``."""
        tensor = self.load()
        for dtype in casts:
            tensor = tensor.to(dtype=dtype)
        return tensor


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The writable bytes of a contiguous CPU tensor, valid while it lives. Not through
    ``.numpy()``: that marks its storage as never to be resized, and the DCP writer frees a
    tensor it has written by resizing its storage to nothing."""
    nbytes = tensor.numel() * tensor.element_size()
    return memoryview((ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())).cast("B")


def _dense(record: Any) -> bool:
    """Whether a chunk's tensor is its whole storage, row-major from the start."""
    stride = 1
    for size, st in zip(reversed(record.size), reversed(record.stride)):
        if size > 1 and st != stride:
            return False
        stride *= size
    return bool(record.offset == 0 and record.storage_numel == stride)


def _copy_into(dest: torch.Tensor, raw: torch.Tensor, record: Any) -> None:
    """Copy a chunk into its place. Byte for byte where both sides allow it, so that a
    misaligned chunk is never read as its dtype; else through an aligned copy."""
    src = typed(raw, record, align=False)
    if src.dim() and src.is_contiguous() and dest.stride(-1) == 1:
        try:
            dest.view(torch.uint8).copy_(src.view(torch.uint8))
            return
        except RuntimeError:
            pass  # a view torch cannot reinterpret as bytes
    dest.copy_(typed(raw, record, align=True))


class Assembled(Deferred):
    """A DCP tensor made only when a writer writes it (see
    :class:`optckpt.io.torch_format.Deferred`): peak memory is the largest tensor, not all.

    One chunk covering the whole tensor, dense on its storage, is handed to the writer as a
    view of its file (the writer copies its bytes in the kernel and releases the pages, via
    :attr:`source`); chunks are assembled into new memory. With ``casts`` (``move --dtype``,
    ``remap`` to a layout of another dtype) the tensor made is then ``.to(dtype)`` of each in
    turn, as the command would have cast the tensor read up front.
    """

    __slots__ = ("_casts", "_source_of")

    def __init__(self, source: TensorSource, casts: tuple[torch.dtype, ...] = ()) -> None:
        # Deferred's checks do not apply: its source is a tensor, this one's its chunks
        self._source_of = source
        self._casts = tuple(casts)
        self.dtype = self._casts[-1] if self._casts else source.entry.dtype
        self._meta = torch.empty(source.entry.size, dtype=self.dtype, device="meta")
        # What the writers release after writing it (an empty tensor: nothing yet).
        self.source = torch.empty(0, dtype=source.entry.dtype)

    def materialize(self) -> torch.Tensor:
        """Make the tensor: contiguous, owning exactly its storage (as a writer records it)."""
        if self._casts:  # read aligned (a cast reads it as its dtype), then cast
            read = self._source_of.load()
            if self._in_file():
                self.source = read  # a view of the file: the writer releases its pages
            made = read.contiguous()
            del read
            for dtype in self._casts:  # each differs from the one before: a new tensor
                made = made.to(dtype=dtype)
            if not self._in_file():  # what was made for the cast is freed: give its memory
                trim_heap()  # back now, not at the writer's next trim, which counts casts only
            return made
        made = self._source_of.load(align=False)
        exact = (
            made.storage_offset() == 0
            and made.is_contiguous()
            and made.untyped_storage().nbytes() == made.numel() * made.element_size()
        )
        if not exact:  # a view of part of its storage: aligned copy
            made = self._source_of.load(align=True).contiguous().clone()
        elif self._in_file():
            self.source = made  # a view of the file: the writer releases its pages
        return made

    def _in_file(self) -> bool:
        """Whether the tensor is read as a view of its (mapped) file: one chunk covers it,
        stored as it is. Only such a view is kept (as :attr:`source`) after writing: a
        decompressed chunk's memory must go with the tensor made from it."""
        whole = self._source_of._whole()
        return whole is not None and not whole.stored.transforms
