"""Whether two values are the same, and how two tensors differ: bitwise by default (two NaNs
with the same bits are equal, -0.0 differs from 0.0), or as ``torch.isclose(a, b, rtol, atol,
equal_nan=True)``; read in chunks, and for tensors described from files (no torch), first
compared as the files' bytes. The values :mod:`optckpt.diff` compares."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

from optckpt.described import DescribedTensor, dtype_name, is_tensor
from optckpt.errors import UnreadableCheckpointError

if TYPE_CHECKING:
    import torch

__all__ = ["as_torch", "count_differing", "same_bytes", "same_value"]

_CHUNK = 1 << 22  # elements compared at a time
_BLOCK = 1 << 24  # bytes read at a time when comparing files' bytes


def same_value(a: Any, b: Any) -> bool:
    """Equality for hyperparameters and other plain values (NaN equals NaN, tensors by value)."""
    if is_tensor(a) or is_tensor(b):
        return (
            is_tensor(a)
            and is_tensor(b)
            and tuple(a.shape) == tuple(b.shape)
            and dtype_name(a.dtype) == dtype_name(b.dtype)
            and count_differing(a, b, None)[0] == 0
        )
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return (
            type(a) is type(b) and len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
        )
    return bool(type(a) is type(b) and a == b)


def count_differing(
    a: torch.Tensor,
    b: torch.Tensor,
    tolerance: tuple[float, float] | None,
    where: str = "a state tensor",
) -> tuple[int, float, float]:
    """``(differing elements, max abs difference, max relative difference)`` of two tensors
    of the same shape, read in chunks (:mod:`optckpt.chunks`); of the same dtype too unless a
    tolerance is given and both dtypes are :func:`~optckpt.chunks.readable`. Where values
    cannot be converted to compute differences, the maxima are NaN.

    Raises:
        UnreadableCheckpointError: a tensor claims far more elements than its storage holds
            (zero strides), or is not dense.
    """
    if tolerance is None and same_bytes(a, b):
        return 0, 0.0, 0.0  # described tensors whose files hold the same bytes: no tensors
    import torch

    from optckpt.chunks import (
        bits_dtype,
        check_bounded,
        chunk_slices,
        readable,
        reducible,
        same_bits,
    )

    a, b = as_torch(a).detach(), as_torch(b).detach()
    for tensor in (a, b):
        if tensor.layout != torch.strided:
            layout = str(tensor.layout).removeprefix("torch.")
            raise UnreadableCheckpointError(
                f"{where}: a {layout} tensor; optckpt compares dense tensors"
            )
        check_bounded(tensor, where)
    numeric = readable(a.dtype) and readable(b.dtype)
    bits = bits_dtype(a.dtype) if a.dtype == b.dtype else None
    if same_bits(a, b):
        # One read of each side, no temporaries: the common case of equal tensors. Equal bits
        # mean no differing element under either test (isclose has equal_nan=True).
        return 0, 0.0, 0.0
    differing, max_abs, max_rel = 0, 0.0, 0.0
    for index in chunk_slices(a.shape, _CHUNK):
        ca, cb = a[index].reshape(-1), b[index].reshape(-1)
        if tolerance is None or not numeric:
            if bits is not None:  # bitwise: equal NaNs are equal, -0.0 differs from 0.0
                mask = ca.contiguous().view(bits) != cb.contiguous().view(bits)
            else:
                mask = ca != cb
        else:
            rtol, atol = tolerance
            ca, cb = reducible(ca), reducible(cb)
            if ca.dtype != cb.dtype:
                wide = torch.complex128 if ca.is_complex() or cb.is_complex() else torch.float64
                ca, cb = ca.to(wide), cb.to(wide)
            mask = ~torch.isclose(ca, cb, rtol=rtol, atol=atol, equal_nan=True)
        n = int(mask.sum())
        if n == 0:
            continue
        differing += n
        if not numeric:
            max_abs = max_rel = math.nan
            continue
        wide = torch.complex128 if ca.is_complex() or cb.is_complex() else torch.float64
        da, db = ca[mask].to(wide), cb[mask].to(wide)
        diff = (da - db).abs()
        finite = torch.isfinite(diff)
        if bool(finite.any()):
            diff = diff[finite]
            max_abs = max(max_abs, float(diff.max()))
            rel = diff / db[finite].abs().clamp_min(torch.finfo(torch.float64).tiny)
            max_rel = max(max_rel, float(rel.max()))
        if not bool(finite.all()):
            max_abs = max_rel = math.inf
    return differing, max_abs, max_rel


def as_torch(tensor: Any) -> Any:
    """A tensor to compute on: a described one made (a view of its file), others as they are."""
    return tensor.to_torch() if isinstance(tensor, DescribedTensor) else tensor


def same_bytes(a: Any, b: Any) -> bool:
    """Whether two described tensors of one dtype, each one contiguous run of its file, hold
    the same bytes: the files are read in large blocks and compared, no tensor is made
    (``False`` also where that cannot tell: then the values are compared as tensors)."""
    if not (isinstance(a, DescribedTensor) and isinstance(b, DescribedTensor)):
        return False
    ra, rb = a.byte_range(), b.byte_range()
    fa, fb = a.storage.file, b.storage.file
    if a.dtype != b.dtype or ra is None or rb is None or ra[1] != rb[1] or not fa or not fb:
        return False
    (start_a, nbytes), (start_b, _) = ra, rb
    with open(fa, "rb", buffering=0) as xa, open(fb, "rb", buffering=0) as xb:
        for done in range(0, nbytes, _BLOCK):
            n = min(_BLOCK, nbytes - done)
            # bytes == bytes is one memcmp; glibc reuses the freed blocks (no page faults)
            block_a = os.pread(xa.fileno(), n, start_a + done)
            if len(block_a) != n or block_a != os.pread(xb.fileno(), n, start_b + done):
                return False
    return True
