"""The pickles of a DCP folder, read without importing or calling anything they name.

A DCP folder holds two kinds of pickle. torch reads both with code this module replaces:

* ``.metadata``: torch loads it with plain ``pickle.load`` (its weights-only unpickler
  rejects the ``FRAME`` opcode that protocol 4 writes). Its dataclasses
  (``Metadata``, ``TensorStorageMetadata``, ``MetadataIndex``, ``_StorageInfo``, ...) are
  pickled as ``NEWOBJ`` of the class with no arguments, then ``BUILD`` with a state dict
  (``TensorProperties``: a state tuple); ``torch.Size`` and the memory-format enum as
  ``REDUCE`` with their arguments, the dtype as the global ``torch.float32`` itself, the
  layout as ``torch.serialization._get_layout('torch.strided')``, the checkpoint's path as
  ``pathlib.PosixPath(*parts)``. :func:`read_metadata` maps exactly those globals
  (:data:`METADATA_GLOBALS`) to optckpt's own records (:class:`Metadata`, ...): nothing is
  imported from ``torch.distributed``, and every other global is refused with its name.
* each tensor chunk in a ``.distcp`` file is a whole ``torch.save`` zip of one tensor; its
  ``data.pkl`` names ``torch._utils._rebuild_tensor_v2`` (or ``_v3``), a storage class and
  ``collections.OrderedDict``. :func:`read_tensor_pickle` maps those to a
  :class:`TensorRecord` that says where the data is; the caller makes the tensor from the
  memory-mapped file.

Before either is unpickled, :func:`~optckpt.io.dcp.scan.scan` reads its opcodes for the
globals it names and how deep it nests. The records are :mod:`optckpt.io.dcp.records`
(re-exported here).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from optckpt.described import DTYPES, DType
from optckpt.io.dcp.records import (  # re-exported (__all__): the records live there
    BytesEntry,
    Chunk,
    Metadata,
    Stored,
    TensorEntry,
    TensorRecord,
)
from optckpt.io.dcp.scan import scan
from optckpt.io.pickles import MAX_PICKLE_BYTES, why_dangerous
from optckpt.io.unpickle import (
    DTYPE_GLOBALS,
    STORAGE_CLASSES,
    UNTYPED_STORAGES,
    BadPickle,
    RefusedGlobals,
    unpickle,
)

# --------------------------------------------------------------------------- stand-ins
# What the allowed globals become while unpickling: objects that take in their pickled state
# and nothing else. They are checked and turned into the records (optckpt.io.dcp.records) once
# loading is done.


class _Pickled:
    """An object built by ``NEWOBJ`` (no arguments) and ``BUILD`` (its state)."""

    state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _PickledMetadata(_Pickled):
    pass


class _PickledTensor(_Pickled):
    pass


class _PickledBytes(_Pickled):
    pass


class _PickledChunk(_Pickled):
    pass


class _PickledProperties(_Pickled):
    pass


class _PickledIndex(_Pickled):
    pass


class _PickledStorageInfo(_Pickled):
    pass


class _PickledStorageMeta(_Pickled):
    pass


def _size(values: Any = ()) -> tuple[int, ...]:
    """``torch.Size(values)``, as a tuple of non-negative ints."""
    if not isinstance(values, (tuple, list)) or not all(type(v) is int and v >= 0 for v in values):
        raise BadPickle("a torch.Size that is not a sequence of non-negative ints")
    return tuple(values)


_LAYOUTS = {"torch.strided", "torch.sparse_coo", "torch.sparse_csr", "torch.jagged"}


def _layout(name: Any) -> str:
    """``torch.serialization._get_layout(name)``: the layout's name (only strided is read)."""
    if name not in _LAYOUTS:
        raise BadPickle(f"unknown layout {name!r}")
    return str(name)


def _memory_format(value: Any) -> int:
    """The ``_MEM_FORMAT_ENCODING`` enum member of ``value`` (0 to 3), as its number."""
    if type(value) is not int or not 0 <= value <= 3:
        raise BadPickle(f"unknown memory format {value!r}")
    return value


def _path(*parts: Any) -> str:
    """A ``pathlib`` path, as the string it names (only shown, never opened)."""
    if not all(isinstance(p, str) for p in parts):
        raise BadPickle("a path whose parts are not strings")
    return "/".join(parts).replace("//", "/") or "."


