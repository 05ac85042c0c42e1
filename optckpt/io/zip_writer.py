"""Writing ``torch.save``'s format without torch, for trees of described tensors.

``convert`` of a file or DCP folder whose tensors are described (:mod:`optckpt.described`)
writes a ``.pt`` file without importing torch and without making a tensor: each storage's
bytes are copied from its file in the kernel (:mod:`optckpt.io.runs`), and the pickle and
the zip around them are written here, byte for byte as ``torch.save`` (torch 2.13) writes
them for the tensors ``torch.load`` would make of the same file:

* ``data.pkl``: protocol 2, torch's persistent IDs for storages (keys ``"0"``, ``"1"``... in
  order of first use, one per storage), ``_rebuild_tensor_v2`` with a typed storage class
  (``_rebuild_tensor_v3`` with ``UntypedStorage`` and the dtype for torch's newer dtypes),
  ``_rebuild_parameter`` for a parameter;
* the zip of torch's writer (``caffe2/serialize/inline_container.cc`` on miniz): records
  stored, named ``archive/...``, each one's data 64-byte aligned by an ``FB`` extra field, a
  data descriptor after the data, ZIP64 fields where a size or offset reaches 4 GiB, and the
  records in torch's order (``data.pkl``, ``.format_version``, ``.storage_alignment``,
  ``byteorder``, ``data/*``, ``version``, ``.data/serialization_id``).

One thing differs: torch derives ``.data/serialization_id`` from a hash of the record names
that depends on its C++ library; optckpt writes 40 digits derived from the names and CRC32s
of the records (torch only reads it back as an identifier). ``tests/test_zip_writer.py``
compares every other byte with torch's output.

Each record's CRC32 is computed from the input file in a second thread while the first copies
(``zlib.crc32`` releases the GIL): the data descriptor after the data carries it.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import struct
import sys
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from optckpt.described import DescribedStorage, DescribedTensor, DType, Run, runs
from optckpt.io.outfile import (
    end_output,
    open_output,
    recorded_location,
    storage_locations,
    write_all,
)
from optckpt.io.runs import Files, copy_runs, crc32_runs, read_runs
from optckpt.io.unpickle import STORAGE_CLASSES
from optckpt.locate import KeyPath

ARCHIVE = "archive"
"""The folder of every record: what torch's writer names it when it writes to a file object."""
ALIGNMENT = 64  # torch.serialization._get_storage_alignment()'s default
_VERSION = "3\n"  # kProducedFileFormatVersion, the "version" record
_BUFFER = 1024 * 1024  # bytes of headers and small records gathered per write
_SMALL = 1024 * 1024  # storages smaller than this are read and checksummed in place, not copied
_ZIP64_AT = 0xFFFFFFFF  # sizes and offsets from here on take ZIP64 fields (miniz: >= UINT32_MAX)

# ---------------------------------------------------------------------------------- the pickle

_STORAGE_CLASS = {dtype: name for name, dtype in STORAGE_CLASSES.items()}
# dtypes torch pickles as an UntypedStorage and _rebuild_tensor_v3 (torch.storage._new_dtypes)
_UNTYPED = frozenset({
    "float8_e5m2", "float8_e4m3fn", "float8_e5m2fnuz", "float8_e4m3fnuz", "float8_e8m0fnu",
    "float4_e2m1fn_x2", "bits8", "bits16", "bits1x8", "bits2x4", "bits4x2", "complex32",
    "uint16", "uint32", "uint64",
})  # fmt: skip
_PLAIN = (str, bytes, int, float, bool, type(None))


class _Global:
    """A module-level name, pickled as ``GLOBAL module name`` without importing the module."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str) -> None:
        self.module = module
        self.name = name

    def __call__(self, *args: Any) -> Any:  # pickle's save_reduce asks for a callable
        raise TypeError(f"{self.module}.{self.name} is only a name here")


_GLOBALS: dict[str, _Global] = {}


def _named(full: str) -> _Global:
    """One :class:`_Global` per name, so that the pickle memoizes it as torch's does."""
    if full not in _GLOBALS:
        module, _, name = full.rpartition(".")
        _GLOBALS[full] = _Global(module, name)
    return _GLOBALS[full]


