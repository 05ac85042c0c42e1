"""Tensors as a checkpoint describes them, without torch: dtype, shape, stride, storage, offset.

``optckpt inspect`` without ``--stats`` needs only what a file says about its tensors, never
their values (bar the few 0-dim ones, ``step``), and ``import torch`` alone costs seconds. The
readers of :mod:`optckpt.io.structure` build a :class:`DescribedTensor` where ``torch.load``
would build a tensor; it answers the part of ``torch.Tensor``'s interface that the read-only
pipeline uses (``shape``, ``dtype``, ``device``, ``layout``, ``numel()``, ``element_size()``,
``dim()``, ``item()``, ``untyped_storage()``, ``storage_offset()``, ``stride()``,
``is_floating_point()``, ``is_complex()``), with the same values torch's would have after
``torch.load(map_location="cpu")``. :func:`is_tensor` is the one test for "a tensor" on that
pipeline: a torch tensor (only possible once torch is imported) or a description.

:class:`DType` names a torch dtype without torch (``str()`` gives ``"torch.float32"``, as
``str(torch.float32)`` does); :func:`dtype_named` finds one by torch's name.
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DType:
    """A torch dtype by name: ``name`` as ``torch`` spells the attribute (``"float32"``)."""

    name: str
    itemsize: int
    is_floating_point: bool = False
    is_complex: bool = False
    # struct format of one element, for item(); "" where struct has none (float8, ...)
    format: str = ""

    def __str__(self) -> str:
        return f"torch.{self.name}"

    __repr__ = __str__

    def __setstate__(self, state: Any) -> None:
        # A pickle's BUILD on a dtype global: torch's weights-only unpickler refuses it.
        raise TypeError("a dtype takes no pickled state")

    def __copy__(self) -> DType:
        return self

    def __deepcopy__(self, memo: Any) -> DType:
        return self  # as torch.float32 is copied: one object per dtype


def _dtypes() -> dict[str, DType]:
    floats = {"float64": "d", "float32": "f", "float16": "e", "bfloat16": "bf16"}
    found = {name: DType(name, struct.calcsize(f) if f != "bf16" else 2, True, False, f)
             for name, f in floats.items()}  # fmt: skip
    for name in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
                 "float8_e8m0fnu", "float4_e2m1fn_x2"):  # fmt: skip
        found[name] = DType(name, 1, True)
    found["complex128"] = DType("complex128", 16, False, True, "dd")
    found["complex64"] = DType("complex64", 8, False, True, "ff")
    found["complex32"] = DType("complex32", 4, False, True, "ee")
    for name, f in (("int64", "q"), ("int32", "i"), ("int16", "h"), ("int8", "b"),
                    ("uint64", "Q"), ("uint32", "I"), ("uint16", "H"), ("uint8", "B"),
                    ("bool", "?")):  # fmt: skip
        found[name] = DType(name, struct.calcsize(f), False, False, f)
    for bits in range(1, 8):
        found[f"int{bits}"] = DType(f"int{bits}", 1)
        found[f"uint{bits}"] = DType(f"uint{bits}", 1)
    for name, size in (("bits16", 2), ("bits8", 1), ("bits1x8", 1), ("bits2x4", 1),
                       ("bits4x2", 1), ("qint32", 4), ("qint8", 1), ("quint8", 1),
                       ("quint4x2", 1), ("quint2x4", 1)):  # fmt: skip
        found[name] = DType(name, size)
    return found


DTYPES: dict[str, DType] = _dtypes()
"""Every dtype of torch 2.13 by its name (``tests/test_described.py`` checks them against
torch: names, item sizes, floating point or complex)."""


def dtype_named(name: str) -> DType | None:
    """The dtype torch names ``torch.<name>`` (``"float32"``), or ``None``."""
    return DTYPES.get(name)


@dataclass(frozen=True)
class _Device:
    """``torch.device("cpu")`` as a description sees it: where ``torch.load`` put the tensor."""

    type: str = "cpu"

    def __str__(self) -> str:
        return self.type


_CPU = _Device()
META = _Device("meta")
"""The device of a description without data (a DCP tensor read for its shape and dtype
only), as ``torch.device("meta")`` is for a tensor."""
_STRIDED = "torch.strided"


@dataclass(eq=False)
class DescribedStorage:
    """One storage of a file: its bytes at ``start`` in ``source``, and where it was saved from.

    One object per storage, shared by every tensor that views it, as torch keeps one
    ``UntypedStorage`` per storage of a file (tied weights are told apart by it).

    Attributes:
        key: the storage's name in the file (``"0"``: the record ``data/0`` of a torch zip).
        size: its bytes.
        location: the device it was saved from (``"cuda:0"``); ``"cpu"`` for safetensors.
        start: the offset of its first byte in the file.
        source: the file, memory-mapped (``None`` for an empty storage).
        file: the file's path, for writers that copy the bytes in the kernel.
        identity: ``file``'s :func:`file_identity` when it was mapped: a writer that opens
            ``file`` again to copy from it refuses another file put at that path since (a
            trainer's next checkpoint renamed over it), or the file changed.
    """

    key: str
    size: int
    location: str
    start: int
    source: mmap.mmap | None = field(default=None, repr=False)
    file: Path | None = None
    identity: tuple[int, ...] | None = None

    def nbytes(self) -> int:
        """Its size in bytes, as ``UntypedStorage.nbytes()``."""
        return self.size

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (in bytes, within the storage)."""
        if self.source is None or offset < 0 or offset + length > self.size:
            raise ValueError(f"storage {self.key}: bytes {offset}..{offset + length} out of range")
        begin = self.start + offset
        return bytes(self.source[begin : begin + length])


def file_identity(fd: int) -> tuple[int, ...]:
    """The open file ``fd`` as it is now: device, inode, size and modification time."""
    found = os.fstat(fd)
    return found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns


@dataclass(eq=False)
class JoinedStorage(DescribedStorage):
    """A storage whose bytes are several runs of files, one after another: a DCP tensor
    saved as row chunks (FSDP's shards of dimension 0), whose bytes in order are the
    tensor's. Writers copy each run (:attr:`parts`); :meth:`read` reads across them.

    Attributes:
        parts: the runs, in order; their sizes add up to ``size``.
    """

    parts: tuple[DescribedStorage, ...] = ()

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (in bytes, within the joined storage)."""
        return b"".join(part.read(b, n) for part, b, n in runs(self, offset, length))


Run = tuple[DescribedStorage, int, int]
"""``(storage, begin, nbytes)``: ``nbytes`` bytes from byte ``begin`` of a storage that is
one run of one file (never a :class:`JoinedStorage`)."""


def runs(storage: DescribedStorage, begin: int, nbytes: int) -> list[Run]:
    """The runs of files holding ``nbytes`` of ``storage`` from byte ``begin``, in order: one,
    or several for a :class:`JoinedStorage`.

    Raises:
        ValueError: the range is not inside the storage.
    """
    if begin < 0 or nbytes < 0 or begin + nbytes > storage.size:
        raise ValueError(f"storage {storage.key}: bytes {begin}..{begin + nbytes} out of range")
    if not isinstance(storage, JoinedStorage):
        return [(storage, begin, nbytes)] if nbytes else []
    found: list[Run] = []
    for part in storage.parts:
        if nbytes == 0:
            break
        if begin >= part.size:
            begin -= part.size
            continue
        take = min(nbytes, part.size - begin)
        found.append((part, begin, take))
        begin, nbytes = 0, nbytes - take
    return found


@dataclass(eq=False)
class DescribedTensor:
    """A tensor as the file describes it: the view of a storage ``torch.load`` would make.

    ``device`` is the CPU (where ``torch.load(map_location="cpu")`` puts it); the device it
    was saved from is the storage's ``location`` (and the checkpoint's ``placement``).
    """

    dtype: DType
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int  # in elements, as Tensor.storage_offset()
    storage: DescribedStorage
    requires_grad: bool = False
    parameter: bool = False  # torch.nn.Parameter in the file
    device: _Device = field(default=_CPU)
    layout: str = _STRIDED

    def __setstate__(self, state: Any) -> None:
        # A pickle's BUILD on a tensor: torch's unpickler calls set_() on it, which this
        # reader does not model, so it refuses (and torch reads the file instead).
        raise TypeError("a tensor description takes no pickled state")

    def __copy__(self) -> DescribedTensor:
        return self

    def __deepcopy__(self, memo: Any) -> DescribedTensor:
        return self  # immutable: copies of a description would describe the same bytes

    def numel(self) -> int:
        """The number of elements (the product of the shape)."""
        n = 1
        for d in self.shape:
            n *= d
        return n

    def element_size(self) -> int:
        """Bytes per element."""
        return self.dtype.itemsize

    def dim(self) -> int:
        """The number of dimensions."""
        return len(self.shape)

    def stride(self) -> tuple[int, ...]:
        """Elements to step in the storage per index of each dimension."""
        return self.strides

    def storage_offset(self) -> int:
        """Where the tensor starts in its storage, in elements."""
        return self.offset

    def untyped_storage(self) -> DescribedStorage:
        """The storage it views (one object per storage of the file)."""
        return self.storage

    def is_floating_point(self) -> bool:
        """Whether its dtype is a floating-point one."""
        return self.dtype.is_floating_point

    def is_complex(self) -> bool:
        """Whether its dtype is a complex one."""
        return self.dtype.is_complex

    def is_contiguous(self) -> bool:
        """Whether it is laid out row-major without gaps (torch's rule: sizes of 1 and empty
        tensors do not constrain strides)."""
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.strides)):
            if size == 0:
                return True
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True

    def item(self) -> Any:
        """The value of a one-element tensor, read from the file as ``Tensor.item()`` gives it.

        Raises:
            ValueError: more than one element, or a dtype whose values are not decoded here
                (:func:`readable_item` says which are).
        """
        if self.numel() != 1:
            raise ValueError("item() of a tensor that is not one element")
        fmt = self.dtype.format
        if not fmt:
            raise ValueError(f"item() of a {self.dtype.name} tensor")
        raw = self.storage.read(self.offset * self.dtype.itemsize, self.dtype.itemsize)
        if fmt == "bf16":  # bfloat16: the upper half of a float32
            return struct.unpack("<f", b"\0\0" + raw)[0]
        values = struct.unpack("<" + fmt, raw)
        if self.dtype.is_complex:
            return complex(values[0], values[1])
        return values[0]

    def byte_range(self) -> tuple[int, int] | None:
        """``(offset in the file, bytes)`` of a tensor that is one contiguous run of its
        storage; ``None`` for any other (a transposed or strided view)."""
        if not self.is_contiguous():
            return None
        return self.storage.start + self.offset * self.dtype.itemsize, self.numel() * (
            self.dtype.itemsize
        )

    def to_torch(self) -> torch.Tensor:
        """The tensor itself, a view of the file's copy-on-write mapping (imports torch), as
        ``torch.load(mmap=True)`` gives it: for commands that read values."""
        import torch

        dtype = getattr(torch, self.dtype.name)
        if self.storage.size == 0:
            raw = torch.empty(0, dtype=torch.uint8)
        elif isinstance(self.storage, JoinedStorage):  # bytes of several runs: gathered
            joined = bytearray(self.storage.read(0, self.storage.size))
            raw = torch.frombuffer(joined, dtype=torch.uint8)
        elif self.storage.source is None:
            raw = torch.empty(0, dtype=torch.uint8)
        else:
            raw = torch.frombuffer(
                self.storage.source, dtype=torch.uint8, count=self.storage.size,
                offset=self.storage.start,
            )  # fmt: skip
        width = self.dtype.itemsize
        typed = raw[: len(raw) - len(raw) % width].view(dtype)
        return typed.as_strided(self.shape, self.strides, self.offset)


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The row-major strides of ``shape`` (what ``torch.empty(shape).stride()`` gives)."""
    strides: list[int] = []
    step = 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def readable_item(tensor: DescribedTensor) -> bool:
    """Whether :meth:`DescribedTensor.item` decodes this tensor's dtype."""
    return bool(tensor.dtype.format)


def is_tensor(value: object) -> TypeGuard[torch.Tensor]:
    """Whether ``value`` is a tensor: a ``torch.Tensor`` or a :class:`DescribedTensor`.

    torch is never imported to answer: without it in ``sys.modules`` no torch tensor exists.
    A description answers the read-only part of a tensor's interface (see the module doc);
    only the pipeline that reads structure (``inspect`` without ``--stats``) meets one.
    """
    if isinstance(value, DescribedTensor):
        return True
    torch_module = sys.modules.get("torch")
    return torch_module is not None and isinstance(value, torch_module.Tensor)


def dtype_name(dtype: Any) -> str:
    """``torch.float32`` (or its :class:`DType`) -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def layout_name(tensor: Any) -> str:
    """``"strided"``, ``"sparse_coo"``, ... of a tensor or description."""
    return str(tensor.layout).removeprefix("torch.")
