"""A DCP folder's structure read without torch, for ``inspect`` without ``--stats``.

What :func:`~optckpt.io.dcp.read_dcp` builds in ``"meta"`` mode, with a
:class:`~optckpt.described.DescribedTensor` wherever it makes a tensor, and without importing
torch:

* ``.metadata`` through the same restricted unpickler (:func:`read_metadata_file`), whose
  errors are the torch path's (it is its first step);
* each tensor of one or more dimensions a description on the ``meta`` device (shape and
  dtype, no data), as the torch path's ``meta`` placeholders;
* each 0-dim tensor (``step``) described from its chunk (a ``torch.save`` zip in a ``.distcp``
  file, found by :func:`~optckpt.io.dcp.storage.locate_chunk`) and read in place;
* each bytes entry (a small ``torch.save`` zip) through the structure reader's table
  (:func:`~optckpt.io.unpickle.describe_torch_pickle`) after the same scan of its pickle.

Whatever this reader does not model exactly gives ``None`` (the caller reads the folder with
torch, which gives the result, or the error, it always gave): ``--allow-global``, a value
whose pickle names a global beyond the table or holds a tensor of one or more dimensions, a
0-dim tensor of a dtype :meth:`~optckpt.described.DescribedTensor.item` does not decode, a
big-endian value, and any error past ``.metadata`` (a missing file, chunks that do not tile
their tensor, a corrupt value).
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from optckpt.described import (
    META,
    DescribedStorage,
    DescribedTensor,
    JoinedStorage,
    contiguous_strides,
)
from optckpt.errors import OptckptError
from optckpt.io.dcp.folder import DcpFolder, read_metadata_file, tensor_layouts
from optckpt.io.dcp.storage import Files, locate_chunk, open_entry
from optckpt.io.dcp.tree import build_tree
from optckpt.io.dcp.unpickle import BytesEntry, Metadata, TensorEntry
from optckpt.io.pickles import Refused, check_tree, scan_pickles
from optckpt.io.unpickle import (
    TORCH_ZIP_NAMES,
    BadPickle,
    RefusedGlobals,
    StorageClass,
    describe_torch_pickle,
)
from optckpt.io.zip_checks import record_start
from optckpt.locate import tensor_paths


class _NotModelled(Exception):
    """What this reader leaves to torch."""


def describe_dcp(
    path: str | Path, *, allow_globals: Iterable[str] = (), data: bool = False
) -> DcpFolder | None:
    """A DCP folder with its tensors described (see the module doc), or ``None``: read it
    with :func:`~optckpt.io.dcp.read_dcp` (``tensors="meta"``, or ``"lazy"`` for ``data``).

    With ``data`` (``convert`` to safetensors), every tensor is described where its bytes
    are, for a writer that copies them file to file (:func:`_in_place`); a tensor saved
    another way (compressed, a view that is not its chunk's storage in order, chunks that
    split another dimension than the first) makes it ``None``.

    Raises:
        UnreadableCheckpointError, UnsafeCheckpointError: ``.metadata`` refused, as
            :func:`~optckpt.io.dcp.read_dcp` refuses it.
    """
    if tuple(allow_globals):
        return None
    folder = Path(path)
    metadata = read_metadata_file(folder, {})
    try:
        return _describe(folder, metadata, data)
    except (_NotModelled, OptckptError):
        return None  # the torch path gives the result, or its own error


def _describe(folder: Path, metadata: Metadata, data: bool) -> DcpFolder:
    files = Files(folder)
    layouts = tensor_layouts(folder, metadata)

    def value(key: str) -> Any:
        entry = metadata.entries[key]
        if isinstance(entry, BytesEntry):
            stored = metadata.storage.get((key, None))
            if stored is None:
                raise _NotModelled(key)
            return _value(files, stored, key)
        if data:
            return _in_place(files, metadata, key, entry)
        if entry.size:
            return _placeholder(key, entry)
        return _scalar(files, metadata, key, entry)

    root = build_tree(str(folder), list(metadata.entries), metadata.planner_data, value)
    return DcpFolder.made(folder, metadata, root, sources=files.mapped, layouts=layouts)


def _placeholder(key: str, entry: TensorEntry) -> DescribedTensor:
    """A tensor of ``entry``'s shape and dtype on the ``meta`` device (contiguous strides)."""
    nbytes = math.prod(entry.size) * entry.described.itemsize
    storage = DescribedStorage(key, nbytes, "meta", 0)
    return DescribedTensor(
        entry.described, entry.size, contiguous_strides(entry.size), 0, storage, device=META
    )


