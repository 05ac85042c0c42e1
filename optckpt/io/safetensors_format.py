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
``torch.load(mmap=True)``. A file is untrusted input: every header field is checked, by
safetensors' own rules, before any tensor is made (:func:`read_header`), and each tag of the
tree decodes only to a value of its own kind (:class:`_TreeDecoder`); anything else is one
:class:`~optckpt.errors.UnreadableCheckpointError` naming the file and the entry.
"""

from __future__ import annotations

import json
import math
import mmap
import reprlib
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from optckpt.errors import UnreadableCheckpointError, UsageError
from optckpt.io.pages import FileRanges, copy_range, release, trim_heap
from optckpt.io.torch_format import (
    Deferred,
    end_output,
    open_output,
    recorded_location,
    storage_locations,
    write_all,
)
from optckpt.locate import KeyPath, tensor_paths
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
_MAX_HEADER = 100_000_000  # safetensors' own limit (MAX_HEADER_SIZE)
_MAX_NUMEL = 2**63 - 1  # torch's sizes and strides are int64
# More dimensions than any optimizer state has: torch keeps a size and a stride per dimension,
# so a 100 MB header of [1, 1, ...] shapes would otherwise cost gigabytes of them.
_MAX_DIMS = 64
# Nesting of the optckpt.tree JSON. A checkpoint is a few levels deep; decoding takes up to
# three Python frames a level, and this bound keeps them well inside the interpreter's 1000.
_MAX_DEPTH = 100
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
    """Read and validate a safetensors header: ``(tensor entries, metadata, offset of the data)``.

    Every field is checked before any tensor is made, by the rules of the reference reader
    (safetensors' Rust ``Metadata::validate``): the header is UTF-8 JSON, an object without
    repeated keys; ``__metadata__`` is absent, null or a mapping of strings to strings; each
    entry has a known ``dtype``, a ``shape`` of non-negative integers and ``data_offsets`` of
    two integers ``0 <= begin <= end``; ``end - begin`` is the shape times the dtype's size;
    sorted by offset, the entries cover the data section exactly, without gaps or overlaps and
    without bytes after the last one. Stricter than safetensors, for torch's sake: sizes and
    offsets below 2**63, at most 64 dimensions, non-zero sizes whose product fits in int64.
    The file is then opened with ``safetensors.safe_open`` as well
    (see :func:`_check_with_safetensors`).

    Returns:
        ``{name: {"dtype": str, "shape": list[int], "data_offsets": [begin, end]}}`` with only
        those keys, the metadata, and the byte at which the data section starts.

    Raises:
        UnreadableCheckpointError: the first field that breaks a rule, naming the tensor.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UnreadableCheckpointError(f"{path}: truncated safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > _MAX_HEADER:
            raise UnreadableCheckpointError(
                f"{path}: corrupt safetensors header ({length} bytes long; "
                f"safetensors allows {_MAX_HEADER})"
            )
        if length > size - 8:
            raise UnreadableCheckpointError(
                f"{path}: truncated safetensors file (header runs past the end)"
            )
        raw = f.read(length)
    if len(raw) < length:
        raise UnreadableCheckpointError(f"{path}: truncated safetensors file (changed while read)")
    header = _parse_header(path, raw)
    metadata = _metadata(path, header.pop("__metadata__", None))
    entries = {name: _entry(path, name, entry, size - 8 - length) for name, entry in header.items()}
    _check_coverage(path, entries, size - 8 - length)
    _check_with_safetensors(path, entries, metadata)
    return entries, metadata, 8 + length


def _parse_header(path: Path, raw: bytes) -> dict[str, Any]:
    # Decoded as UTF-8 explicitly: json.loads(bytes) would also guess UTF-16 or UTF-32, which
    # safetensors refuses, and two readers that disagree on a header are an attack surface.
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError as e:
        raise UnreadableCheckpointError(f"{path}: corrupt safetensors header (not UTF-8)") from e
    except RecursionError as e:
        raise UnreadableCheckpointError(
            f"{path}: corrupt safetensors header (nested too deeply)"
        ) from e
    except ValueError as e:  # JSONDecodeError, a repeated key, an integer of > 4300 digits
        raise UnreadableCheckpointError(
            f"{path}: corrupt safetensors header ({_first_clause(e)})"
        ) from e
    if not isinstance(header, dict):
        raise UnreadableCheckpointError(
            f"{path}: corrupt safetensors header (JSON {_kind(header)}, not an object)"
        )
    return header


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's pairs as a dict; a key given twice is refused (json keeps the last)."""
    out = dict(pairs)
    if len(out) != len(pairs):  # rare: find the key for the message
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"key {_show(key)} appears twice")
            seen.add(key)
    return out


def _metadata(path: Path, metadata: Any) -> dict[str, str]:
    if metadata is None:  # safetensors reads a missing or null __metadata__ as none
        return {}
    if not isinstance(metadata, dict):
        raise UnreadableCheckpointError(
            f"{path}: corrupt safetensors header (__metadata__ is {_kind(metadata)}, "
            "not a mapping of strings)"
        )
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise UnreadableCheckpointError(
                f"{path}: corrupt safetensors header (__metadata__ {_show(key)} is "
                f"{_kind(value)}, not a string)"
            )
    return metadata


def _entry(path: Path, name: str, entry: Any, data_size: int) -> dict[str, Any]:
    """One tensor's entry, checked field by field; ``data_size``: bytes in the data section."""
    if not isinstance(entry, dict):
        raise _bad_entry(path, name, f"is {_kind(entry)}, not an object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise _bad_entry(path, name, f"has no {key}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise UnreadableCheckpointError(
            f"{path}: tensor {_show(name)} has unsupported dtype {_show(dtype)}"
        )
    if not _sizes(shape):
        raise _bad_entry(
            path, name, f"has shape {_show(shape)}, not a list of integers from 0 to 2**63 - 1"
        )
    if len(shape) > _MAX_DIMS:
        raise _bad_entry(path, name, f"has {len(shape)} dimensions, more than {_MAX_DIMS}")
    # torch keeps sizes and strides as int64: a shape whose non-zero sizes multiply past that
    # cannot be made, even when a zero size leaves it empty (safetensors checks the same
    # product, zeros included, against its usize)
    if math.prod(filter(None, shape)) > _MAX_NUMEL:
        raise _bad_entry(path, name, f"has shape {_show(shape)}, too large for a tensor")
    if not (_sizes(offsets) and len(offsets) == 2):
        raise _bad_entry(
            path, name, f"has data_offsets {_show(offsets)}, not two integers from 0 to 2**63 - 1"
        )
    begin, end = offsets
    if begin > end:
        raise _bad_entry(path, name, f"has data_offsets {_show(offsets)}, ending before they begin")
    if end > data_size:
        raise UnreadableCheckpointError(
            f"{path}: truncated safetensors file (tensor {_show(name)} ends at byte {end} "
            f"of the data, which has {data_size})"
        )
    expected = math.prod(shape) * _DTYPES[dtype].itemsize
    if end - begin != expected:
        raise _bad_entry(
            path,
            name,
            f"has {end - begin} bytes; its shape {_show(shape)} of {dtype} needs {expected}",
        )
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def _bad_entry(path: Path, name: str, reason: str) -> UnreadableCheckpointError:
    return UnreadableCheckpointError(
        f"{path}: corrupt safetensors header: tensor {_show(name)} {reason}"
    )


def _sizes(value: Any) -> bool:
    """Whether ``value`` is a list of integers from 0 to 2**63 - 1 (safetensors: ``usize``;
    torch: int64). ``bool`` is an int to Python, not to JSON or safetensors."""
    if type(value) is not list:
        return False
    for item in value:  # noqa: SIM110 (a loop is 4x faster than all() on short lists)
        if type(item) is not int or not 0 <= item <= _MAX_NUMEL:
            return False
    return True


def _check_coverage(path: Path, entries: Mapping[str, dict[str, Any]], data_size: int) -> None:
    """The entries, sorted by offset, tile the data section: no overlap, no gap, nothing after.

    This is what safetensors' reader enforces (``InvalidOffset`` for a gap or an overlap,
    ``MetadataIncompleteBuffer`` for bytes after the last tensor), so a file optckpt reads is
    one that every safetensors reader reads the same way; empty tensors may share an offset.
    """
    position, previous = 0, None
    for begin, end, name in sorted((*e["data_offsets"], n) for n, e in entries.items()):
        if begin != position:
            if begin < position:
                reason = f"overlaps tensor {_show(previous)}, which ends at byte {position}"
            else:
                reason = f"leaves bytes {position}..{begin} of the data to no tensor"
            raise UnreadableCheckpointError(
                f"{path}: corrupt safetensors header: tensor {_show(name)} at bytes "
                f"{begin}..{end} {reason}"
            )
        position, previous = end, name
    if position != data_size:
        raise UnreadableCheckpointError(
            f"{path}: corrupt safetensors header: the data has {data_size - position} bytes "
            f"after the last tensor, which ends at byte {position}"
        )


def _check_with_safetensors(
    path: Path, entries: Mapping[str, Any], metadata: Mapping[str, str]
) -> None:
    """Open the file with the reference reader too, and refuse it if that reads it otherwise.

    The checks above already mirror safetensors' own (and give messages that name the tensor);
    ``safe_open`` parses only the header (its ``mmap`` reads no data), which costs a fraction
    of the Python parse, so it runs on every file as a second opinion: a header the two
    readers see differently is refused rather than read one way here and another way by the
    tool that loads the result. An older safetensors that does not know a dtype optckpt reads
    ("unknown variant `C64`" before safetensors 0.7; optckpt allows 0.4) is no disagreement:
    the dtypes were checked above.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            names, theirs = set(f.keys()), f.metadata() or {}
    except SafetensorError as e:
        if "unknown variant" in str(e):
            return
        raise UnreadableCheckpointError(f"{path}: safetensors refuses the file ({e})") from e
    if names != set(entries) or theirs != dict(metadata):
        raise UnreadableCheckpointError(
            f"{path}: corrupt safetensors header (safetensors reads other tensors or metadata)"
        )


def _first_clause(error: Exception) -> str:
    """A parser's message up to its advice ("...; use sys.set_int_max_str_digits() ...")."""
    return str(error).split(";")[0]


def _kind(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages: "a list", "an object"."""
    return _JSON_KINDS.get(type(value), "a value")


_JSON_KINDS = {
    dict: "an object",
    list: "a list",
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


def _show(value: Any) -> str:
    """A value from the file, for a one-line message: repr'd (control characters escaped)
    and cut short, however long or deep it is."""
    return _SHORT.repr(value)


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlist = _SHORT.maxdict = 8
_SHORT.maxlevel = 3


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Map every tensor of a safetensors file without reading its values.

    Returns:
        ``(tensors, metadata)``; the tensors are copy-on-write views of the file.

    Raises:
        UnreadableCheckpointError: the header breaks a rule (:func:`read_header`), or the
            file changed size since the header was read.
    """
    header, metadata, start = read_header(path)
    tensors: dict[str, torch.Tensor] = {}
    if not header:
        return tensors, metadata
    with path.open("rb") as f:
        try:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except ValueError:  # emptied since: "cannot mmap an empty file"
            mapped = None
    expected = start + max(entry["data_offsets"][1] for entry in header.values())
    if mapped is None or len(mapped) != expected:  # offsets were checked against stat()'s size
        raise UnreadableCheckpointError(
            f"{path}: truncated safetensors file (it changed size while being read)"
        )
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


class _CorruptTree(Exception):
    """A value in ``optckpt.tree`` or ``optckpt.devices`` that optckpt never writes."""


class _TreeDecoder:
    """Rebuilds the checkpoint tree from its JSON, checking every tag.

    A tag decodes only to a value of its own kind: ``__dtype__`` to a ``torch.dtype`` by its
    name, ``__device__`` to a device of a known type, ``__float__`` to a float from its repr,
    ``__tensor__`` to a tensor of this file, ``__tuple__`` and ``__dict__`` from lists. A dict
    key that starts with ``__`` outside a tag is never written (the writer puts such dicts in
    ``__dict__``), so it is refused too. The key path being decoded is kept as a stack and
    spelled out only in an error message.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.where: list[Any] = []
        self.placed: list[tuple[KeyPath, str]] = []  # (key path, tensor name) of each tensor

    def corrupt(self, reason: str) -> _CorruptTree:
        at = ".".join(
            str(k) if isinstance(k, (str, int, float)) else f"<{type(k).__name__}>"
            for k in self.where
        )
        return _CorruptTree(f"{reason} at {_show(at) if at else 'the top'}")

    def decode(self, node: Any) -> Any:
        if len(self.where) > _MAX_DEPTH:
            raise self.corrupt(f"nested more than {_MAX_DEPTH} levels deep")
        if isinstance(node, list):
            return self.items(node)
        if not isinstance(node, dict):
            return node  # str, int, float, bool, None: JSON has nothing else
        tags = [k for k in node if k.startswith("__")]
        if tags:
            if len(node) > 1 or tags[0] not in _TAGS:
                raise self.corrupt(f"unknown tag {_show(tags[0])}")
            ((tag, value),) = node.items()
            return _TAGS[tag](self, value)
        out = {}
        self.where.append(None)  # loops, not comprehensions: fewer frames a level
        for key, child in node.items():
            self.where[-1] = key
            out[key] = self.decode(child)
        self.where.pop()
        return out

    def items(self, nodes: list[Any]) -> list[Any]:
        out = []
        self.where.append(0)
        for i, child in enumerate(nodes):
            self.where[-1] = i
            out.append(self.decode(child))
        self.where.pop()
        return out

    def as_tensor(self, value: Any) -> torch.Tensor:
        if not isinstance(value, str) or value not in self.tensors:
            raise self.corrupt(f"__tensor__ {_show(value)} names no tensor of the file")
        self.placed.append((tuple(self.where), value))
        return self.tensors[value]

    def as_tuple(self, value: Any) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise self.corrupt(f"__tuple__ holds {_kind(value)}, not a list")
        return tuple(self.items(value))

    def as_dict(self, value: Any) -> dict[Any, Any]:
        if not isinstance(value, list) or not all(
            isinstance(pair, list) and len(pair) == 2 for pair in value
        ):
            raise self.corrupt("__dict__ is not a list of [key, value] pairs")
        out = {}
        self.where.append("<key>")
        for k, v in value:
            self.where[-1] = "<key>"
            key = self.decode(k)
            try:
                hash(key)
            except TypeError:
                raise self.corrupt(f"__dict__ has a key {_show(k)} of no hashable kind") from None
            self.where[-1] = key
            out[key] = self.decode(v)
        self.where.pop()
        return out

    def as_float(self, value: Any) -> float:
        # repr() of 'nan', 'inf', '-inf' or a finite float gives the string back; anything
        # else (' nan', 'infinity', '1e999', '1_0', 'load') is not what the writer stores
        try:
            number = float(value) if isinstance(value, str) and len(value) <= 32 else None
        except ValueError:
            number = None
        if number is None or repr(number) != value:
            raise self.corrupt(f"__float__ {_show(value)} is not a float's repr")
        return number

    def as_dtype(self, value: Any) -> torch.dtype:
        dtype = _TORCH_DTYPES.get(value) if isinstance(value, str) else None
        if dtype is None:
            raise self.corrupt(f"__dtype__ {_show(value)} is not a torch dtype")
        return dtype

    def as_device(self, value: Any) -> torch.device:
        device = _device(value)
        if device is None:
            raise self.corrupt(f"__device__ {_show(value)} is not a torch device")
        return device


_TAGS: dict[str, Callable[[_TreeDecoder, Any], Any]] = {
    "__tensor__": _TreeDecoder.as_tensor,
    "__tuple__": _TreeDecoder.as_tuple,
    "__dict__": _TreeDecoder.as_dict,
    "__float__": _TreeDecoder.as_float,
    "__dtype__": _TreeDecoder.as_dtype,
    "__device__": _TreeDecoder.as_device,
}

# Every torch.dtype by the name the writer gives it (str(dtype) less "torch."), and nothing
# else: looking a name up with getattr(torch, name) gave whatever torch holds ("load").
_TORCH_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)
}

# The device types a checkpoint's tensors live on; torch.device also takes legacy and
# rendering backends (mkldnn, opengl, vulkan, ...) that hold no checkpoint.
_DEVICE_TYPES = frozenset(
    {"cpu", "cuda", "mps", "xpu", "meta", "hpu", "xla", "mtia", "maia", "hip", "ipu"}
    | {"privateuseone"}
)


def _device(value: Any) -> torch.device | None:
    """``torch.device(value)`` when ``value`` is a string naming a known device type, else None."""
    if not isinstance(value, str) or len(value) > 32:
        return None
    if value.partition(":")[0] not in _DEVICE_TYPES:
        return None
    try:
        return torch.device(value)
    except (RuntimeError, ValueError):  # "cuda:-1", "cuda:x", "cpu:0:1"
        return None


def _saved_devices(devices: Any, tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """The ``optckpt.devices`` map, checked: tensor name -> device (see :func:`read_safetensors`)."""
    if not isinstance(devices, dict):
        raise _CorruptTree(f"{DEVICES_KEY} is {_kind(devices)}, not a mapping")
    out = {}
    for name, value in devices.items():
        if name not in tensors:
            raise _CorruptTree(f"{DEVICES_KEY} names {_show(name)}, no tensor of the file")
        device = _device(value)
        # the writer records where a tensor's data was; a meta tensor has none, and a .pt
        # written with "meta" as a location would load with its values gone
        if device is None or device.type == "meta":
            raise _CorruptTree(f"{DEVICES_KEY} gives {_show(name)} the device {_show(value)}")
        out[name] = str(device)
    return out


def _tree_json(text: str) -> Any:
    # NaN and Infinity literals are not JSON; the writer tags non-finite floats instead
    return json.loads(text, parse_constant=_no_constant)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def read_safetensors(path: Path, placement: dict[KeyPath, str] | None = None) -> Any:
    """Read a safetensors file: the checkpoint tree when optckpt wrote it, else ``{name: tensor}``.

    Tensors are on the CPU. The device each was saved from, where optckpt recorded one other
    than the CPU (metadata ``optckpt.devices``), goes into ``placement`` by key path in the
    tree, as :func:`optckpt.io.load_checkpoint` records it for torch files; only once the
    whole file has been read.

    Raises:
        UnreadableCheckpointError: a corrupt header (:func:`read_header`), or optckpt metadata
            that optckpt never writes (see :class:`_TreeDecoder`), naming what is wrong and where.
    """
    tensors, metadata = load_tensors(path)
    tree = metadata.get(TREE_KEY)
    if tree is None:
        return tensors
    try:
        devices = _saved_devices(_tree_json(metadata.get(DEVICES_KEY, "{}")), tensors)
        decoder = _TreeDecoder(tensors)
        root = decoder.decode(_tree_json(tree))
    except _CorruptTree as e:
        raise UnreadableCheckpointError(f"{path}: corrupt optckpt metadata ({e})") from e
    except RecursionError as e:
        raise UnreadableCheckpointError(
            f"{path}: corrupt optckpt metadata (nested too deeply)"
        ) from e
    except ValueError as e:  # JSONDecodeError, NaN, an integer of > 4300 digits
        raise UnreadableCheckpointError(
            f"{path}: corrupt optckpt metadata ({_first_clause(e)})"
        ) from e
    if placement is not None and devices:
        # where each tensor sits in the tree (a tensor used as a dict key sits nowhere)
        at = {key for key, _ in tensor_paths(root)}
        placement.update(
            {key: devices[name] for key, name in decoder.placed if name in devices and key in at}
        )
    return root


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
    placement: Mapping[KeyPath, str] | None = None,
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
    tensors: Mapping[str, torch.Tensor | Deferred],
    locations: Mapping[torch.UntypedStorage, str],
) -> dict[str, str]:
    """The tensors saved from a device other than the CPU, by name (casts made here: the CPU)."""
    devices = {}
    for name, value in tensors.items():
        if isinstance(value, Deferred):
            continue
        device = recorded_location(value.untyped_storage(), locations)
        if device != "cpu":
            devices[name] = device
    return devices


def _stored(value: torch.Tensor | Deferred) -> torch.Tensor:
    """The tensor as safetensors stores it: contiguous, on the CPU."""
    if isinstance(value, Deferred):
        return value.materialize().contiguous()
    return value.detach().to("cpu").contiguous()