def writable(tree: Any) -> bool:
    """Whether :func:`write_described` can write ``tree``: described tensors of the dtypes
    ``torch.save`` writes through ``_rebuild_tensor_v2`` or ``_v3``, dtypes, and dicts,
    ordered dicts, lists, tuples, strings, bytes, numbers, booleans and ``None``."""
    stack = [tree]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if isinstance(node, (*_PLAIN, DType)):
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, DescribedTensor):
            if node.dtype.name not in _STORAGE_CLASS and node.dtype.name not in _UNTYPED:
                return False
        elif type(node) is dict or isinstance(node, OrderedDict):
            stack.extend(node.keys())
            stack.extend(node.values())
            stack.extend(getattr(node, "__dict__", {}).values())
        elif type(node) in (list, tuple):
            stack.extend(node)
        else:
            return False
    return True


@dataclass(frozen=True)
class _StorageArg:
    """The storage argument of one pickled tensor, as torch makes a fresh ``TypedStorage``
    (or passes the ``UntypedStorage``) each time; its persistent ID names the storage."""

    storage: DescribedStorage
    dtype: DType


class _Storages:
    """The storages a pickle names, keyed as ``torch.save`` keys them."""

    def __init__(self, locations: Mapping[Any, str]) -> None:
        self.keys: dict[DescribedStorage, str] = {}  # in order of first use
        self._dtypes: dict[DescribedStorage, str] = {}
        self._locations = locations

    def persistent_id(self, arg: _StorageArg) -> tuple[Any, ...]:
        storage, dtype = arg.storage, arg.dtype
        untyped = dtype.name in _UNTYPED
        stored = "uint8" if untyped else dtype.name
        if storage.size and self._dtypes.setdefault(storage, stored) != stored:
            raise RuntimeError(  # torch.save's words
                "Cannot save multiple tensors or storages that view the same data as "
                "different types"
            )
        key = self.keys.setdefault(storage, str(len(self.keys)))
        location = recorded_location(storage, self._locations)
        if untyped:
            return ("storage", _named("torch.storage.UntypedStorage"), key, location,
                    storage.size)  # fmt: skip
        kind = _named(_STORAGE_CLASS[dtype.name])
        return ("storage", kind, key, location, storage.size // dtype.itemsize)


# Python's pickler written in Python; typeshed leaves out what a subclass extends it by
# (dispatch, save_reduce, memoize, write), so it is typed as Any here.
_PurePickler: Any = pickle._Pickler


class _Pickler(_PurePickler):  # type: ignore[misc]
    """Python's own pickler, taught the stand-ins of this module (a :class:`_Global` is
    written by name, never imported) and the batching of ``pickle.Pickler`` (C), which
    ``torch.save`` uses, where the two differ (exact dicts and lists)."""

    dispatch: ClassVar[dict[type, Callable[..., None]]] = dict(_PurePickler.dispatch)

    def __init__(self, file: io.BytesIO, storages: _Storages) -> None:
        super().__init__(file, protocol=2)
        self._storages = storages

    def persistent_id(self, obj: Any) -> Any:
        return self._storages.persistent_id(obj) if isinstance(obj, _StorageArg) else None

    def _save_global(self, obj: _Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("ascii"))
        self.memoize(obj)

    def _save_dtype(self, obj: DType) -> None:  # torch.float32.__reduce__() is "float32"
        self.write(pickle.GLOBAL + f"torch\n{obj.name}\n".encode("ascii"))
        self.memoize(obj)

    def _save_tensor(self, t: DescribedTensor) -> None:
        if t.parameter:  # Parameter.__reduce_ex__: its .data, a tensor without grad
            data = replace(t, requires_grad=False, parameter=False)
            args: tuple[Any, ...] = (data, t.requires_grad, OrderedDict())
            self.save_reduce(_named("torch._utils._rebuild_parameter"), args, obj=t)
            return
        # Tensor._reduce_ex_internal of a dense CPU tensor
        args = (_StorageArg(t.storage, t.dtype), t.offset, tuple(t.shape), tuple(t.strides),
                t.requires_grad, OrderedDict())  # fmt: skip
        rebuild = "torch._utils._rebuild_tensor_v2"
        if t.dtype.name in _UNTYPED:
            rebuild = "torch._utils._rebuild_tensor_v3"
            args += (t.dtype,)
        self.save_reduce(_named(rebuild), args, obj=t)

    # torch.save's pickler is _pickle.c's, which batches an exact dict or list otherwise than
    # the Python pickler (its batch_dict_exact and batch_list_exact): a dict's last full batch
    # is followed by an empty MARK SETITEMS, and one item left after full batches is a batch
    # of its own (MARK ... SETITEMS, MARK ... APPENDS), not a SETITEM or an APPEND.

    def _save_dict(self, obj: dict[Any, Any]) -> None:
        self.write(pickle.EMPTY_DICT)
        self.memoize(obj)
        items = list(obj.items())
        if len(items) == 1:
            self.save(items[0][0])
            self.save(items[0][1])
            self.write(pickle.SETITEM)
            return
        start = 0
        while items:
            batch = items[start : start + self._BATCHSIZE]
            self.write(pickle.MARK)
            for key, value in batch:
                self.save(key)
                self.save(value)
            self.write(pickle.SETITEMS)
            start += len(batch)
            if len(batch) < self._BATCHSIZE:
                break

    def _save_list(self, obj: list[Any]) -> None:
        self.write(pickle.EMPTY_LIST)
        self.memoize(obj)
        if len(obj) == 1:
            self.save(obj[0])
            self.write(pickle.APPEND)
            return
        for start in range(0, len(obj), self._BATCHSIZE):
            self.write(pickle.MARK)
            for item in obj[start : start + self._BATCHSIZE]:
                self.save(item)
            self.write(pickle.APPENDS)

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, OrderedDict):  # optckpt's readers build a subclass; torch, the class
            return (_named("collections.OrderedDict"), (), vars(obj) or None, None,
                    iter(obj.items()))  # fmt: skip
        return NotImplemented

    dispatch[_Global] = _save_global
    dispatch[DType] = _save_dtype
    dispatch[DescribedTensor] = _save_tensor
    dispatch[dict] = _save_dict
    dispatch[list] = _save_list