# torch's other names of its dtypes (torch.float is torch.float32): a pickle of a dtype names
# the canonical one, but torch's own unpickling accepts these too.
_ALIASES = {
    "float": "float32", "double": "float64", "half": "float16", "cfloat": "complex64",
    "cdouble": "complex128", "chalf": "complex32", "long": "int64", "int": "int32",
    "short": "int16", "bit": "uint1",
}  # fmt: skip
_DTYPES: dict[str, DType] = {
    **DTYPE_GLOBALS,
    **{f"torch.{alias}": DTYPES[name] for alias, name in _ALIASES.items()},
}
"""Every ``torch.<dtype>`` global (aliases too), as the :class:`DType` it names."""

_DCP = "torch.distributed.checkpoint"
_SHARD = "torch.distributed._shard.sharded_tensor.metadata"
_PATHS = ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path")

METADATA_GLOBALS: dict[str, Any] = {
    f"{_DCP}.metadata.Metadata": _PickledMetadata,
    f"{_DCP}.metadata.TensorStorageMetadata": _PickledTensor,
    f"{_DCP}.metadata.BytesStorageMetadata": _PickledBytes,
    f"{_DCP}.metadata.ChunkStorageMetadata": _PickledChunk,
    f"{_DCP}.metadata.TensorProperties": _PickledProperties,
    f"{_DCP}.metadata.MetadataIndex": _PickledIndex,
    f"{_DCP}.metadata.StorageMeta": _PickledStorageMeta,
    f"{_DCP}.metadata._MEM_FORMAT_ENCODING": _memory_format,
    f"{_DCP}.filesystem._StorageInfo": _PickledStorageInfo,
    # torch < 2.2 kept these two in the ShardedTensor metadata module
    f"{_SHARD}.TensorProperties": _PickledProperties,
    f"{_SHARD}.MEM_FORMAT_ENCODING": _memory_format,
    "torch.Size": _size,
    "torch.serialization._get_layout": _layout,
    **{f"pathlib.{name}": _path for name in _PATHS},
    **{f"pathlib._local.{name}": _path for name in _PATHS},  # Python 3.13
    **_DTYPES,
}
"""The globals a ``.metadata`` may name, and what each becomes (DESIGN.md, "Distributed
checkpoints"): DCP's metadata classes and the enum of memory formats, ``torch.Size``, the
dtypes, ``torch.serialization._get_layout``, ``pathlib`` paths, and the names torch < 2.2 used."""


@dataclass(frozen=True)
class _StorageClass:
    """A storage class in a persistent ID (``torch.FloatStorage``): the dtype it holds, or
    ``None`` for ``UntypedStorage`` (whose tensors ``_rebuild_tensor_v3`` types)."""

    dtype: DType | None


# Storage classes of torch.save's persistent IDs, by the dtype they hold.
_STORAGES: dict[str, DType] = {name: DTYPES[dtype] for name, dtype in STORAGE_CLASSES.items()}


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: DType | None  # None: an UntypedStorage (numel in bytes), typed by _v3
    numel: int


