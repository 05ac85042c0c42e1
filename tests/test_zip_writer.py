"""optckpt's torch-free zip writer against torch's own (``torch._C.PyTorchFileWriter``).

The layout (headers, padding, data descriptors, ZIP64 fields, central directory, end records)
is compared byte for byte with what torch's writer writes for the same records; whole files
written from described tensors are compared with ``torch.save``'s in ``tests/test_convert.py``.
"""

from __future__ import annotations

import io
import struct
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from checks import torch_zip_bytes

from optckpt.described import DTYPES, DescribedStorage, DescribedTensor
from optckpt.errors import UnwritableOutputError
from optckpt.io.structure import describe_torch_zip
from optckpt.io.write import atomic_output
from optckpt.io.zip_writer import (
    ZipWriter,
    central_entry,
    descriptor,
    end_records,
    local_header,
    writable,
    write_described,
)


class _Capture:
    """A file object for torch's writer: writes kept, those of ``count`` bytes or more only
    counted."""

    def __init__(self, count: int) -> None:
        self.parts: list[bytes | int] = []
        self._count = count

    def write(self, data: Any) -> int:
        view = memoryview(data)
        n = view.nbytes
        self.parts.append(bytes(view) if n < self._count else n)
        return n

    def flush(self) -> None:
        pass


def _joined(parts: list[bytes | int]) -> list[bytes | int]:
    """Consecutive byte strings joined; counts of large writes kept between them."""
    out: list[bytes | int] = []
    for part in parts:
        if isinstance(part, bytes) and out and isinstance(out[-1], bytes):
            out[-1] += part
        else:
            out.append(part)
    return out


def _torch_writes(records: list[tuple[str, Any]], *, crc: bool = True) -> _Capture:
    sink = _Capture(2**32 if crc else 2**20)
    writer = torch._C.PyTorchFileWriter(sink, crc)
    for name, data in records:
        size = data.nbytes() if isinstance(data, torch.UntypedStorage) else len(data)
        writer.write_record(name, data, size)
    writer.write_end_of_file()
    return sink


def _assert_written_as_torch_writes(records: list[tuple[str, bytes]], tmp_path: Path) -> None:
    """Records written by torch's writer and by :class:`ZipWriter`: the same file, the
    serialization id aside."""
    theirs, ours = tmp_path / "theirs.pt", tmp_path / "ours.pt"
    theirs.write_bytes(b"".join(p for p in _torch_writes(records).parts if isinstance(p, bytes)))
    buffer = io.BytesIO()
    writer = ZipWriter(buffer)
    for name, data in records:
        writer.add(name, data)
    writer.finish()
    ours.write_bytes(buffer.getvalue())
    assert torch_zip_bytes(ours) == torch_zip_bytes(theirs)


@pytest.mark.parametrize("sizes", [[0], [1, 63, 64, 65], [5, 1000, 100_000, 3, 0, 77]])
def test_records_are_laid_out_as_torch_writes_them(sizes: list[int], tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(len(sizes))
    # torch's writer adds "byteorder" at the end unless written first, as torch.save does
    records = [("data.pkl", b"\x80\x02}q\x00."), ("byteorder", b"little")]
    for i, n in enumerate(sizes):
        data = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=generator)
        records.append((f"data/{i}", data.numpy().tobytes()))
    _assert_written_as_torch_writes(records, tmp_path)


def test_more_records_than_the_end_record_counts(tmp_path: Path) -> None:
    """Past 65,535 records the classic end record says 0xFFFF, as miniz writes it."""
    records = [("byteorder", b"little"), *((f"data/{i}", b"x") for i in range(65_540))]
    _assert_written_as_torch_writes(records, tmp_path)


def test_zip64_fields_past_4_gib() -> None:
    """A record of 4 GiB and more, and records that start past 4 GiB, take ZIP64 fields in
    their local header, data descriptor and central entry, as torch's writer gives them
    (checked without checksums: torch's writer then never reads the 4 GiB, which stay
    unallocated)."""
    big = torch.empty(2**32 + 3, dtype=torch.uint8).untyped_storage()  # never touched
    records: list[tuple[str, Any]] = [
        ("data.pkl", b"pickle"),
        ("byteorder", b"little"),
        ("data/0", big),  # large, below 4 GiB
        ("data/1", b"y" * 100),  # small, past 4 GiB
        ("data/2", big),  # large and past 4 GiB
        ("data/3", b""),  # empty (no data descriptor), past 4 GiB
    ]
    sink = _torch_writes(records, crc=False)
    theirs = _joined(sink.parts)
    tail = theirs[-1]
    assert isinstance(tail, bytes)
    name = b"archive/.data/serialization_id"
    at = tail.index(name)  # its local header (the central directory comes after)
    (extra,) = struct.unpack_from("<H", tail, at - 2)
    torch_id = tail[at + len(name) + extra :][:40]
    assert torch_id.isdigit()
    records += [("version", b"3\n"), (".data/serialization_id", torch_id)]

    expected: list[bytes | int] = []
    entries = b""
    at = 0
    for record, data in records:
        name = f"archive/{record}".encode()
        size = data.nbytes() if isinstance(data, torch.UntypedStorage) else len(data)
        head, tail = local_header(name, at, size), descriptor(0, at, size)
        assert (at + len(head)) % 64 == 0  # the data starts 64-byte aligned
        expected += [head, size if isinstance(data, torch.UntypedStorage) else data, tail]
        entries += central_entry(name, 0, at, size)
        at += len(head) + size + len(tail)
    expected.append(entries + end_records(len(records), at, len(entries)))
    assert _joined(expected) == theirs


