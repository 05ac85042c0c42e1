"""Reading and validating a safetensors header, cross-checked with ``safetensors.safe_open``.

Also the dtype names safetensors uses and the short renderings of file values that every
message of this package uses (:func:`_show`, :func:`_kind`).
"""

from __future__ import annotations

import json
import math
import reprlib
import struct
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from optckpt.described import DTYPES
from optckpt.errors import UnreadableCheckpointError

# safetensors' dtype names, by torch's name of each (``torch.<name>``).
_DTYPE_NAMES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
}
_SAFETENSORS_NAMES = {name: st for st, name in _DTYPE_NAMES.items()}


def dtype_name_of(safetensors_dtype: str) -> str:
    """torch's name (``"float32"``) of a safetensors dtype (``"F32"``) the header allows."""
    return _DTYPE_NAMES[safetensors_dtype]


def safetensors_dtype(dtype: Any) -> str | None:
    """The safetensors name (``"F32"``) of a torch dtype, or ``None`` where it has none."""
    return _SAFETENSORS_NAMES.get(str(dtype).removeprefix("torch."))


_MAX_HEADER = 100_000_000  # safetensors' own limit (MAX_HEADER_SIZE)
_MAX_NUMEL = 2**63 - 1  # torch's sizes and strides are int64
# More dimensions than any optimizer state has: torch keeps a size and a stride per dimension,
# so a 100 MB header of [1, 1, ...] shapes would otherwise cost gigabytes of them.
_MAX_DIMS = 64


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
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UnreadableCheckpointError(f"{path}: corrupt safetensors header (not UTF-8)") from e
    with corrupt_json(path, "safetensors header"):
        header = json.loads(text, object_pairs_hook=_unique_keys)
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
    if not isinstance(dtype, str) or dtype not in _DTYPE_NAMES:
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
    expected = math.prod(shape) * DTYPES[_DTYPE_NAMES[dtype]].itemsize
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
        with safe_open(str(path), framework="numpy") as f:  # "pt" imports torch
            names, theirs = set(f.keys()), f.metadata() or {}
    except SafetensorError as e:
        if "unknown variant" in str(e):
            return
        raise UnreadableCheckpointError(f"{path}: safetensors refuses the file ({e})") from e
    if names != set(entries) or theirs != dict(metadata):
        raise UnreadableCheckpointError(
            f"{path}: corrupt safetensors header (safetensors reads other tensors or metadata)"
        )


@contextmanager
def corrupt_json(path: Path, what: str) -> Iterator[None]:
    """Turn what a JSON parser refuses in the block into one ``{path}: corrupt {what} (...)``
    error: too deeply nested, or the first clause of its ValueError (JSONDecodeError, a
    repeated key, NaN, an integer of > 4300 digits).

    Raises:
        UnreadableCheckpointError: for a RecursionError or ValueError raised in the block.
    """
    try:
        yield
    except RecursionError as e:
        raise UnreadableCheckpointError(f"{path}: corrupt {what} (nested too deeply)") from e
    except ValueError as e:
        raise UnreadableCheckpointError(f"{path}: corrupt {what} ({_first_clause(e)})") from e


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
