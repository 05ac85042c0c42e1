"""optckpt's safetensors layout for whole checkpoints, and a zero-copy reader.

safetensors stores a flat ``{name: tensor}`` map plus string metadata. A checkpoint is a tree
(dicts, lists, tuples, numbers, strings, tensors), so optckpt stores:

* every tensor under a readable name: its key path, with optimizer state named the way
  torch.distributed.checkpoint flattens it, ``<key path>.state.<param name or ID>.<state key>``;
* the tree itself as JSON in the metadata key ``optckpt.tree``, each tensor replaced by
  ``{"__tensor__": name}``. Values JSON cannot hold exactly are tagged: tuples
  (``__tuple__``), dicts with non-string keys (``__dict__``: a list of pairs), non-finite floats
  (``__float__``), ``torch.dtype`` (``__dtype__``) and ``torch.device`` (``__device__``).

The names are for people and other tools; reading uses only the tree, so dotted parameter
names never have to be split back.

Reading parses the header itself and maps the file with ``mmap`` (copy-on-write), so tensors
are views of the file that cost no memory until their values are read, like
``torch.load(mmap=True)``.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from optckpt.errors import UnreadableCheckpointError, UsageError
from optckpt.io.pages import FileRanges, copy_range, release, trim_heap
from optckpt.io.torch_format import (
    Deferred,
    end_output,
    open_output,
    recorded_location,
    write_all,
)
from optckpt.statedict import is_optimizer_state_dict, names_of

TREE_KEY = "optckpt.tree"
DEVICES_KEY = "optckpt.devices"
VERSION_KEY = "optckpt.version"
VERSION = "1"

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)

_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
_SLICE = 16 * 1024 * 1024  # bytes per write call


def looks_like_safetensors(head: bytes, size: int) -> bool:
    """Whether the first bytes of a file of ``size`` bytes are a safetensors header.

    A header longer than the file still counts, so that a truncated safetensors file is
    reported as truncated by :func:`read_header` rather than as an unknown format.
    """
    if len(head) < 9 or size < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 0 < length <= _MAX_HEADER and head[8:9] == b"{"


def read_header(path: Path) -> tuple[dict[str, Any], dict[str, str], int]:
    """Read a safetensors header: ``(tensor entries, metadata, offset of the data)``.

    Raises:
        UnreadableCheckpointError: the header is truncated, not JSON, or points past the end.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UnreadableCheckpointError(f"{path}: truncated safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > min(_MAX_HEADER, size - 8):
            raise UnreadableCheckpointError(
                f"{path}: truncated safetensors file (header runs past the end)"
            )
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UnreadableCheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise UnreadableCheckpointError(f"{path}: corrupt safetensors header")
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + length
    for name, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            dtype, shape = entry["dtype"], entry["shape"]
        except (KeyError, TypeError, ValueError) as e:
            raise UnreadableCheckpointError(f"{path}: corrupt safetensors entry {name!r}") from e
        if dtype not in _DTYPES:
            raise UnreadableCheckpointError(
                f"{path}: tensor {name!r} has unsupported dtype {dtype}"
            )
        if start + end > size:
            raise UnreadableCheckpointError(
                f"{path}: truncated safetensors file (tensor {name!r} ends at byte {start + end}, "
                f"the file has {size})"
            )
        expected = math.prod(shape) * _DTYPES[dtype].itemsize
        if end - begin != expected:
            raise UnreadableCheckpointError(
                f"{path}: tensor {name!r} has {end - begin} bytes, expected {expected}"
            )
    return header, metadata, start


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Map every tensor of a safetensors file without reading its values.

    Returns:
        ``(tensors, metadata)``; the tensors are copy-on-write views of the file.
    """
    header, metadata, start = read_header(path)
    tensors: dict[str, torch.Tensor] = {}
    if not header:
        return tensors, metadata
    with path.open("rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        dtype = _DTYPES[entry["dtype"]]
        if end == begin:
            tensors[name] = torch.empty(entry["shape"], dtype=dtype)
            continue
        flat = torch.frombuffer(
            mapped, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=start + begin
        )
        tensors[name] = flat.view(entry["shape"])
    return tensors, metadata


def check_storable(dtypes: Iterable[tuple[str, torch.dtype]]) -> None:
    """Refuse, before any work, tensors safetensors cannot hold (``(name, dtype)`` pairs).

    Raises:
        UsageError: names the first such tensor and its dtype.
    """
    for name, dtype in dtypes:
        if dtype not in _NAMES:
            raise UsageError(f"cannot store {name} in safetensors: it has no {dtype}")


def _decode(node: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if len(node) == 1:
        ((tag, value),) = node.items()
        if tag == "__tensor__":
            return tensors[value]
        if tag == "__tuple__":
            return tuple(_decode(v, tensors) for v in value)
        if tag == "__dict__":
            return {_decode(k, tensors): _decode(v, tensors) for k, v in value}
        if tag == "__float__":
            return float(value)
        if tag == "__dtype__":
            return getattr(torch, value)
        if tag == "__device__":
            return torch.device(value)
    return {k: _decode(v, tensors) for k, v in node.items()}


def read_safetensors(path: Path, saved_devices: dict[int, str] | None = None) -> Any:
    """Read a safetensors file: the checkpoint tree when optckpt wrote it, else ``{name: tensor}``.

    Tensors are on the CPU. The device each was saved from, where optckpt recorded one other
    than the CPU (metadata ``optckpt.devices``), goes into ``saved_devices`` by storage
    address, as :func:`optckpt.io.load_checkpoint` records it for torch files.

    Raises:
        UnreadableCheckpointError: a corrupt header, or a tree that names a missing tensor.
    """
    tensors, metadata = load_tensors(path)
    tree = metadata.get(TREE_KEY)
    if tree is None:
        return tensors
    try:
        devices = json.loads(metadata.get(DEVICES_KEY, "{}"))
        if saved_devices is not None:
            for name, device in devices.items():
                address = tensors[name].untyped_storage().data_ptr()
                if address:  # an empty tensor has none to key on: it reads as the CPU's
                    saved_devices[address] = str(device)
        return _decode(json.loads(tree), tensors)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise UnreadableCheckpointError(f"{path}: corrupt optckpt metadata ({e!r})") from e


class _Encoder:
    """Turns a checkpoint tree into JSON plus a ``{name: tensor}`` map."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor | Deferred] = {}
        self._by_object: dict[int, str] = {}

    def tensor(self, value: torch.Tensor | Deferred, name: str) -> dict[str, str]:
        if id(value) in self._by_object:  # the same tensor twice stays one tensor
            return {"__tensor__": self._by_object[id(value)]}
        unique, n = name, 1
        while unique in self.tensors:
            n += 1
            unique = f"{name}#{n}"
        if isinstance(value, torch.Tensor) and value.device.type == "meta":
            raise UsageError(f"cannot store {name}: a meta tensor has no data")
        if value.dtype not in _NAMES:
            raise UsageError(f"cannot store {name}: safetensors has no {value.dtype}")
        # made contiguous on the CPU only when written (_stored), one at a time
        self.tensors[unique] = value
        self._by_object[id(value)] = unique
        return {"__tensor__": unique}

    def encode(self, node: Any, name: str) -> Any:
        if isinstance(node, (torch.Tensor, Deferred)):
            return self.tensor(node, name)
        if node is None or isinstance(node, (bool, int, str)):
            return node
        if isinstance(node, float):
            return node if math.isfinite(node) else {"__float__": repr(node)}
        if isinstance(node, torch.dtype):
            return {"__dtype__": str(node).removeprefix("torch.")}
        if isinstance(node, torch.device):
            return {"__device__": str(node)}
        if isinstance(node, tuple):
            return {"__tuple__": [self.encode(v, f"{name}.{i}") for i, v in enumerate(node)]}
        if isinstance(node, list):
            return [self.encode(v, f"{name}.{i}") for i, v in enumerate(node)]
        if isinstance(node, Mapping):
            if is_optimizer_state_dict(node):
                return self.optimizer(node, name)
            return self.mapping(node, name, {})
        raise UsageError(
            f"cannot store a {type(node).__name__} at {name or 'the top level'} in safetensors"
        )

    def mapping(self, node: Mapping[Any, Any], name: str, labels: Mapping[Any, str]) -> Any:
        prefix = f"{name}." if name else ""
        if all(isinstance(k, str) and not k.startswith("__") for k in node):
            return {k: self.encode(v, prefix + labels.get(k, k)) for k, v in node.items()}
        return {
            "__dict__": [
                [self.encode(k, f"{prefix}key"), self.encode(v, prefix + labels.get(k, str(k)))]
                for k, v in node.items()
            ]
        }

    def optimizer(self, node: Mapping[str, Any], name: str) -> Any:
        prefix = f"{name}." if name else ""
        out = {}
        for k, v in node.items():
            if k == "state" and isinstance(v, Mapping):
                out[k] = self.mapping(v, prefix + "state", names_of(node))
            else:
                out[k] = self.encode(v, prefix + str(k))
        return out


def write_safetensors(
    tree: Any,
    path: Path,
    *,
    progress: Callable[[int], None] | None = None,
    sources: Iterable[str | Path] = (),
    saved_devices: Mapping[int, str] | None = None,
) -> None:
    """Write a checkpoint tree as one safetensors file in optckpt's layout (see module doc).

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
        saved_devices: the device to record for CPU tensors, by storage address (see
            :attr:`optckpt.io.Checkpoint.saved_devices`); tensors on another device record
            theirs. Devices other than the CPU go into the metadata ``optckpt.devices``.

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
    devices = _devices(encoder.tensors, saved_devices or {})
    if devices:
        metadata[DEVICES_KEY] = json.dumps(devices)
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, tensor in encoder.tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    sources = list(sources)
    with open_output(path) as f, FileRanges(sources) as ranges:
        write_all(f, struct.pack("<Q", len(blob)) + blob)
        for value in encoder.tensors.values():
            if not value.numel():
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
                data = tensor.reshape(-1).view(torch.uint8).numpy().data
                for start in range(done, nbytes, _SLICE):
                    piece = data[start : start + _SLICE]
                    write_all(f, piece)
                    if progress is not None:
                        progress(len(piece))
            del tensor
            # pages read from a mapped input can go
            read = value.source if isinstance(value, Deferred) else value
            ranges.drop(read.data_ptr(), read.numel() * read.element_size())
            if isinstance(value, Deferred):
                trim_heap()  # see optckpt.io.pages.trim_heap
        end_output(f)
    release(sources)


def _devices(
    tensors: Mapping[str, torch.Tensor | Deferred], saved_devices: Mapping[int, str]
) -> dict[str, str]:
    """The tensors saved from a device other than the CPU, by name (casts made here: the CPU)."""
    devices = {}
    for name, value in tensors.items():
        if isinstance(value, Deferred):
            continue
        device = recorded_location(value.untyped_storage(), saved_devices)
        if device != "cpu":
            devices[name] = device
    return devices


def _stored(value: torch.Tensor | Deferred) -> torch.Tensor:
    """The tensor as safetensors stores it: contiguous, on the CPU."""
    if isinstance(value, Deferred):
        return value.materialize().contiguous()
    return value.detach().to("cpu").contiguous()