def _described(tensors: dict[str, Any], tmp_path: Path) -> tuple[Any, Path]:
    src = tmp_path / "src.pt"
    torch.save(tensors, src)
    tree = describe_torch_zip(src, {})
    assert tree is not None
    return tree, src


def test_ctrl_c_leaves_nothing_and_no_thread(tmp_path: Path) -> None:
    tensors = {f"t{i}": torch.full((70_000 * (i % 2 * 4 + 1),), float(i)) for i in range(8)}
    tree, _ = _described(tensors, tmp_path)
    out = tmp_path / "out.pt"
    calls = []

    def progress(n: int) -> None:
        calls.append(n)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), atomic_output(out) as tmp:
        write_described(tree, tmp, progress=progress)
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "src.pt"]
    assert not [t for t in threading.enumerate() if t.name.startswith("optckpt-crc32")]


def test_a_write_error_names_the_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree, _ = _described({"a": torch.ones(300_000)}, tmp_path)  # copied in the kernel
    out = tmp_path / "out.pt"

    def full(*args: Any) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("optckpt.io.runs.copy_range", full)
    with (
        pytest.raises(UnwritableOutputError, match=r"out\.pt: No space left"),
        atomic_output(out) as tmp,
    ):
        write_described(tree, tmp)
    assert not out.exists()


def test_two_dtypes_over_one_storage_are_refused_as_torch_refuses_them(tmp_path: Path) -> None:
    tree, _ = _described({"a": torch.arange(4, dtype=torch.float32)}, tmp_path)
    a = tree["a"]
    other = DescribedTensor(DTYPES["int32"], (4,), (1,), 0, a.storage)
    with pytest.raises(RuntimeError) as ours:
        write_described({"a": a, "b": other}, tmp_path / "x.pt")
    base = torch.arange(4, dtype=torch.float32)
    with pytest.raises(RuntimeError) as theirs:
        torch.save({"a": base, "b": base.view(torch.int32)}, io.BytesIO())
    assert str(ours.value) == str(theirs.value)


def test_writable_takes_plain_trees_of_described_tensors_only(tmp_path: Path) -> None:
    tree, _ = _described({"a": torch.ones(2)}, tmp_path)
    storage = DescribedStorage("0", 2, "cpu", 0)
    nibbles = DescribedTensor(DTYPES["int4"], (4,), (1,), 0, storage)
    assert writable({"a": [tree["a"], (1, 2.0, "x", None, b"y")], "o": OrderedDict(b=True)})
    assert not writable({"a": nibbles})  # torch.save writes no int4 tensor
    assert not writable({"a": {1, 2}})  # a set: a global the described path does not write
    assert not writable({"a": torch.ones(1)})  # a torch tensor: the torch writer's


@pytest.mark.parametrize("n", [1000, 1001])
def test_a_thousand_items_are_batched_as_torch_save_batches_them(n: int, tmp_path: Path) -> None:
    """``torch.save``'s pickler (C) ends an exact dict of 1000 items with an empty batch and
    writes one item left after full batches as a batch of its own, where Python's pickler
    does neither: an optimizer of 1000 parameters (``state``) or 1001 (``state`` and the
    group's ``params``)."""
    params = [torch.nn.Parameter(torch.ones(1)) for _ in range(n)]
    adam = torch.optim.Adam(params)
    torch.stack(params).sum().backward()
    adam.step()
    tree, src = _described({"optimizer": adam.state_dict()}, tmp_path)
    reference = tmp_path / "reference.pt"
    with reference.open("wb") as f:
        torch.save(torch.load(src, weights_only=True), f)
    ours = tmp_path / "ours.pt"
    write_described(tree, ours)
    assert torch_zip_bytes(ours) == torch_zip_bytes(reference)