def _rebuild(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> TensorRecord:
    """``_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])``."""
    return _record(storage, offset, size, stride, None)


def _rebuild_v3(
    storage: Any, offset: Any, size: Any, stride: Any, grad: Any, hooks: Any, dtype: Any, *rest: Any
) -> TensorRecord:
    """``_rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype[, ...])``."""
    if not isinstance(dtype, DType):
        raise BadPickle("a tensor whose dtype is not a torch dtype")
    return _record(storage, offset, size, stride, dtype)


def _record(storage: Any, offset: Any, size: Any, stride: Any, dtype: DType | None) -> TensorRecord:
    if not isinstance(storage, _StorageRef):
        raise BadPickle("a tensor without a storage")
    if type(offset) is not int or offset < 0:
        raise BadPickle("a tensor with a negative storage offset")
    size, stride = _size(size), _size(stride)
    if len(size) != len(stride):
        raise BadPickle("a tensor whose size and stride differ in length")
    dtype = dtype if dtype is not None else storage.dtype
    if dtype is None:
        raise BadPickle("an untyped storage outside _rebuild_tensor_v3")
    numel = storage.numel
    if storage.dtype is None:  # UntypedStorage: numel counts bytes
        numel //= dtype.itemsize
    return TensorRecord(storage.key, dtype, numel, offset, size, stride)


def _ordered_dict(*args: Any) -> dict[Any, Any]:
    """``collections.OrderedDict()``: a tensor's backward hooks, always empty in a file."""
    if args:
        raise BadPickle("a tensor saved with backward hooks")
    return {}


TENSOR_GLOBALS: dict[str, Any] = {
    "torch._utils._rebuild_tensor_v2": _rebuild,
    "torch._utils._rebuild_tensor_v3": _rebuild_v3,
    "collections.OrderedDict": _ordered_dict,
    **{name: _StorageClass(dtype) for name, dtype in _STORAGES.items()},
    **dict.fromkeys(UNTYPED_STORAGES, _StorageClass(None)),
    **_DTYPES,
}
"""The globals a tensor chunk's ``data.pkl`` may name (what ``torch.save`` of one dense tensor
writes), and what each becomes."""


# --------------------------------------------------------------------------- unpickling


def _load(
    data: bytes,
    table: Mapping[str, Any],
    persistent: Callable[[Any], Any] | None = None,
) -> Any:
    """Scan, check the globals against ``table``, then unpickle with only ``table``'s globals."""
    refused = [g for g in scan(data) if g not in table]
    if refused:
        raise RefusedGlobals(refused)
    return unpickle(data, table, persistent)


def dangerous(names: Sequence[str]) -> list[tuple[str, str]]:
    """Each global of ``names`` that can run code, with why (see
    :func:`optckpt.io.pickles.why_dangerous`)."""
    return [(n, why) for n in names if (why := why_dangerous(n))]


# --------------------------------------------------------------------------- .metadata


def read_metadata(data: bytes, allowed: Mapping[str, Any] | None = None) -> Metadata:
    """Unpickle a ``.metadata`` file's bytes into a :class:`Metadata`, running nothing in it.

    Args:
        data: the file's bytes.
        allowed: further ``{"module.Name": object}`` to let through, as ``--allow-global``
            does for torch files (the object is what the pickle gets).

    Raises:
        RefusedGlobals: the pickle names globals outside :data:`METADATA_GLOBALS` and
            ``allowed``.
        BadPickle: the pickle is corrupt, too deep, or not DCP metadata.
    """
    loaded = _load(data, {**METADATA_GLOBALS, **(allowed or {})})
    if not isinstance(loaded, _PickledMetadata) or not isinstance(loaded.state, dict):
        raise BadPickle("not torch.distributed.checkpoint metadata")
    state = loaded.state
    entries = _entries(state.get("state_dict_metadata"))
    planner = _planner_data(state.get("planner_data"), entries)
    storage = _limited(_storage(state.get("storage_data")), entries)
    version = state.get("version")
    return Metadata(entries, planner, storage, version if isinstance(version, str) else None)


ZIP_ROOM = 1 << 20
"""Bytes a decompressed chunk may hold beyond its tensor's: the records of a ``torch.save``
zip of one tensor (headers, ``data.pkl``, alignment; a few KiB in practice)."""


def _limited(
    storage: dict[tuple[str, tuple[int, ...] | None], Stored],
    entries: Mapping[str, TensorEntry | BytesEntry],
) -> dict[tuple[str, tuple[int, ...] | None], Stored]:
    """Each transformed entry with the most bytes its stream may give back (``Stored.limit``):
    a value, :data:`MAX_PICKLE_BYTES`; a chunk, its declared elements and :data:`ZIP_ROOM`."""
    for (key, offsets), stored in storage.items():
        if not stored.transforms:
            continue
        entry = entries.get(key)
        limit = MAX_PICKLE_BYTES
        if isinstance(entry, TensorEntry):
            sizes = next((c.sizes for c in entry.chunks if c.offsets == offsets), ())
            limit = math.prod(sizes) * entry.described.itemsize + ZIP_ROOM
        storage[(key, offsets)] = replace(stored, limit=limit)
    return storage


def _fields(obj: Any, what: str) -> dict[str, Any]:
    """The pickled state dict of a stand-in (``{}`` when it was never built)."""
    if obj.state is None:
        return {}
    if not isinstance(obj.state, dict):
        raise BadPickle(f"{what} whose state is not a dict")
    return obj.state


def _entries(raw: Any) -> dict[str, TensorEntry | BytesEntry]:
    if not isinstance(raw, dict):
        raise BadPickle("state_dict_metadata is not a dict")
    entries: dict[str, TensorEntry | BytesEntry] = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise BadPickle(f"a key that is not a string: {key!r}")
        if isinstance(value, _PickledBytes):
            entries[key] = BytesEntry()
        elif isinstance(value, _PickledTensor):
            entries[key] = _tensor_entry(key, _fields(value, "a tensor entry"))
        else:
            raise BadPickle(f"{key}: neither a tensor nor a bytes entry")
    return entries


def _tensor_entry(key: str, fields: dict[str, Any]) -> TensorEntry:
    properties = fields.get("properties")
    if not isinstance(properties, _PickledProperties):
        raise BadPickle(f"{key}: a tensor entry without properties")
    state = properties.state
    dtype = (
        state[0] if isinstance(state, tuple) and state else _fields(properties, key).get("dtype")
    )
    if not isinstance(dtype, DType):
        raise BadPickle(f"{key}: a tensor entry without a dtype")
    size = fields.get("size")
    if not isinstance(size, tuple):
        raise BadPickle(f"{key}: a tensor entry without a size")
    chunks = []
    for chunk in fields.get("chunks") or []:
        if not isinstance(chunk, _PickledChunk):
            raise BadPickle(f"{key}: a chunk that is not ChunkStorageMetadata")
        c = _fields(chunk, "a chunk")
        offsets, sizes = c.get("offsets"), c.get("sizes")
        if not isinstance(offsets, tuple) or not isinstance(sizes, tuple):
            raise BadPickle(f"{key}: a chunk without offsets and sizes")
        chunks.append(Chunk(offsets, sizes))
    return TensorEntry(size, dtype, tuple(chunks))


def _planner_data(raw: Any, entries: Mapping[str, Any]) -> dict[str, tuple[str | int, ...]] | None:
    if not isinstance(raw, dict):
        return None  # absent (older torch) or not the mapping DefaultSavePlanner writes
    paths: dict[str, tuple[str | int, ...]] = {}
    for key, path in raw.items():
        if key not in entries:
            continue
        if not (
            isinstance(path, tuple)
            and path
            and all(isinstance(p, str) or type(p) is int for p in path)
        ):
            return None
        paths[key] = path
    return paths if len(paths) == len(entries) else None


def _storage(raw: Any) -> dict[tuple[str, tuple[int, ...] | None], Stored]:
    if not isinstance(raw, dict):
        raise BadPickle("storage_data is not a dict")
    storage: dict[tuple[str, tuple[int, ...] | None], Stored] = {}
    for index, info in raw.items():
        if not isinstance(index, _PickledIndex) or not isinstance(info, _PickledStorageInfo):
            raise BadPickle("storage_data is not MetadataIndex -> _StorageInfo")
        i, s = _fields(index, "a MetadataIndex"), _fields(info, "a _StorageInfo")
        fqn, offset = i.get("fqn"), i.get("offset")
        if not isinstance(fqn, str) or not (offset is None or isinstance(offset, tuple)):
            raise BadPickle("a MetadataIndex without a key")
        file, start, length = s.get("relative_path"), s.get("offset"), s.get("length")
        transforms = s.get("transform_descriptors") or ()
        if not (
            isinstance(file, str)
            and type(start) is int
            and type(length) is int
            and start >= 0
            and length >= 0
            and isinstance(transforms, (list, tuple))
            and all(isinstance(t, str) for t in transforms)
        ):
            raise BadPickle(f"{fqn}: a _StorageInfo without a file, offset and length")
        storage[(fqn, offset)] = Stored(file, start, length, tuple(transforms))
    return storage


# --------------------------------------------------------------------------- tensor chunks


def read_tensor_pickle(data: bytes) -> TensorRecord:
    """Unpickle the ``data.pkl`` of a chunk (``torch.save`` of one tensor) into a
    :class:`TensorRecord`, running nothing in it.

    Raises:
        RefusedGlobals: it names globals outside :data:`TENSOR_GLOBALS`.
        BadPickle: it is corrupt, or not one dense tensor on one storage.
    """

    def storage(pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise BadPickle("a persistent ID that is not a storage")
        _, kind, key, _location, numel = pid
        if not isinstance(kind, _StorageClass):
            raise BadPickle("a storage of an unknown class")
        if not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise BadPickle("a storage without a key and size")
        return _StorageRef(key, kind.dtype, numel)

    loaded = _load(data, TENSOR_GLOBALS, storage)
    if not isinstance(loaded, TensorRecord):
        raise BadPickle("a chunk that is not one tensor")
    return loaded


__all__ = [
    "METADATA_GLOBALS",
    "TENSOR_GLOBALS",
    "BadPickle",
    "BytesEntry",
    "Chunk",
    "Metadata",
    "RefusedGlobals",
    "Stored",
    "TensorEntry",
    "TensorRecord",
    "dangerous",
    "read_metadata",
    "read_tensor_pickle",
    "scan",
]
