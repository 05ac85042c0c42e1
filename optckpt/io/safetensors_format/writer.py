"""Writing a checkpoint tree as one safetensors file, tensor by tensor."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optckpt.described import DescribedTensor, Run, runs
from optckpt.errors import UsageError
from optckpt.io.outfile import (
    end_output,
    is_deferred,
    open_output,
    recorded_location,
    storage_locations,
    write_all,
)
from optckpt.io.pages import FileRanges, copy_range, release, trim_heap
from optckpt.io.runs import Files, copy_runs
from optckpt.io.safetensors_format.header import safetensors_dtype
from optckpt.io.safetensors_format.tree import DEVICES_KEY, TREE_KEY, VERSION, VERSION_KEY, _Encoder
from optckpt.locate import KeyPath

if TYPE_CHECKING:
    import torch

    from optckpt.io.torch_format import Deferred

_SLICE = 16 * 1024 * 1024  # bytes per write call


def check_storable(dtypes: Iterable[tuple[str, torch.dtype]]) -> None:
    """Refuse, before any work, tensors safetensors cannot hold (``(name, dtype)`` pairs).

    Raises:
        UsageError: names the first such tensor and its dtype.
    """
    for name, dtype in dtypes:
        if safetensors_dtype(dtype) is None:
            raise UsageError(f"cannot store {name} in safetensors: it has no {dtype}")


def write_safetensors(
    tree: Any,
    path: Path,
    *,
    progress: Callable[[int], None] | None = None,
    sources: Iterable[str | Path] = (),
    placement: Mapping[KeyPath, str] | None = None,
) -> None:
    """Write a checkpoint tree as one safetensors file in optckpt's layout
    (see :mod:`optckpt.io.safetensors_format`).

    The file is written tensor by tensor, so memory stays flat: a tensor that is a view of
    one of the memory-mapped ``sources`` is copied from its file inside the kernel
    (``os.copy_file_range``, as ``cp`` does); others are written in slices, and a
    :class:`~optckpt.io.torch_format.Deferred` cast is made only when its turn comes. Pages of
    the ``sources`` that have been copied are released as the writing goes
    (:func:`optckpt.io.pages.release`). Tensors that share storage are stored separately;
    the same tensor object twice is stored once.

    Args:
        tree: the checkpoint.
        path: the file to write (the caller makes it atomic).
        progress: called with the number of bytes of each slice written.
        sources: memory-mapped input files (private mappings never written to) whose pages
            may be dropped and whose bytes may be copied from the files.
        placement: the device to record for CPU tensors, by key path (see
            :attr:`optckpt.io.Checkpoint.placement` and
            :func:`~optckpt.io.torch_format.storage_locations`); tensors on another device
            record theirs. Devices other than the CPU go into the metadata
            ``optckpt.devices``.

    Raises:
        UsageError: the tree holds a value safetensors cannot represent.
    """
    encoder = _Encoder()
    encoded = encoder.encode(tree, "")
    metadata = {
        "format": "pt",
        VERSION_KEY: VERSION,
        TREE_KEY: json.dumps(encoded, allow_nan=False),
    }
    devices = _devices(encoder.tensors, storage_locations(tree, placement or {}))
    if devices:
        metadata[DEVICES_KEY] = json.dumps(devices)
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, tensor in encoder.tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": safetensors_dtype(tensor.dtype),
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    sources = list(sources)
    with open_output(path) as f, FileRanges(sources) as ranges, Files() as files:
        write_all(f, struct.pack("<Q", len(blob)) + blob)
        for value in encoder.tensors.values():
            if not value.numel():
                continue
            if isinstance(value, DescribedTensor):  # bytes of a file: copied, never made
                copy_runs(_runs_of(value), f, files, progress)
                continue
            tensor = _stored(value)
            nbytes = tensor.numel() * tensor.element_size()
            found = ranges.find(tensor.data_ptr(), nbytes)
            done = 0
            if found is not None:  # a view of a mapped input: copy it in the kernel, like cp
                fd, offset = found
                done = copy_range(fd, offset, f.fileno(), nbytes)
            if progress is not None and done:
                progress(done)
            if done < nbytes:
                _write_from(f, tensor, done, progress)
            del tensor  # its memory goes now (nothing else holds it), before the next is made
            # pages read from a mapped input can go
            read = value.source if is_deferred(value) else value
            ranges.drop(read.data_ptr(), read.numel() * read.element_size())
            if is_deferred(value):
                trim_heap()  # see optckpt.io.pages.trim_heap
        end_output(f)
    release(sources)


def _write_from(
    f: Any, tensor: torch.Tensor, start: int, progress: Callable[[int], None] | None
) -> None:
    """Write the contiguous ``tensor``'s bytes from ``start`` on, in slices; the views of it
    made here go when it returns."""
    import torch

    data = tensor.reshape(-1).view(torch.uint8).numpy().data
    for first in range(start, len(data), _SLICE):
        piece = data[first : first + _SLICE]
        write_all(f, piece)
        if progress is not None:
            progress(len(piece))


def _devices(
    tensors: Mapping[str, torch.Tensor | Deferred],
    locations: Mapping[Any, str],
) -> dict[str, str]:
    """The tensors saved from a device other than the CPU, by name (a cast records the device
    ``locations`` gives it, else the CPU, where it is made)."""
    devices = {}
    for name, value in tensors.items():
        if is_deferred(value):
            device = locations.get(value, "cpu")
        else:
            device = recorded_location(value.untyped_storage(), locations)
        if device != "cpu":
            devices[name] = device
    return devices


def _stored(value: torch.Tensor | Deferred) -> torch.Tensor:
    """The tensor as safetensors stores it: contiguous, on the CPU."""
    from optckpt.io.torch_format import Deferred

    if isinstance(value, Deferred):
        return value.materialize().contiguous()
    return value.detach().to("cpu").contiguous()


def _runs_of(tensor: DescribedTensor) -> list[Run]:
    """The runs of files holding a described tensor's bytes, as safetensors stores them.

    Raises:
        ValueError: a tensor that is not one contiguous run of its storage (the caller reads
            such a file with torch instead, see :meth:`optckpt.io.rewrite.Rewrite.load`).
    """
    if not tensor.is_contiguous():
        raise ValueError("a described tensor that is not contiguous cannot be copied as bytes")
    nbytes = tensor.numel() * tensor.element_size()
    return runs(tensor.storage, tensor.offset * tensor.element_size(), nbytes)
