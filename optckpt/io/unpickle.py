"""optckpt's own restricted unpickler: a table of globals, and nothing a pickle names is imported.

One machinery for every pickle optckpt unpickles itself: DCP's ``.metadata`` and tensor chunks
(:mod:`optckpt.io.dcp.unpickle`) and a torch zip's ``data.pkl`` read for its structure
(:mod:`optckpt.io.structure`). :class:`RestrictedUnpickler` resolves a global only through its
table (``"module.Name"`` -> what the pickle gets); any other global is :class:`RefusedGlobals`,
never imported. Callers scan a pickle's opcodes for bounds before they unpickle it.

:data:`TORCH_ZIP_GLOBALS` is the part of torch's ``weights_only`` allow-list that a
``torch.save`` of tensors, dicts, lists and numbers names (the rebuild functions, the storage
classes, ``OrderedDict``, the dtypes), each mapped to a stand-in that builds a
:class:`~optckpt.described.DescribedTensor` instead of a tensor; ``tests/test_structure.py``
checks that every name is on torch's list. A pickle that names anything else on torch's list is
read by torch instead.
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from optckpt.described import DTYPES, DescribedStorage, DescribedTensor, DType


class BadPickle(ValueError):
    """A pickle that is corrupt, too deep, or not the shape torch writes (no file named)."""


class RefusedGlobals(ValueError):
    """A pickle names globals outside the allow-list; ``names`` lists them, in order."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(", ".join(names))
        self.names = names


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals of its table; anything else is an error, never imported."""

    def __init__(
        self,
        data: bytes,
        table: Mapping[str, Any],
        persistent: Callable[[Any], Any] | None = None,
    ) -> None:
        super().__init__(io.BytesIO(data))
        self._table = table
        self._persistent = persistent

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full in self._table:
            return self._table[full]
        raise RefusedGlobals([full])

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise BadPickle("a persistent ID outside a torch.save file")
        return self._persistent(pid)


def unpickle(
    data: bytes, table: Mapping[str, Any], persistent: Callable[[Any], Any] | None = None
) -> Any:
    """Unpickle ``data`` with only ``table``'s globals (its opcodes already scanned).

    Raises:
        RefusedGlobals: it names a global outside ``table``.
        BadPickle: anything else goes wrong (a mangled pickle, a stand-in refusing its
            arguments, nesting past the interpreter's recursion limit).
    """
    try:
        return RestrictedUnpickler(data, table, persistent).load()
    except (BadPickle, RefusedGlobals):
        raise
    except RecursionError as e:
        raise BadPickle("nested too deeply") from e
    except Exception as e:  # the unpickler's and the stand-ins' errors on a mangled pickle
        raise BadPickle(f"corrupt pickle ({type(e).__name__}: {e})") from e


# --------------------------------------------------------------------------- torch.save's names

STORAGE_CLASSES: dict[str, str] = {
    "torch.DoubleStorage": "float64",
    "torch.FloatStorage": "float32",
    "torch.HalfStorage": "float16",
    "torch.BFloat16Storage": "bfloat16",
    "torch.LongStorage": "int64",
    "torch.IntStorage": "int32",
    "torch.ShortStorage": "int16",
    "torch.CharStorage": "int8",
    "torch.ByteStorage": "uint8",
    "torch.BoolStorage": "bool",
    "torch.ComplexDoubleStorage": "complex128",
    "torch.ComplexFloatStorage": "complex64",
}
"""The storage classes of ``torch.save``'s persistent IDs, by the name of the dtype they hold."""

UNTYPED_STORAGES = ("torch.UntypedStorage", "torch.storage.UntypedStorage")
"""``UntypedStorage``: its persistent ID counts bytes, and ``_rebuild_tensor_v3`` types it."""

DTYPE_GLOBALS: dict[str, DType] = {f"torch.{name}": dtype for name, dtype in DTYPES.items()}
"""``torch.float32`` and every other dtype, as the global a pickle names."""


class _NoState:
    """A stand-in that a pickle's ``BUILD`` cannot change (torch's unpickler refuses to build
    anything but tensors, parameters, ``OrderedDict`` and allow-listed user classes)."""

    def __setstate__(self, state: Any) -> None:
        raise BadPickle(f"BUILD on a {type(self).__name__}")


@dataclass(frozen=True)
class StorageClass(_NoState):
    """A storage class in a persistent ID: the dtype it holds (``uint8`` for untyped)."""

    dtype: DType
    untyped: bool = False


@dataclass(frozen=True)
class _StorageRef(_NoState):
    """What a persistent ID gives a rebuild function: the storage and the dtype torch types
    it with."""

    storage: DescribedStorage
    dtype: DType


class _OrderedDict(OrderedDict[Any, Any]):
    """``collections.OrderedDict`` as torch's weights-only unpickler builds it: ``BUILD`` may
    set its attributes (``state_dict()._metadata``) from a dict, nothing else."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise BadPickle("an OrderedDict built from a state that is not a dict")
        self.__dict__.update(state)


def _ordered_dict(*args: Any) -> _OrderedDict:
    """``collections.OrderedDict(*args)``: a function, so ``NEWOBJ`` cannot build one (torch's
    unpickler builds only allow-listed user classes so)."""
    return _OrderedDict(*args)


@dataclass
class _Tensors:
    """What the stand-ins of one ``data.pkl`` share: its storages, by key."""

    storage: Callable[[StorageClass, str, str, int], DescribedStorage]
    typed: dict[int, DType]  # id(storage) -> the dtype its first persistent ID gave it

    def persistent(self, pid: Any) -> _StorageRef:
        """torch's ``persistent_load``: ``('storage', class, key, location, numel)``."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise BadPickle("a persistent ID that is not a storage")
        _, kind, key, location, numel = pid
        if not isinstance(kind, StorageClass):
            raise BadPickle("a storage of an unknown class")
        if not isinstance(key, str) or not isinstance(location, str):
            raise BadPickle("a storage without a key and a location")
        if type(numel) is not int or numel < 0:
            raise BadPickle("a storage without a size")
        storage = self.storage(kind, key, location, numel * kind.dtype.itemsize)
        # torch keeps the first typed storage made for a key (loaded_storages)
        return _StorageRef(storage, self.typed.setdefault(id(storage), kind.dtype))

    def rebuild_v2(self, storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> Any:
        """``_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, meta])``."""
        if not isinstance(storage, _StorageRef):
            raise BadPickle("a tensor without a storage")
        return _describe(storage.storage, storage.dtype, offset, size, stride, rest)

    def rebuild_v3(
        self, storage: Any, offset: Any, size: Any, stride: Any, grad: Any, hooks: Any,
        dtype: Any, *rest: Any,
    ) -> Any:  # fmt: skip
        """``_rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype[, meta])``."""
        if not isinstance(storage, _StorageRef):
            raise BadPickle("a tensor without a storage")
        if not isinstance(dtype, DType):
            raise BadPickle("a tensor whose dtype is not a torch dtype")
        return _describe(storage.storage, dtype, offset, size, stride, (grad, hooks, *rest))


def _describe(
    storage: DescribedStorage, dtype: DType, offset: Any, size: Any, stride: Any, rest: Any
) -> DescribedTensor:
    """The tensor ``torch.empty(0, dtype).set_(storage, offset, size, stride)`` makes, refusing
    what torch's ``set_`` refuses and what this reader does not model (metadata such as the
    conjugate bit, backward hooks, negative strides)."""
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)):
        raise BadPickle("a tensor whose size and stride are not tuples of one length")
    if not all(type(v) is int and v >= 0 for v in (offset, *size, *stride)):
        raise BadPickle("a tensor with a negative or non-integer size, stride or offset")
    grad = rest[0] if rest else False
    hooks = rest[1] if len(rest) > 1 else None
    if type(grad) is not bool or (hooks is not None and (not isinstance(hooks, dict) or hooks)):
        raise BadPickle("a tensor with backward hooks or an odd requires_grad")
    if len(rest) > 2 and rest[2]:
        raise BadPickle("a tensor with metadata (conjugate or negative bits)")
    if len(rest) > 3:
        raise BadPickle("a tensor with more arguments than torch writes")
    if dtype.itemsize == 0:
        raise BadPickle("a tensor of a dtype without a size")
    if all(size):
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if (last + 1) * dtype.itemsize > storage.size:
            raise BadPickle("a tensor that reaches past its storage")
    return DescribedTensor(dtype, size, stride, offset, storage, requires_grad=grad)


