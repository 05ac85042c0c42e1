"""Every private torch API optckpt calls, in one place.

torch has no public way to write its zip format one storage at a time, to name the storage
class a dtype is pickled as, or to list the globals its weights-only unpickler allows; optckpt
needs all three (:mod:`optckpt.io.torch_format` writes ``torch.save``'s bytes without holding
every cast at once, :mod:`optckpt.io.pickles` checks a pickle against torch's allow-list
before ``torch.load`` sees it). Each wrapper here does exactly what the call site did, and
``tests/test_torch_zip.py`` has one test per wrapper that names the API and the torch version
when a torch upgrade changes it.

Not here: the private names that appear in checkpoints (``torch._utils._rebuild_tensor_v2``,
``torch.serialization._get_layout``) and that :mod:`optckpt.io.dcp.unpickle` matches as
strings without calling torch; ``tests/test_torch_zip.py`` checks that torch still has them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def rebuild_tensor_v2() -> Callable[..., torch.Tensor]:
    """``torch._utils._rebuild_tensor_v2``, the function a dense tensor's pickle calls.

    optckpt's :class:`~optckpt.io.torch_format.Deferred` pickles as the tensor it will become
    (``Tensor._reduce_ex_internal``'s reduction), so the reduction must name this function.

    Returns:
        The function itself (it is pickled by its name).
    """
    rebuild: Callable[..., torch.Tensor] = torch._utils._rebuild_tensor_v2
    return rebuild


def pickle_storage_type(dtype: torch.dtype) -> Any:
    """The storage class (``torch.FloatStorage``, ...) ``torch.save`` names for ``dtype``.

    Wraps ``Tensor._typed_storage()._pickle_storage_type()``: the persistent ID of a
    :class:`~optckpt.io.torch_format.Deferred`'s storage names that class, as torch's does.
    """
    storage = torch.empty(0, dtype=dtype)._typed_storage()  # type: ignore[no-untyped-call]
    name = storage._pickle_storage_type()
    return getattr(torch, name)


def typed_storage_parts(obj: torch.storage.TypedStorage) -> tuple[torch.UntypedStorage, Any, int]:
    """A ``TypedStorage``'s untyped storage, pickled storage class and element count.

    Wraps ``TypedStorage._untyped_storage``, ``TypedStorage._pickle_storage_type()`` and
    ``TypedStorage._size()``, which ``torch.serialization._save``'s ``persistent_id`` reads;
    optckpt's copy of that function must read the same.
    """
    kind = obj._pickle_storage_type()  # type: ignore[no-untyped-call]
    return obj._untyped_storage, getattr(torch, kind), obj._size()  # type: ignore[no-untyped-call]


def open_zipfile_writer(f: Any) -> Any:
    """``torch.serialization._open_zipfile_writer(f)``: torch's zip writer on a file object.

    The context manager ``torch.save`` writes through; entered, it gives the
    ``torch._C.PyTorchFileWriter`` (records stored, 64-byte aligned, CRC32) that
    :func:`write_record` writes to. optckpt writes records itself, one storage at a time.
    """
    return torch.serialization._open_zipfile_writer(f)


def write_record(writer: Any, name: str, data: Any, size: int) -> None:
    """``torch._C.PyTorchFileWriter.write_record(name, data, size)``: one record of the zip.

    ``data`` is a ``str``, ``bytes`` or a CPU ``UntypedStorage`` (written from its memory).
    """
    writer.write_record(name, data, size)


def storage_alignment() -> int | None:
    """``torch.serialization._get_storage_alignment()``, or ``None`` where torch lacks it.

    torch versions that have it write it as the ``.storage_alignment`` record; a byte-identical
    copy of ``torch.save``'s output must too.
    """
    alignment = getattr(torch.serialization, "_get_storage_alignment", None)
    if alignment is None:
        return None
    return int(alignment())


def weights_only_allowed_globals() -> set[str]:
    """The names torch's weights-only unpickler allows by default.

    Wraps ``torch._weights_only_unpickler._get_allowed_globals()`` (its keys): torch has no
    public function for its default list, and it is what
    ``torch.serialization.get_unsafe_globals_in_checkpoint`` compares against.
    """
    from torch import _weights_only_unpickler

    return set(_weights_only_unpickler._get_allowed_globals())
