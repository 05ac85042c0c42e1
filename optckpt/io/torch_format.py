"""Writing torch zip files (``torch.save``'s format) one storage at a time.

:func:`save_torch` writes the same bytes as ``torch.save(tree, path)``: the same
pickle (torch's persistent IDs for storages, keys in order of first use, protocol 2), the same
records in the same order, written by torch's own zip writer (``torch._C.PyTorchFileWriter``,
stored, 64-byte aligned, CRC32). Two things differ in how, not in what:

* a :class:`Deferred` in the tree is pickled as the tensor it will become, and that tensor is
  only made (a cast of its source) just before its record is written, then dropped. A tree
  whose optimizer state is being cast to bfloat16 therefore never holds all the cast copies
  at once; peak memory is the largest one.
* a storage that is a view of a memory-mapped input file (one of ``sources``; see
  :mod:`optckpt.io.pages`) is copied from that file inside the kernel
  (``os.copy_file_range``, as ``cp`` does) rather than written from memory: the file object
  torch's writer writes to recognises such a write by its address. torch's writer still
  reads it once for the CRC32, and its pages are released right after.

:func:`save_torch` uses ``torch.save`` itself when the tree holds no :class:`Deferred` and
no device to record.
"""

from __future__ import annotations

import copyreg
import io
import pickle
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from optckpt.io.outfile import end_output as end_output  # re-exported: defined there
from optckpt.io.outfile import open_output as open_output
from optckpt.io.outfile import recorded_location as recorded_location
from optckpt.io.outfile import storage_locations as storage_locations
from optckpt.io.outfile import write_all as write_all
from optckpt.io.pages import FileRanges, copy_range, release, trim_heap
from optckpt.io.torch_zip import (
    open_zipfile_writer,
    pickle_storage_type,
    rebuild_tensor_v2,
    storage_alignment,
    typed_storage_parts,
    write_record,
)
from optckpt.locate import KeyPath

_PROTOCOL = 2  # torch.serialization.DEFAULT_PROTOCOL
# Dtypes pickled through a TypedStorage and _rebuild_tensor_v2, whose reduction
# Deferred reproduces (torch's newer dtypes go through _rebuild_tensor_v3).
_DEFERRABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRIM_EVERY = 64 * 1024 * 1024  # bytes of casts made and freed between heap trims
_MIN_COPY = 64 * 1024  # writes smaller than this are never looked up in the mapped inputs


class Deferred:
    """``source.to(dtype)`` on the CPU, made only when it is written.

    Put one in a tree given to :func:`save_torch` (or to
    :func:`optckpt.io.safetensors_format.write_safetensors`) where the cast tensor belongs:
    it is written exactly as that tensor would be. Pickled any other way, it becomes the
    tensor (it is made then).
    """

    __slots__ = ("_meta", "dtype", "source")

    def __init__(self, source: torch.Tensor, dtype: torch.dtype) -> None:
        if not can_defer(source, dtype):
            raise ValueError(f"cannot defer a cast of this tensor to {dtype}")
        self.source = source
        self.dtype = dtype
        # The layout .to() gives (it preserves the strides of a dense tensor), without data.
        self._meta = torch.empty_like(source, dtype=dtype, device="meta")

    @property
    def shape(self) -> torch.Size:
        """The shape of the tensor it becomes."""
        return self._meta.shape

    def numel(self) -> int:
        """Elements of the tensor it becomes."""
        return self._meta.numel()

    def element_size(self) -> int:
        """Bytes per element of the tensor it becomes."""
        return self._meta.element_size()

    def materialize(self) -> torch.Tensor:
        """Make the tensor."""
        made = self.source.to(dtype=self.dtype)
        if made.shape != self._meta.shape or made.stride() != self._meta.stride():
            raise AssertionError("torch's cast gave another layout than planned")  # a bug
        return made

    def __reduce_ex__(self, protocol: Any) -> Any:
        return self.materialize().__reduce_ex__(protocol)  # type: ignore[no-untyped-call]