def _pickle(tree: Any, storages: _Storages) -> bytes:
    """``data.pkl`` of ``tree``: what ``torch.save`` pickles for the tree torch would load."""
    buffer = io.BytesIO()
    _Pickler(buffer, storages).dump(tree)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------- the zip


def local_header(name: bytes, offset: int, size: int) -> bytes:
    """The local header of a stored record at ``offset`` in the file: miniz's with the data
    descriptor flag (CRC and sizes after the data), ZIP64 fields where ``size`` or
    ``offset`` reaches 4 GiB, and torch's ``FB`` padding to 64-byte aligned data."""
    zip64 = _zip64(size, 0, offset)  # the compressed size is miniz's 0 (the descriptor has it)
    start = offset + 30 + len(name) + len(zip64) + 4
    padding = -start % ALIGNMENT
    extra = zip64 + b"FB" + struct.pack("<H", padding) + b"Z" * padding
    head = struct.pack("<IHHHHHIIIHH", 0x04034B50, 0, _flags(size), 0, 0, 0, 0, 0, 0, len(name),
                       len(extra))  # fmt: skip
    return head + name + extra


def _zip64(size: int, compressed: int, offset: int) -> bytes:
    """The ZIP64 extra field of a record whose ``size`` or ``offset`` reaches 4 GiB (its
    sizes, then its offset, each only where it does), or nothing."""
    fields = b""
    if size >= _ZIP64_AT:
        fields += struct.pack("<QQ", size, compressed)
    if offset >= _ZIP64_AT:
        fields += struct.pack("<Q", offset)
    return struct.pack("<HH", 1, len(fields)) + fields if fields else b""


