"""Reading a safetensors file: its tensors mapped copy-on-write, and optckpt's tree rebuilt."""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Any

import torch

from optckpt.errors import UnreadableCheckpointError
from optckpt.io.safetensors_format.header import dtype_name_of, read_header
from optckpt.io.safetensors_format.tree import TREE_KEY, decode_tree
from optckpt.locate import KeyPath


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
        dtype = getattr(torch, dtype_name_of(entry["dtype"]))
        if end == begin:
            tensors[name] = torch.empty(entry["shape"], dtype=dtype)
            continue
        flat = torch.frombuffer(
            mapped, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=start + begin
        )
        tensors[name] = flat.view(entry["shape"])
    return tensors, metadata


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
    return decode_tree(path, tree, metadata, tensors, placement)