def can_defer(tensor: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``Deferred(tensor, dtype)`` is allowed: a plain dense CPU tensor, cast to a
    float dtype other than its own."""
    return (
        type(tensor) is torch.Tensor
        and tensor.device.type == "cpu"
        and tensor.layout == torch.strided
        and tensor.dtype in _DEFERRABLE
        and dtype in _DEFERRABLE
        and tensor.dtype != dtype
        and not tensor.is_neg()
        and not tensor.is_conj()
    )


class _Pending:
    """The storage a :class:`Deferred` will have; what its pickled tensor refers to."""

    __slots__ = ("deferred",)

    def __init__(self, deferred: Deferred) -> None:
        self.deferred = deferred


def _reduce_deferred(d: Deferred) -> Any:
    # What Tensor._reduce_ex_internal returns for the plain dense CPU tensor d becomes: its
    # storage (here a placeholder that persistent_id names), offset 0, size, stride,
    # requires_grad and empty backward hooks; a fresh cast has no conj/neg metadata.
    args: tuple[Any, ...] = (
        _Pending(d),
        0,
        tuple(d.shape),
        d._meta.stride(),
        d.source.requires_grad,
        OrderedDict(),
    )
    return (rebuild_tensor_v2(), args)


def _storage_type(dtype: torch.dtype) -> Any:
    return pickle_storage_type(dtype)


class _Sink:
    """The file torch's zip writer writes to: counts bytes, and copies a write whose memory
    is a mapped input file (a whole storage of one) from that file inside the kernel."""

    def __init__(self, f: Any, progress: Callable[[int], None] | None, ranges: FileRanges) -> None:
        self._f = f
        self._fd = f.fileno()
        self._progress = progress
        self._ranges = ranges

    def write(self, data: Any) -> int:
        view = memoryview(data)
        n = view.nbytes
        done = 0
        address = None
        if n >= _MIN_COPY:
            address = np.frombuffer(view, dtype=np.uint8).ctypes.data
            found = self._ranges.find(address, n)
            if found is not None:
                done = copy_range(found[0], found[1], self._fd, n)
        if done < n:
            write_all(self._f, view[done:] if done else view)
        if address is not None:
            # torch's writer has read it for the CRC32: pages of a mapped input can go
            self._ranges.drop(address, n)
        if self._progress is not None:
            self._progress(n)
        return n

    def flush(self) -> None:
        self._f.flush()


def _write_torch(
    tree: Any,
    f: Any,
    progress: Callable[[int], None] | None,
    sources: list[str | Path],
    locations: Mapping[Any, str],
) -> None:
    storages: dict[str, Any] = {}  # key -> UntypedStorage or Deferred, in order of first use
    # UntypedStorage or Deferred -> key: by the object (torch keys by storage._cdata, the
    # StorageImpl, of which torch keeps one Python object); `storages` holds each one
    keys: dict[object, str] = {}
    # torch's check that no memory is saved as two dtypes, by where the data starts
    storage_dtypes: dict[int, torch.dtype] = {}
    normalize = torch.serialization.normalize_storage_type

    # torch.serialization._save's persistent_id, plus the Deferred placeholder.
    def persistent_id(obj: Any) -> Any:
        if isinstance(obj, _Pending):
            d = obj.deferred
            key = keys.setdefault(d, str(len(keys)))
            storages[key] = d
            return ("storage", _storage_type(d.dtype), key, locations.get(d, "cpu"), d.numel())
        if isinstance(obj, torch.storage.TypedStorage) or torch.is_storage(obj):
            if isinstance(obj, torch.storage.TypedStorage):
                storage, storage_type, storage_numel = typed_storage_parts(obj)
                storage_dtype = obj.dtype
            else:
                storage = obj
                storage_dtype = torch.uint8
                storage_type = normalize(type(obj))  # type: ignore[no-untyped-call]
                storage_numel = storage.nbytes()
            if str(storage.device) != "meta" and storage.data_ptr() != 0:
                seen = storage_dtypes.setdefault(storage.data_ptr(), storage_dtype)
                if seen != storage_dtype:
                    raise RuntimeError(
                        "Cannot save multiple tensors or storages that "
                        "view the same data as different types"
                    )
            key = keys.setdefault(storage, str(len(keys)))
            storages[key] = storage
            location = recorded_location(storage, locations)
            return ("storage", storage_type, key, location, storage_numel)
        return None

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            return persistent_id(obj)

    buffer = io.BytesIO()
    pickler = Pickler(buffer, protocol=_PROTOCOL)
    # A dispatch table matches exact types: list Deferred's subclasses too (optckpt.io.dcp's).
    deferred = dict.fromkeys(_subclasses(Deferred), _reduce_deferred)
    pickler.dispatch_table = {**copyreg.dispatch_table, **deferred}
    pickler.dump(tree)
    del pickler
    pickled = buffer.getvalue()
    del buffer

    made_bytes = 0  # bytes of Deferred casts made and freed since the heap was last trimmed
    with (
        FileRanges(sources) as ranges,
        open_zipfile_writer(_Sink(f, progress, ranges)) as writer,
    ):
        write_record(writer, "data.pkl", pickled, len(pickled))
        # the records torch._save writes before the storages
        write_record(writer, ".format_version", "1", len("1"))
        alignment = storage_alignment()
        if alignment is not None:
            text = str(alignment)
            write_record(writer, ".storage_alignment", text, len(text))
        write_record(writer, "byteorder", sys.byteorder, len(sys.byteorder))
        for key, entry in storages.items():
            name = f"data/{key}"
            if not isinstance(entry, Deferred):
                storage = entry if entry.device.type == "cpu" else entry.cpu()
                write_record(writer, name, storage, storage.nbytes())
                continue
            made = entry.materialize()
            storage = made.untyped_storage()
            write_record(writer, name, storage, storage.nbytes())
            del made, storage
            source = entry.source
            ranges.drop(source.data_ptr(), source.numel() * source.element_size())
            made_bytes += entry.numel() * entry.element_size()
            if made_bytes >= _TRIM_EVERY:
                trim_heap()
                made_bytes = 0
    release(sources)


def _subclasses(cls: type[Deferred]) -> list[type[Deferred]]:
    """``cls`` and every subclass of it, however deep."""
    found = [cls]
    for sub in cls.__subclasses__():
        found.extend(_subclasses(sub))
    return found


def _has_deferred(node: Any) -> bool:
    if isinstance(node, Deferred):
        return True
    if isinstance(node, dict):
        return any(_has_deferred(v) for v in node.values())
    if isinstance(node, (list, tuple)):
        return any(_has_deferred(v) for v in node)
    return False


def save_torch(
    tree: Any,
    path: Path,
    *,
    progress: Callable[[int], None] | None = None,
    sources: Iterable[str | Path] = (),
    placement: Mapping[KeyPath, str] | None = None,
) -> None:
    """Write ``tree`` into the file ``path`` (created or replaced) as ``torch.save`` does.

    A tree without :class:`Deferred` casts or devices to record from ``placement`` goes
    through ``torch.save`` itself; others through optckpt's own writer (see the module doc).
    The caller fsyncs.

    Args:
        tree: the checkpoint; may hold :class:`Deferred` casts.
        path: the file to write.
        progress: called with the number of bytes of each write.
        sources: the memory-mapped files ``tree`` was read from (private mappings never
            written to): their pages are released as they are copied, and storages that are
            views of them are copied from the files in the kernel.
        placement: the device to record for CPU tensors, by key path (see
            :attr:`optckpt.io.Checkpoint.placement` and :func:`storage_locations`), as if
            ``torch.save`` had written them from that device; others record where they are.
    """
    sources = list(sources)
    locations = storage_locations(tree, placement or {})
    with open_output(path) as f:
        if locations or _has_deferred(tree):
            _write_torch(tree, f, progress, sources, locations)
        else:
            with FileRanges(sources) as ranges:
                torch.save(tree, _Sink(f, progress, ranges))  # type: ignore[arg-type]
            release(sources)
        end_output(f)
