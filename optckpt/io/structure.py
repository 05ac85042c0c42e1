"""Reading a checkpoint's structure without torch: its tree, with tensors described, not made.

``inspect`` without ``--stats`` needs the tree of a checkpoint and the dtype, shape and saved
device of each tensor; ``import torch`` alone takes longer than reading all of that. The readers
here build the same tree ``torch.load(weights_only=True, mmap=True, map_location="cpu")`` (or
optckpt's safetensors reader) builds, with a :class:`~optckpt.described.DescribedTensor` for each
tensor, and never import torch:

* a torch zip: the same checks as before ``torch.load`` (:func:`~optckpt.io.zip_checks.zip_records`:
  the zip's layout, sizes, CRCs; :func:`~optckpt.io.pickles.scan_pickles`: the pickle's size,
  nesting and globals), then ``data.pkl`` through optckpt's restricted unpickler
  (:func:`~optckpt.io.unpickle.describe_torch_pickle`), whose table is the part of torch's
  ``weights_only`` allow-list that plain checkpoints name;
* a safetensors file: the checked header (:func:`~optckpt.io.safetensors_format.read_header`)
  and optckpt's tree, decoded by the same decoder as for loading.

Each reader answers ``None`` for a file it does not model exactly (a global beyond its table,
an opcode torch refuses, a storage whose record is missing or of another size, a big-endian
file, a 0-dim tensor of a dtype it cannot decode, a tree that stores dtypes or devices): the
caller then reads the file with torch, which gives the result, or the error, it always gave.
What the reader refuses itself (zip checks, pickle bounds) it refuses with the same message.
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Any

from optckpt.described import (
    DescribedStorage,
    DescribedTensor,
    contiguous_strides,
    dtype_named,
    file_identity,
)
from optckpt.errors import UnreadableCheckpointError
from optckpt.io.pickles import Refused, check_tree, scan_pickles
from optckpt.io.unpickle import (
    TORCH_ZIP_NAMES,
    BadPickle,
    RefusedGlobals,
    StorageClass,
    describe_torch_pickle,
)
from optckpt.io.zip_checks import record_start, zip_records
from optckpt.locate import KeyPath, tensor_paths


def _map(path: Path) -> tuple[mmap.mmap | None, tuple[int, ...]]:
    """The file mapped (``None`` where it cannot be), and its identity then."""
    with path.open("rb") as f:
        identity = file_identity(f.fileno())
        try:
            # copy-on-write, as torch.load(mmap=True) maps: never written, but torch may view it
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), identity
        except (OSError, ValueError):  # a file system without mmap; an emptied file
            return None, identity


def describe_torch_zip(path: Path, placement: dict[KeyPath, str]) -> Any | None:
    """The tree of a torch zip file with its tensors described, or ``None``: read it with torch.

    The devices tensors were saved from go into ``placement`` (by key path, where not the
    CPU), as :func:`optckpt.io.load_checkpoint` records them.

    Raises:
        UnreadableCheckpointError: what the checks before ``torch.load`` refuse (the zip's
            layout, a CRC, a size bound, the pickle's size or nesting), with their messages.
    """
    records = zip_records(path)
    try:
        scan = scan_pickles(records.pickle)
    except Refused as e:
        raise UnreadableCheckpointError(f"{path}: {e}") from e
    if scan.unsupported or any(g not in TORCH_ZIP_NAMES for g in scan.globals):
        return None  # torch refuses it, or allows what this reader does not model
    if records.byteorder not in (None, b"little"):
        return None
    mapped, identity = _map(path)
    if mapped is None:
        return None
    storages: dict[str, DescribedStorage] = {}

    def storage(kind: StorageClass, key: str, location: str, nbytes: int) -> DescribedStorage:
        found = storages.get(key)
        if found is not None:
            return found  # torch keeps the storage first made for a key
        info = records.by_name.get(f"{records.folder}data/{key}".lower())
        if info is None or info.file_size != nbytes:
            raise BadPickle(f"storage {key}: no record of {nbytes} bytes")
        start = record_start(mapped, 0, info, str(path))
        if start + nbytes > len(mapped):
            raise BadPickle(f"storage {key}: runs past the end of the file")
        storages[key] = DescribedStorage(
            key, nbytes, location, start, mapped, path, identity=identity
        )
        return storages[key]

    try:
        root = describe_torch_pickle(records.pickle, storage)
    except (BadPickle, RefusedGlobals):
        return None
    try:  # before walking it: a reference cycle would never end a walk
        check_tree(root)
    except Refused as e:
        raise UnreadableCheckpointError(f"{path}: {e}") from e
    for key, tensor in tensor_paths(root):
        assert isinstance(tensor, DescribedTensor)
        if tensor.numel() == 1 and not tensor.dtype.format:
            return None  # a value (a step) of a dtype item() is not decoded for here
        if tensor.storage.location != "cpu":
            placement[key] = tensor.storage.location
    return root


def describe_safetensors(path: Path) -> Any | None:
    """The tree of a safetensors file with its tensors described (see
    :func:`optckpt.io.safetensors_format.read_safetensors`), or ``None``: read it with torch
    (a tree that stores dtypes, devices or saved devices).

    Raises:
        UnreadableCheckpointError: a header or tree that :func:`read_safetensors` refuses.
    """
    from optckpt.io.safetensors_format import read_header
    from optckpt.io.safetensors_format.header import dtype_name_of
    from optckpt.io.safetensors_format.tree import DEVICES_KEY, TREE_KEY, decode_tree

    header, metadata, start = read_header(path)
    tree = metadata.get(TREE_KEY)
    if DEVICES_KEY in metadata or (
        tree is not None and ('"__dtype__"' in tree or '"__device__"' in tree)
    ):
        return None
    tensors: dict[str, DescribedTensor] = {}
    mapped, identity = _map(path) if header else (None, None)
    if header:
        expected = start + max(entry["data_offsets"][1] for entry in header.values())
        if mapped is None or len(mapped) != expected:
            raise UnreadableCheckpointError(
                f"{path}: truncated safetensors file (it changed size while being read)"
            )
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        dtype = dtype_named(dtype_name_of(entry["dtype"]))
        if dtype is None:
            return None
        shape = tuple(entry["shape"])
        storage = DescribedStorage(
            name, end - begin, "cpu", start + begin, mapped, path, identity=identity
        )
        tensors[name] = DescribedTensor(dtype, shape, contiguous_strides(shape), 0, storage)
    if tree is None:
        return tensors
    root = decode_tree(path, tree, metadata, tensors, None)
    if any(t.numel() == 1 and not t.dtype.format for t in tensors.values()):
        return None  # a value (a step) of a dtype item() is not decoded for here
    return root
