"""The ``.distcp`` files of a DCP folder: bytes entries and tensor chunks, read in place.

Each entry of a ``.distcp`` file is a whole ``torch.save`` zip at ``(offset, length)``
(``torch/distributed/checkpoint/filesystem.py``, ``_write_item``), its records stored
uncompressed. The files are memory-mapped copy-on-write (never written to), and a tensor chunk
is made from the mapping without reading it: the chunk's zip directory gives its ``data.pkl``
(read, CRC-checked, and unpickled by :func:`~optckpt.io.dcp.unpickle.read_tensor_pickle`)
and the offset of its storage record, whose bytes become the tensor with ``torch.frombuffer``.
zipfile reads the directory through a window on the mapping (:class:`_Window`), so only the
directory's pages are touched, never the data.

A chunk's data is 64-byte aligned inside its zip, but the zip itself starts wherever the entry
before it ended, so the data is usually *not* aligned to its element size. torch kernels may
assume aligned data, so a misaligned chunk that anything computes on is first copied
(:func:`aligned`); writers, which only copy bytes, take the view as it is.

Bytes entries (hyperparameters, the ``params`` lists, anything else not a tensor) are small
``torch.save`` blobs: their pickles are scanned as :mod:`optckpt.io.read` scans a torch file's,
then loaded with ``torch.load(weights_only=True)``.

Finding an entry and its chunk's record (:func:`open_entry`, :func:`locate_chunk`) imports
no torch: the torch-free structure reader (:mod:`optckpt.io.dcp.describe`) reads them too.
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optckpt.described import DescribedStorage, file_identity
from optckpt.errors import UnreadableCheckpointError, UnsafeCheckpointError
from optckpt.io.dcp.transforms import Decompressed, decompress
from optckpt.io.dcp.unpickle import (
    BadPickle,
    RefusedGlobals,
    Stored,
    TensorRecord,
    dangerous,
    read_tensor_pickle,
)
from optckpt.io.pickles import (
    MAX_PICKLE_BYTES,
    MAX_TENSOR_EXCESS_BYTES,
    Refused,
    check_tree,
    scan_pickles,
    torch_allowed_globals,
)
from optckpt.io.zip_checks import record_start

if TYPE_CHECKING:
    import torch

_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)
_PAGE = mmap.PAGESIZE


class _Window(io.RawIOBase):
    """A read-only file over ``[start, start + length)`` of a memory map, for zipfile."""

    def __init__(self, mapped: mmap.mmap, start: int, length: int) -> None:
        super().__init__()
        self._mapped = mapped
        self._start = start
        self._length = length
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        end = self._length if size is None or size < 0 else min(self._length, self._pos + size)
        if self._pos >= end:
            return b""
        data = self._mapped[self._start + self._pos : self._start + end]
        self._pos = end
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class Files:
    """The ``.distcp`` files of one folder, each memory-mapped (copy-on-write) on first use.

    Entries are named by the folder's ``.metadata``, which is untrusted: a file must be a
    plain name in the folder (no ``/``, no ``..``), and every range must lie inside it.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._maps: dict[str, mmap.mmap] = {}
        # The files mapped so far (what writers and readers may release pages of); one list
        # that grows as files are mapped, so a holder of it sees the later ones too.
        self.mapped: list[Path] = []
        # Each mapped file's identity then, by name (DescribedStorage.identity).
        self.identities: dict[str, tuple[int, ...]] = {}
        # Values already loaded, by their pickle: a flattened optimizer saves every
        # hyperparameter once per parameter, mostly the same few values.
        self.values: dict[bytes, Any] = {}
        self._known: frozenset[str] | None = None

    @property
    def known_globals(self) -> frozenset[str]:
        """torch's weights-only allow-list (computed once per folder)."""
        if self._known is None:
            self._known = torch_allowed_globals()
        return self._known

    def _map(self, name: str, key: str) -> mmap.mmap:
        found = self._maps.get(name)
        if found is not None:
            return found
        if not name or "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
            raise UnreadableCheckpointError(
                f"{self.folder}: .metadata stores {key} in {name!r}, which is not a file of the folder"
            )
        path = self.folder / name
        if not path.is_file():
            raise UnreadableCheckpointError(
                f"{self.folder}: {name} is missing (.metadata stores {key} there)"
            )
        with path.open("rb") as f:
            self.identities[name] = file_identity(f.fileno())
            try:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except ValueError as e:  # an empty file cannot be mapped
                raise UnreadableCheckpointError(
                    f"{self.folder}: {name} is empty (.metadata stores {key} there)"
                ) from e
        self._maps[name] = mapped
        self.mapped.append(path)
        return mapped

    def window(self, stored: Stored, key: str) -> tuple[mmap.mmap, int, int]:
        """The map of ``stored``'s file, and the entry's start and length in it; for an entry
        stored compressed, its bytes decompressed into memory of their own
        (:func:`~optckpt.io.dcp.transforms.decompress`, bounded), from 0."""
        mapped = self._map(stored.file, key)
        if stored.offset + stored.length > len(mapped):
            raise UnreadableCheckpointError(
                f"{self.folder}: {key} lies at bytes {stored.offset:,} to "
                f"{stored.offset + stored.length:,} of {stored.file}, which holds "
                f"{len(mapped):,} (truncated?)"
            )
        if stored.transforms:
            where = f"{self.folder}: {key} ({stored.file} at {stored.offset:,})"
            raw = _Window(mapped, stored.offset, stored.length)
            decompressed, length = decompress(raw, stored, where)
            return decompressed, 0, length
        return mapped, stored.offset, stored.length

    def described(
        self, stored: Stored, key: str, nbytes: int, location: str, begin: int, mapped: Any
    ) -> DescribedStorage:
        """A storage of ``nbytes`` at ``begin`` of ``mapped`` (what :meth:`window` gave for
        ``stored``). An uncompressed entry's also names its file and the file's identity
        when mapped, for writers that copy from the file; a compressed one's bytes are only
        in memory, decompressed."""
        if stored.transforms:
            return DescribedStorage(key, nbytes, location, begin, mapped)
        path, identity = self.folder / stored.file, self.identities[stored.file]
        return DescribedStorage(key, nbytes, location, begin, mapped, path, identity=identity)

    def read_into(self, name: str, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` from file ``name`` (already mapped) at ``offset``: one copy from
        the page cache, where copying from the mapping would fault in every page first.

        Raises:
            UnreadableCheckpointError: the file ends first (it shrank since it was mapped).
        """
        done = 0
        with (self.folder / name).open("rb", buffering=0) as f:
            while done < len(buffer):
                n = os.preadv(f.fileno(), [buffer[done:]], offset + done)
                if n <= 0:
                    raise UnreadableCheckpointError(f"{self.folder}: {name} ended early")
                done += n

    def drop(self, mapped: mmap.mmap, start: int, length: int) -> None:
        """Release the resident pages of a range that has been read (see
        :mod:`optckpt.io.pages`: safe for a private mapping never written to)."""
        if _MADV_DONTNEED is None or length <= 0 or isinstance(mapped, Decompressed):
            return  # a decompressed entry is not a file's pages: released when dropped
        first = start - start % _PAGE
        end = min(len(mapped), start + length + (-(start + length) % _PAGE))
        mapped.madvise(_MADV_DONTNEED, first, end - first)


# --------------------------------------------------------------------------- zips


@dataclass(frozen=True)
class Entry:
    """One entry of a ``.distcp`` file, a whole ``torch.save`` zip, with its directory read.

    Attributes:
        where: how messages name it (folder, key, file and offset).
        mapped: its file's memory map; ``start`` and ``length``: the entry's bytes in it.
        prefix: the zip's folder (``"archive/"``); ``infos``: its records.
        pickle: its ``data.pkl``, CRC-checked.
    """

    where: str
    mapped: mmap.mmap
    start: int
    length: int
    prefix: str
    infos: list[zipfile.ZipInfo]
    pickle: bytes


def open_entry(files: Files, stored: Stored, key: str, *, value: bool = False) -> Entry:
    """The zip of a chunk (or with ``value``, of a bytes entry): its directory and
    ``data.pkl``, nothing else read.

    Raises:
        UnreadableCheckpointError: outside its file, not a torch.save zip, a CRC that does
            not match; a value over :data:`MAX_PICKLE_BYTES`.
    """
    where = f"{files.folder}: {key} ({stored.file} at {stored.offset:,})"
    mapped, start, length = files.window(stored, key)
    if value and length > MAX_PICKLE_BYTES:
        raise UnreadableCheckpointError(
            f"{where}: a value of {length:,} bytes; optckpt reads values of at most "
            f"{MAX_PICKLE_BYTES // 2**20} MiB that are not tensors"
        )
    if not value and mapped[start : start + 4] != b"PK\x03\x04":
        raise UnreadableCheckpointError(
            f"{where}: not a torch.save zip (a DCP folder saved with another serialization "
            "format, such as safetensors, is not read)"
        )
    prefix, infos, data = _zip_records(_Window(mapped, start, length), where)
    return Entry(where, mapped, start, length, prefix, infos, data)


def _zip_records(window: _Window, where: str) -> tuple[str, list[zipfile.ZipInfo], bytes]:
    """The folder prefix, the records and the CRC-checked ``data.pkl`` of a torch.save zip."""
    try:
        with zipfile.ZipFile(window) as archive:
            infos = archive.infolist()
            pickles = [i for i in infos if i.filename.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise UnreadableCheckpointError(f"{where}: not a torch.save zip (no data.pkl)")
            info = pickles[0]
            if info.file_size > MAX_PICKLE_BYTES:
                raise UnreadableCheckpointError(
                    f"{where}: its data.pkl holds {info.file_size:,} bytes, over the "
                    f"{MAX_PICKLE_BYTES // 2**20} MiB that optckpt reads"
                )
            data = archive.read(info)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError) as e:
        raise UnreadableCheckpointError(f"{where}: corrupt torch.save zip ({e})") from e
    return info.filename[: -len("data.pkl")], infos, data


def locate_chunk(files: Files, stored: Stored, key: str) -> tuple[mmap.mmap, TensorRecord, int]:
    """A tensor chunk's file mapping, how the tensor views its storage, and where in the
    file the storage's bytes start; nothing of the data is read, and torch is not imported.

    Raises:
        UnreadableCheckpointError: not a torch.save zip of one dense tensor, a compressed
            storage, or a tensor that claims more than its storage holds.
        UnsafeCheckpointError: its ``data.pkl`` names globals a tensor does not need.
    """
    entry = open_entry(files, stored, key)
    where, mapped, start, length = entry.where, entry.mapped, entry.start, entry.length
    prefix, infos, data = entry.prefix, entry.infos, entry.pickle
    try:
        record = read_tensor_pickle(data)
    except RefusedGlobals as e:
        raise UnsafeCheckpointError(
            f"{where}: refusing to unpickle a tensor chunk that names {e}", e.names
        ) from e
    except BadPickle as e:
        raise UnreadableCheckpointError(f"{where}: {e}") from e
    wanted = f"{prefix}data/{record.key}"
    info = next((i for i in infos if i.filename == wanted), None)
    if info is None:
        raise UnreadableCheckpointError(f"{where}: its storage record {wanted} is missing")
    if info.compress_type != zipfile.ZIP_STORED:
        raise UnreadableCheckpointError(f"{where}: its storage is compressed")
    nbytes = record.storage_numel * record.described.itemsize
    if info.file_size != nbytes:
        raise UnreadableCheckpointError(
            f"{where}: its storage record holds {info.file_size:,} bytes, its pickle says {nbytes:,}"
        )
    data_start = record_start(mapped, start, info, where)
    if data_start + nbytes > start + length:
        raise UnreadableCheckpointError(f"{where}: its storage runs past the entry's end")
    _check_view(record, where)
    return mapped, record, data_start


def raw_chunk(files: Files, stored: Stored, key: str) -> tuple[torch.Tensor, TensorRecord, int]:
    """A tensor chunk's storage bytes, viewed in place (``uint8``), how the tensor views
    them, and where in the file they start; nothing of the data is read.

    Raises:
        UnreadableCheckpointError, UnsafeCheckpointError: as :func:`locate_chunk`.
    """
    import torch

    mapped, record, data_start = locate_chunk(files, stored, key)
    nbytes = record.storage_numel * record.described.itemsize
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8), record, data_start
    raw = torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes, offset=data_start)
    return raw, record, data_start


def _check_view(record: TensorRecord, where: str) -> None:
    """Refuse a view that reaches past its storage, or claims far more than it holds."""
    numel = 1
    for s in record.size:
        numel *= s
    if numel == 0:
        return
    last = record.offset + sum((s - 1) * st for s, st in zip(record.size, record.stride))
    if last >= record.storage_numel:
        raise UnreadableCheckpointError(f"{where}: the tensor reaches past its storage")
    width = record.described.itemsize
    if (numel - record.storage_numel) * width > MAX_TENSOR_EXCESS_BYTES:
        raise UnreadableCheckpointError(
            f"{where}: the tensor claims {numel:,} elements from a storage of "
            f"{record.storage_numel:,} (zero or overlapping strides)"
        )


def typed(raw: torch.Tensor, record: TensorRecord, *, align: bool) -> torch.Tensor:
    """The chunk's tensor on its bytes; with ``align``, on a copy of them if they are not
    aligned to the element size (see the module doc)."""
    import torch

    width = record.described.itemsize
    if align and raw.numel() and raw.data_ptr() % width:
        raw = raw.clone()  # fresh memory is aligned
    storage = raw.view(record.dtype) if raw.numel() else torch.empty(0, dtype=record.dtype)
    return storage.as_strided(record.size, record.stride, record.offset)


# --------------------------------------------------------------------------- bytes entries


def load_bytes(files: Files, stored: Stored, key: str, allowed: Mapping[str, Any]) -> Any:
    """A bytes entry's value, with ``torch.load(weights_only=True)``.

    Its pickle is scanned first, as a torch file's is (:mod:`optckpt.io.pickles`): a global
    that can run code is refused outright, others outside torch's allow-list and ``allowed``
    (``{"module.Name": object}``, from ``--allow-global``) are refused with their names.

    Raises:
        UnreadableCheckpointError: corrupt, or over :data:`MAX_PICKLE_BYTES`.
        UnsafeCheckpointError: globals refused.
    """
    import torch

    entry = open_entry(files, stored, key, value=True)
    where, mapped, start, length = entry.where, entry.mapped, entry.start, entry.length
    prefix, infos, data = entry.prefix, entry.infos, entry.pickle
    # Without storages the pickle is the whole value: an equal one was loaded already.
    plain = not any(i.filename.startswith(f"{prefix}data/") for i in infos)
    if plain and data in files.values:
        return files.values[data]
    try:
        scanned = scan_pickles(data)
    except Refused as e:
        raise UnreadableCheckpointError(f"{where}: {e}") from e
    unsafe = [g for g in scanned.globals if g not in files.known_globals and g not in allowed]
    if unsafe:
        raise refused_globals(where, unsafe)
    try:
        with torch.serialization.safe_globals([(obj, name) for name, obj in allowed.items()]):
            blob = io.BytesIO(mapped[start : start + length])
            value = torch.load(blob, map_location="cpu", weights_only=True)
        check_tree(value)
    except Refused as e:
        raise UnreadableCheckpointError(f"{where}: {e}") from e
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnreadableCheckpointError(f"{where}: corrupt value ({first})") from e
    if plain and _immutable(value):  # shared safely: nothing can change it
        files.values[data] = value
    return value


def _immutable(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return True
    return isinstance(value, tuple) and all(map(_immutable, value))


def refused_globals(where: str, names: list[str]) -> UnsafeCheckpointError:
    """The error for a pickle that names ``names``: those that can run code are never
    allowed; the others can be, with ``--allow-global``."""
    bad = dangerous(names)
    if bad:
        name, why = bad[0]
        others = f" (and {', '.join(n for n, _ in bad[1:])})" if len(bad) > 1 else ""
        return UnsafeCheckpointError(
            f"{where}: refusing to load: the pickle asks for {name}{others}, a callable that "
            f"can run code ({why}); this checkpoint will not be loaded, with or without "
            "--allow-global",
            names,
        )
    flags = " ".join(f"--allow-global {n}" for n in names)
    return UnsafeCheckpointError(
        f"{where}: refusing to unpickle globals outside the allow-list: {', '.join(names)}; "
        f"if you trust this checkpoint, pass {flags} (which imports their modules)",
        names,
    )
