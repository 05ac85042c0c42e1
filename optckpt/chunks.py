"""Reading a tensor's values in bounded chunks.

``inspect --stats`` and ``diff`` reduce every state tensor. A tensor is read as 1-dim chunks of
at most :data:`CHUNK` elements: a view where the tensor is contiguous, else a copy of that
chunk only (``reshape(-1)`` of a non-contiguous tensor would copy all of it at once).

A tensor can claim far more elements than it holds: ``torch.zeros(1).expand(10**6, 10**6)``
is one float with zero strides, and a loop over its 10^12 logical elements would never end.
:func:`check_bounded` refuses a tensor whose logical bytes exceed its storage's by more than
:data:`MAX_EXCESS_BYTES` (the bound the loader applies too), so the work of reading one is
at most its storage plus that bound.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import torch

from optckpt.errors import UnreadableCheckpointError

__all__ = [
    "CHUNK",
    "MAX_EXCESS_BYTES",
    "bits_dtype",
    "check_bounded",
    "chunk_slices",
    "chunks",
    "logical_bytes",
    "readable",
    "reducible",
    "same_bits",
]

CHUNK = 1 << 22
"""Elements read at a time."""

MAX_EXCESS_BYTES = 64 * 2**20
"""How many more bytes a tensor's shape may claim than its storage holds (an expanded view)."""


def logical_bytes(tensor: torch.Tensor) -> int:
    """The bytes the tensor's shape claims, as a Python int (no int64 overflow)."""
    return math.prod(tensor.shape) * tensor.element_size()


def check_bounded(tensor: torch.Tensor, where: str) -> None:
    """Refuse a tensor whose shape claims more than its storage holds by over the bound.

    Meta tensors (no data) and tensors without a storage (sparse) are not read, and pass.

    Raises:
        UnreadableCheckpointError: zero or overlapping strides that claim more than
            :data:`MAX_EXCESS_BYTES` beyond the storage; the message names ``where``.
    """
    if tensor.layout != torch.strided or tensor.device.type == "meta":
        return
    claimed = logical_bytes(tensor)
    if claimed <= MAX_EXCESS_BYTES:
        return
    try:
        held = tensor.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):  # a tensor kind without a storage
        return
    if claimed - held > MAX_EXCESS_BYTES:
        raise UnreadableCheckpointError(
            f"{where}: a tensor of shape {list(tensor.shape)} claims {claimed:,} bytes but its "
            f"storage holds {held:,} (zero or overlapping strides); optckpt reads at most "
            f"{MAX_EXCESS_BYTES // 2**20} MiB more than a tensor holds"
        )


def chunk_slices(
    shape: tuple[int, ...] | torch.Size, size: int = CHUNK
) -> Iterator[tuple[int | slice, ...]]:
    """Indices that cut a tensor of ``shape`` into blocks of at most ``size`` elements each,
    in row-major order; each block is whole rows of the trailing dimensions where they fit.

    The same indices cut two tensors of the same shape at the same places, whatever their
    strides.
    """
    if len(shape) == 0:
        yield ()
        return
    inner = math.prod(shape[1:])
    if shape[0] == 0 or inner == 0:
        return
    if inner <= size:
        rows = size // inner
        for start in range(0, shape[0], rows):
            yield (slice(start, start + rows),)
        return
    for index in range(shape[0]):
        for rest in chunk_slices(tuple(shape[1:]), size):
            yield (index, *rest)


def chunks(tensor: torch.Tensor, size: int = CHUNK) -> Iterator[torch.Tensor]:
    """The tensor's elements as 1-dim chunks of at most ``size`` (see :func:`chunk_slices`).

    Call :func:`check_bounded` first: this reads every logical element.
    """
    for index in chunk_slices(tensor.shape, size):
        yield tensor[index].reshape(-1)


# Dtypes torch reduces and compares natively on the CPU (isfinite, norm, aminmax, isclose).
_NATIVE = frozenset(
    {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128}
)


@functools.cache
def readable(dtype: torch.dtype) -> bool:
    """Whether values of ``dtype`` convert to float64 (complex128) for reductions; the float8
    family does, packed types such as ``float4_e2m1fn_x2`` do not."""
    try:
        torch.zeros(1, dtype=dtype).to(torch.complex128 if dtype.is_complex else torch.float64)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True


def reducible(chunk: torch.Tensor) -> torch.Tensor:
    """``chunk`` in a dtype torch's reductions support on the CPU: as it is for the usual
    float and complex dtypes, else converted to float64 (complex128) — a copy of one chunk.
    Call only for :func:`readable` dtypes."""
    if chunk.dtype in _NATIVE:
        return chunk
    return chunk.to(torch.complex128 if chunk.is_complex() else torch.float64)


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """The integer dtype whose view compares ``dtype`` bit by bit, where values should be
    compared so: floats (equal NaNs are equal, -0.0 differs from 0.0), and dtypes the CPU
    cannot compare by value (complex32, packed types); ``None`` for the others (integers and
    bools, whose values are their bits; complex64 and complex128), and for a dtype that
    needs a view but has none of its size."""
    if dtype.is_floating_point or dtype == torch.complex32 or not readable(dtype):
        return _BITS.get(dtype.itemsize)
    return None


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors hold the same bits: the same shape, dtype and device, and equal
    elements through the :func:`bits_dtype` view (by value for the dtypes without one).

    The one meaning of "bitwise" in optckpt: ``diff`` without a tolerance, and
    ``resume-step --check-torch`` without ``--atol``. Reads the whole of both tensors.
    """
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    bits = bits_dtype(a.dtype)
    if bits is not None:
        return torch.equal(a.view(bits), b.view(bits))
    return torch.equal(a, b)
