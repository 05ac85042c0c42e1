"""What a DCP folder's pickles say, as optckpt's own plain records.

:class:`Metadata` (a ``.metadata`` file: its entries, :class:`TensorEntry` with its
:class:`Chunk` list or :class:`BytesEntry`, and where each is :class:`Stored`) and
:class:`TensorRecord` (a tensor chunk's ``data.pkl``). They hold only ints, strings, tuples
and dtypes: nothing from ``torch.distributed``. Building them from the pickles, running
nothing the pickles name, is :mod:`optckpt.io.dcp.unpickle`, which re-exports them.

A dtype is kept as the file names it, a :class:`~optckpt.described.DType` (``described``),
so that reading a folder's structure never imports torch; ``dtype`` gives the torch dtype
(importing torch) to the code that makes tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from optckpt.described import DType

if TYPE_CHECKING:
    import torch


def _torch_dtype(described: DType) -> torch.dtype:
    import torch

    found: torch.dtype = getattr(torch, described.name)
    return found


@dataclass(frozen=True)
class Chunk:
    """One chunk of a tensor: where it starts in the whole tensor, and its sizes."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class TensorEntry:
    """A tensor of the checkpoint: its global size and dtype, and the chunks it is saved in."""

    size: tuple[int, ...]
    described: DType
    chunks: tuple[Chunk, ...]

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype (imports torch)."""
        return _torch_dtype(self.described)


@dataclass(frozen=True)
class BytesEntry:
    """A value that is not a tensor (a number, a list of names, ...), saved with torch.save."""


@dataclass(frozen=True)
class Stored:
    """Where one chunk or bytes entry is: a file of the folder, and a byte range in it.

    Attributes:
        transforms: torch's stream transforms (compression, ...) applied to the bytes.
        limit: for an entry with transforms, the most bytes its stream may give back: what
            ``.metadata`` declares it holds (a chunk's elements, a value's bound) and room
            for the records of its ``torch.save`` zip; more is refused, never read.
    """

    file: str
    offset: int
    length: int
    transforms: tuple[str, ...] = ()
    limit: int = 0


@dataclass(frozen=True)
class Metadata:
    """What a DCP folder's ``.metadata`` holds, as plain records.

    Attributes:
        entries: every flat key (``optim.state.encoder.weight.exp_avg``) and what it is, in
            the file's order.
        planner_data: each flat key's path in the saved state dict
            (``('optim', 'state', 'encoder.weight', 'exp_avg')``), where the file records it.
        storage: where each bytes entry (by ``(key, None)``) and each tensor chunk (by
            ``(key, chunk offsets)``) is stored.
        version: the DCP format version (``"1.0.0"``), ``None`` before torch 2.4.
    """

    entries: dict[str, TensorEntry | BytesEntry]
    planner_data: dict[str, tuple[str | int, ...]] | None
    storage: dict[tuple[str, tuple[int, ...] | None], Stored]
    version: str | None = None


@dataclass(frozen=True)
class TensorRecord:
    """What a chunk's ``data.pkl`` says: the storage record and how the tensor views it."""

    key: str
    described: DType
    storage_numel: int  # elements of the storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype (imports torch)."""
        return _torch_dtype(self.described)