def _scalar(files: Files, metadata: Metadata, key: str, entry: TensorEntry) -> DescribedTensor:
    """A 0-dim tensor described from its one chunk, its value read in place by ``item()``."""
    if len(entry.chunks) != 1 or not entry.described.format:
        raise _NotModelled(key)
    stored = metadata.storage[(key, entry.chunks[0].offsets)]
    mapped, record, start = locate_chunk(files, stored, key)
    if record.size != entry.chunks[0].sizes or record.described != entry.described:
        raise _NotModelled(key)  # the torch path says how they differ
    nbytes = record.storage_numel * record.described.itemsize
    storage = files.described(stored, record.key, nbytes, "cpu", start, mapped)
    return DescribedTensor(record.described, record.size, record.stride, record.offset, storage)


def _in_place(files: Files, metadata: Metadata, key: str, entry: TensorEntry) -> DescribedTensor:
    """A tensor described where its bytes are: one chunk's storage run, or the runs of its
    row chunks (split on dimension 0 only, as FSDP shards) joined in row order, each
    chunk's tensor the whole of its storage in row-major order (what ``dcp.save`` writes)."""
    runs = []
    chunks = sorted(entry.chunks, key=lambda c: c.offsets)
    rows = 0  # where the next chunk must start
    for chunk in chunks:
        if any(chunk.offsets[1:]) or chunk.sizes[1:] != entry.size[1:]:
            raise _NotModelled(key)  # a split of another dimension: gathered with torch
        if entry.size and 0 not in chunk.sizes:
            # Past check_chunks' pairwise limit, overlapping chunks whose sizes add up to the
            # tensor reach here; joined, they would shift every later row (the torch path
            # zero-fills the tensor and copies each chunk to its place).
            if chunk.offsets[0] != rows:
                raise _NotModelled(key)
            rows += chunk.sizes[0]
        stored = metadata.storage[(key, chunk.offsets)]
        if stored.transforms:
            raise _NotModelled(key)  # compressed: decompressed with torch
        mapped, record, start = locate_chunk(files, stored, key)
        size = record.described.itemsize * math.prod(chunk.sizes)
        if (
            record.size != chunk.sizes
            or record.described != entry.described
            or record.stride != contiguous_strides(chunk.sizes)
            or size != record.storage_numel * record.described.itemsize
        ):
            raise _NotModelled(key)  # not the storage in order: the torch path copies it
        begin = start + record.offset * record.described.itemsize
        runs.append(files.described(stored, record.key, size, "cpu", begin, mapped))
    if entry.size and 0 not in entry.size and rows != entry.size[0]:
        raise _NotModelled(key)
    if len(runs) == 1:
        storage = runs[0]
    else:
        total = sum(run.size for run in runs)
        storage = JoinedStorage(key, total, "cpu", 0, parts=tuple(runs))
    return DescribedTensor(entry.described, entry.size, contiguous_strides(entry.size), 0, storage)


def _value(files: Files, stored: Any, key: str) -> Any:
    """A bytes entry's value, with any tensor in it described (0-dim ones only)."""
    entry = open_entry(files, stored, key, value=True)
    try:
        scanned = scan_pickles(entry.pickle)
    except Refused as e:
        raise _NotModelled(key) from e
    if scanned.unsupported or any(g not in TORCH_ZIP_NAMES for g in scanned.globals):
        raise _NotModelled(key)  # torch's allow-list or refusal decides
    records = {i.filename: i for i in entry.infos}
    byteorder = records.get(f"{entry.prefix}byteorder")
    if byteorder is not None:
        begin = record_start(entry.mapped, entry.start, byteorder, entry.where)
        if entry.mapped[begin : begin + byteorder.file_size] != b"little":
            raise _NotModelled(key)
    storages: dict[str, DescribedStorage] = {}

    def storage(kind: StorageClass, name: str, location: str, nbytes: int) -> DescribedStorage:
        found = storages.get(name)
        if found is not None:
            return found  # torch keeps the storage first made for a key
        info = records.get(f"{entry.prefix}data/{name}")
        if info is None or info.file_size != nbytes or info.compress_type != zipfile.ZIP_STORED:
            raise BadPickle(f"storage {name}: no record of {nbytes} bytes")
        begin = record_start(entry.mapped, entry.start, info, entry.where)
        if begin + nbytes > entry.start + entry.length:
            raise BadPickle(f"storage {name}: runs past the end of the entry")
        storages[name] = files.described(stored, name, nbytes, location, begin, entry.mapped)
        return storages[name]

    try:
        root = describe_torch_pickle(entry.pickle, storage)
        check_tree(root)
    except (BadPickle, RefusedGlobals, Refused) as e:
        raise _NotModelled(key) from e
    for _, tensor in tensor_paths(root):
        assert isinstance(tensor, DescribedTensor)
        if tensor.dim() or not tensor.dtype.format:
            raise _NotModelled(key)  # compared by value when groups are rebuilt; torch reads it
    return root