def _name(record: str) -> bytes:
    """A record's name in the zip: in the folder :data:`ARCHIVE`."""
    return f"{ARCHIVE}/{record}".encode()


def _flags(size: int) -> int:
    """UTF-8 names; a data descriptor after the data, but for an empty record (miniz's)."""
    return 0x0808 if size else 0x0800


def descriptor(crc: int, offset: int, size: int) -> bytes:
    """The data descriptor after a record's data (ZIP64 sizes where its header has ZIP64);
    none after an empty record."""
    if not size:
        return b""
    if size >= _ZIP64_AT or offset >= _ZIP64_AT:
        return struct.pack("<IIQQ", 0x08074B50, crc, size, size)
    return struct.pack("<IIII", 0x08074B50, crc, size, size)


def central_entry(name: bytes, crc: int, offset: int, size: int) -> bytes:
    """A record's entry in the central directory."""
    zip64 = _zip64(size, size, offset)
    size32 = min(size, _ZIP64_AT)
    offset32 = min(offset, _ZIP64_AT)
    head = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 0, 0, _flags(size), 0, 0, 0, crc, size32,
                       size32, len(name), len(zip64), 0, 0, 0, 0, offset32)  # fmt: skip
    return head + name + zip64


def end_records(count: int, directory: int, directory_size: int) -> bytes:
    """The ZIP64 end of central directory, its locator and the end of central directory."""
    zip64_end = directory + directory_size
    zip64 = struct.pack(
        "<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 0x2D, 0, 0, count, count, directory_size, directory
    )
    locator = struct.pack("<IIQI", 0x07064B50, 0, zip64_end, 1)
    count16 = min(count, 0xFFFF)
    size32, at32 = min(directory_size, _ZIP64_AT), min(directory, _ZIP64_AT)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count16, count16, size32, at32, 0)
    return zip64 + locator + end


def serialization_id(records: list[tuple[str, int]]) -> str:
    """40 digits for ``.data/serialization_id``, from the ``(name, CRC32)`` of each record:
    the same records give the same id, as torch's (whose hash is its C++ library's)."""
    names = hashlib.blake2b("\n".join(sorted(n for n, _ in records)).encode(), digest_size=8)
    combined = 0
    for _, crc in records:  # c10::hash_combine, as torch combines the CRC32s
        combined ^= (crc + 0x9E3779B9 + (combined << 6) + (combined >> 2)) & (2**64 - 1)
    return f"{int.from_bytes(names.digest(), 'little'):020d}{combined:020d}"