def _rebuild_parameter(data: Any, requires_grad: Any, hooks: Any, *rest: Any) -> DescribedTensor:
    """``_rebuild_parameter(data, requires_grad, backward_hooks)``: ``nn.Parameter(data)``."""
    if rest or not isinstance(data, DescribedTensor) or type(requires_grad) is not bool:
        raise BadPickle("a parameter that is not a tensor")
    if hooks is not None and (not isinstance(hooks, dict) or hooks):
        raise BadPickle("a parameter with backward hooks")
    return DescribedTensor(
        data.dtype, data.shape, data.strides, data.offset, data.storage,
        requires_grad=requires_grad, parameter=True,
    )  # fmt: skip


def describe_torch_pickle(
    data: bytes, storage: Callable[[StorageClass, str, str, int], DescribedStorage]
) -> Any:
    """Unpickle a torch zip's ``data.pkl`` (its opcodes already scanned) into its tree, with a
    :class:`~optckpt.described.DescribedTensor` for each tensor.

    Args:
        data: the pickle.
        storage: gives the storage of ``(class, key, location, nbytes)``, one object per key
            (raising :class:`BadPickle` where the file has no such storage).

    Raises:
        RefusedGlobals: it names a global outside :data:`TORCH_ZIP_GLOBALS`.
        BadPickle: anything this reader does not model, or that torch would refuse.
    """
    tensors = _Tensors(storage, {})
    table: dict[str, Any] = {
        "torch._utils._rebuild_tensor_v2": tensors.rebuild_v2,
        "torch._utils._rebuild_tensor_v3": tensors.rebuild_v3,
        **TORCH_ZIP_GLOBALS,
    }
    return unpickle(data, table, tensors.persistent)


TORCH_ZIP_GLOBALS: dict[str, Any] = {
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "collections.OrderedDict": _ordered_dict,
    **{name: StorageClass(DTYPES[dtype]) for name, dtype in STORAGE_CLASSES.items()},
    # torch's allow-list has UntypedStorage under this name only (torch.save writes it)
    "torch.storage.UntypedStorage": StorageClass(DTYPES["uint8"], untyped=True),
    **DTYPE_GLOBALS,
}
"""The globals of a ``data.pkl`` read for its structure (besides the two tensor rebuild
functions), and what each becomes."""

TORCH_ZIP_NAMES = frozenset(
    {"torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3", *TORCH_ZIP_GLOBALS}
)
"""Every global :func:`describe_torch_pickle` resolves."""
