"""Reading a DCP folder (``.metadata`` + ``__R_N.distcp``) into a checkpoint tree.

Three ways to take its tensors (:data:`Tensors`):

* ``"load"``: real tensors, for commands that compute on them. One chunk covering a tensor is
  a view of its file (copied if misaligned, see :mod:`optckpt.io.dcp.storage`); a sharded
  tensor is assembled from its chunks into new memory;
* ``"lazy"``: for writers (``convert``): every tensor a writer can defer is an
  :class:`~optckpt.io.dcp.tensors.Assembled`, made only when its turn to be written comes;
  peak memory is the largest tensor;
* ``"meta"``: for ``inspect`` without ``--stats``: tensors on the ``meta`` device (shape and
  dtype only), except 0-dim ones (``step``), which are read. Nothing else of the ``.distcp``
  files is touched; :meth:`DcpCheckpoint.real` reads a placeholder's tensor when asked.

Bytes entries (hyperparameters, ``params`` lists, other values) are read in every mode.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from optckpt.errors import UnreadableCheckpointError
from optckpt.io.dcp import METADATA as METADATA  # re-exported: defined with is_dcp
from optckpt.io.dcp import is_dcp as is_dcp
from optckpt.io.dcp.folder import DcpFolder, stored_chunks, tensor_layouts
from optckpt.io.dcp.folder import TensorLayout as TensorLayout  # re-exported
from optckpt.io.dcp.folder import read_metadata_file as read_metadata_file  # re-exported
from optckpt.io.dcp.storage import Files, load_bytes
from optckpt.io.dcp.tensors import Piece, TensorSource
from optckpt.io.dcp.tree import build_tree
from optckpt.io.dcp.unpickle import BytesEntry, Metadata
from optckpt.io.read import resolve_globals

Tensors = Literal["load", "lazy", "meta"]


@dataclass
class DcpCheckpoint(DcpFolder):
    """A :class:`~optckpt.io.dcp.folder.DcpFolder` with its tensors (see the module doc)."""

    _sources: dict[int, tuple[torch.Tensor, TensorSource]] = field(default_factory=dict, repr=False)
    # The casts a placeholder made by later() stands for, in order, by its id.
    _casts: dict[int, tuple[torch.dtype, ...]] = field(default_factory=dict, repr=False)

    def resolved(self, tree: Any, *, lazy: bool) -> Any:
        """``tree`` (this checkpoint's, or made from it, e.g. rekeyed) with every ``meta``
        placeholder replaced: by what a writer makes when it writes it (``lazy``, see
        :meth:`~optckpt.io.dcp.tensors.TensorSource.lazy`), else by its tensor, read now.
        Containers are rebuilt; other values are kept as they are."""
        if isinstance(tree, Mapping):
            return {k: self.resolved(v, lazy=lazy) for k, v in tree.items()}
        if isinstance(tree, list):
            return [self.resolved(v, lazy=lazy) for v in tree]
        if isinstance(tree, tuple):
            return tuple(self.resolved(v, lazy=lazy) for v in tree)
        found = self._sources.get(id(tree))
        if found is None or found[0] is not tree:
            return tree
        source, casts = found[1], self._casts.get(id(tree), ())
        if not lazy:
            return source.cast(casts)
        for piece in source.pieces:  # mapped now, so that writers find the mappings
            if not piece.stored.transforms:  # (a compressed one is decompressed when read)
                source.files.window(piece.stored, source.key)
        return source.lazy(casts)

    def real(self, tensor: Any) -> Any:
        """The tensor a ``meta`` placeholder stands for, read now (other values as they are)."""
        found = self._sources.get(id(tensor))
        if found is None or found[0] is not tensor:
            return tensor
        return found[1].cast(self._casts.get(id(tensor), ()))

    def later(self, tensor: Any, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """For a ``meta`` placeholder: a placeholder of ``tensor.to(dtype)``, whose tensor is
        read and cast only when it is written (:meth:`resolved`), or ``tensor`` itself when
        ``dtype`` is ``None`` or its own; ``None`` for any other value (a real tensor)."""
        found = self._sources.get(id(tensor))
        if found is None or found[0] is not tensor:
            return None
        if dtype is None or dtype == tensor.dtype:
            return tensor
        cast = torch.empty(tensor.shape, dtype=dtype, device="meta")
        self._sources[id(cast)] = (cast, found[1])
        self._casts[id(cast)] = (*self._casts.get(id(tensor), ()), dtype)
        return cast

    def layout_of(self, tensor: Any) -> TensorLayout | None:
        """How the tensor (a value of this checkpoint's tree, read in ``"meta"`` mode) is
        saved, or ``None``."""
        found = self._sources.get(id(tensor))
        if found is None or found[0] is not tensor:
            return None
        return self.layouts.get(found[1].key)


def _sources(folder: Path, metadata: Metadata, files: Files) -> dict[str, TensorSource]:
    """Every tensor's chunks, each found in ``storage_data``; chunks checked to tile it."""
    return {
        key: TensorSource(key, entry, [Piece(chunk, stored) for chunk, stored in pieces], files)
        for key, entry, pieces in stored_chunks(folder, metadata)
    }


def read_dcp(
    path: str | Path,
    *,
    allow_globals: Iterable[str] = (),
    allowed: Sequence[tuple[Any, str]] | None = None,
    tensors: Tensors = "load",
) -> DcpCheckpoint:
    """Read a DCP folder into a checkpoint tree (see the module doc for ``tensors``).

    Args:
        path: the folder (holding ``.metadata``).
        allow_globals: ``module.Name`` globals to let through, as ``--allow-global`` does for
            torch files; or ``allowed``, already resolved by
            :func:`optckpt.io.read.resolve_globals`.
        tensors: ``"load"``, ``"lazy"`` or ``"meta"``.

    Raises:
        UnreadableCheckpointError: a missing or truncated file, a corrupt entry, chunks that
            do not tile their tensor, or an entry stored with an extension optckpt does not
            read (compression).
        UnsafeCheckpointError: ``.metadata`` or a value names globals outside the allow-list.
        UsageError: an ``allow_globals`` entry that cannot be imported.
    """
    folder = Path(path)
    if allowed is None:
        allowed = resolve_globals(allow_globals)
    by_name = {name: obj for obj, name in allowed}
    metadata = read_metadata_file(folder, by_name)
    files = Files(folder)
    layouts = tensor_layouts(folder, metadata)
    sources = _sources(folder, metadata, files)
    if tensors == "lazy":  # mapped before writing starts, so writers find the mappings
        for source in sources.values():
            for piece in source.pieces:
                if not piece.stored.transforms:  # decompressed when read
                    files.window(piece.stored, source.key)
    placeholders: dict[int, tuple[torch.Tensor, TensorSource]] = {}

    def value(key: str) -> Any:
        entry = metadata.entries[key]
        if isinstance(entry, BytesEntry):
            stored = metadata.storage.get((key, None))
            if stored is None:
                raise UnreadableCheckpointError(f"{folder}: .metadata says where no {key} is")
            return load_bytes(files, stored, key, by_name)
        source = sources[key]
        if tensors == "lazy":
            return source.lazy()
        if tensors == "meta" and source.entry.size:
            placeholder = source.meta()
            placeholders[id(placeholder)] = (placeholder, source)
            return placeholder
        return source.load()

    root = build_tree(str(folder), list(metadata.entries), metadata.planner_data, value)
    return DcpCheckpoint.made(
        folder, metadata, root, sources=files.mapped, layouts=layouts, _sources=placeholders
    )