class ZipWriter:
    """Records appended one after another to a raw binary file, as torch's writer lays them
    out; :meth:`finish` writes the last two records and the central directory.

    Headers, descriptors and the data of :meth:`add` are gathered and written
    :data:`_BUFFER` bytes at a time (a checkpoint of many small tensors would otherwise cost
    a few system calls each); :meth:`add_copied` writes what is gathered, then copies.
    """

    def __init__(self, f: Any) -> None:
        self._f = f
        self._at = 0
        self._pending = bytearray()
        self._entries: list[tuple[str, int, int, int]] = []  # record, crc, offset, size

    def _begin(self, record: str, size: int) -> int:
        offset = self._at
        self._write(local_header(_name(record), offset, size))
        return offset

    def _end(self, record: str, crc: int, offset: int, size: int) -> None:
        self._write(descriptor(crc, offset, size))
        self._entries.append((record, crc, offset, size))

    def _write(self, data: bytes) -> None:
        self._pending += data
        self._at += len(data)
        if len(self._pending) >= _BUFFER:
            self._flush()

    def _flush(self) -> None:
        write_all(self._f, self._pending)
        self._pending.clear()

    def add(self, record: str, data: bytes) -> None:
        """Append a record of ``data``."""
        offset = self._begin(record, len(data))
        self._write(data)
        self._end(record, zlib.crc32(data), offset, len(data))

    def add_copied(
        self, record: str, found: list[Run], size: int, crc: Callable[[], int],
        files: Files, progress: Callable[[int], None] | None,
    ) -> None:  # fmt: skip
        """Append a record of the bytes of ``found`` (``size`` in all), copied from their
        files; ``crc`` gives their CRC32 once they are copied."""
        offset = self._begin(record, size)
        self._flush()
        copy_runs(found, self._f, files, progress)
        self._at += size
        self._end(record, crc(), offset, size)

    def finish(self) -> None:
        """Append ``version`` and ``.data/serialization_id``, then the central directory."""
        self.add("version", _VERSION.encode())
        names = [(record, crc) for record, crc, _, _ in self._entries]
        self.add(".data/serialization_id", serialization_id(names).encode())
        directory = self._at
        listing = b"".join(
            central_entry(_name(record), crc, offset, size)
            for record, crc, offset, size in self._entries
        )
        self._write(listing + end_records(len(self._entries), directory, len(listing)))
        self._flush()


# ---------------------------------------------------------------------------------- the writer


def write_described(
    tree: Any,
    path: Path,
    *,
    progress: Callable[[int], None] | None = None,
    placement: Mapping[KeyPath, str] | None = None,
) -> None:
    """Write ``tree``, whose tensors are all described, into the file ``path`` (created or
    replaced) as ``torch.save`` writes it, without torch (see the module doc). The caller
    fsyncs.

    Args:
        tree: the checkpoint; :func:`writable` must hold.
        path: the file to write.
        progress: called with the number of bytes of each write of tensor data.
        placement: the device to record for each tensor, by key path (see
            :attr:`optckpt.io.Checkpoint.placement`); others record the CPU.

    Raises:
        TypeError: ``tree`` holds what :func:`writable` refuses (a caller's bug).
        RuntimeError: two tensors view one storage as different dtypes (``torch.save``
            refuses that with the same words).
    """
    if not writable(tree):
        raise TypeError("this checkpoint cannot be written without torch")
    storages = _Storages(storage_locations(tree, placement or {}))
    pickled = _pickle(tree, storages)
    with open_output(path) as f, Files() as files:
        pool = ThreadPoolExecutor(1, thread_name_prefix="optckpt-crc32")
        try:
            _write_records(ZipWriter(f), pickled, storages, files, pool, progress)
        finally:  # an error, Ctrl-C: the checksums not begun are dropped, not waited for
            pool.shutdown(wait=True, cancel_futures=True)
        end_output(f)


def _write_records(
    zipped: ZipWriter,
    pickled: bytes,
    storages: _Storages,
    files: Files,
    pool: ThreadPoolExecutor,
    progress: Callable[[int], None] | None,
) -> None:
    """Every record of the file, in torch's order; the storages' checksums in ``pool``."""
    zipped.add("data.pkl", pickled)
    zipped.add(".format_version", b"1")
    zipped.add(".storage_alignment", str(ALIGNMENT).encode())
    zipped.add("byteorder", sys.byteorder.encode())
    records = [(key, runs(storage, 0, storage.size), storage.size)
               for storage, key in storages.keys.items()]  # fmt: skip
    large = [(found, size) for _, found, size in records if size >= _SMALL]
    for found, _ in large:  # opened here, so that the checksum thread only reads
        for storage, _, _ in found:
            if storage.file is not None:
                files.fd(storage)
    crcs = iter([pool.submit(crc32_runs, found, files) for found, _ in large])
    for key, found, size in records:
        if size >= _SMALL:
            zipped.add_copied(f"data/{key}", found, size, next(crcs).result, files, progress)
            continue
        data = read_runs(found, files)
        zipped.add(f"data/{key}", data)
        if progress is not None and size:
            progress(size)
    zipped.finish()
