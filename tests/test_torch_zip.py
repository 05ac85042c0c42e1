"""One test per private torch API optckpt uses (all wrapped in ``optckpt.io.torch_zip``).

Each fails with the API's name and the torch version, so a torch upgrade that changes one
says which wrapper to fix rather than failing deep inside a write or a load.
"""

from __future__ import annotations

import io
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from optckpt.io import torch_format, torch_zip


@contextmanager
def _api(name: str) -> Iterator[None]:
    """Turn any failure inside into one that names the private API and the torch version."""
    try:
        yield
    except Exception as exc:  # AssertionError included: a changed result is a change too
        pytest.fail(
            f"torch {torch.__version__} changed the private API {name} "
            f"(wrapped in optckpt/io/torch_zip.py): {type(exc).__name__}: {exc}",
            pytrace=False,
        )


def _saved(obj: object) -> zipfile.ZipFile:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return zipfile.ZipFile(buffer)


def test_rebuild_tensor_v2() -> None:
    with _api("torch._utils._rebuild_tensor_v2"):
        rebuild = torch_zip.rebuild_tensor_v2()
        assert (rebuild.__module__, rebuild.__qualname__) == ("torch._utils", "_rebuild_tensor_v2")
        # Deferred's reduction copies the one torch gives a plain dense float tensor
        tensor = torch.arange(6, dtype=torch.float32).reshape(2, 3)
        func, args = tensor.__reduce_ex__(2)
        assert func is rebuild
        assert len(args) == 6 and args[1:] == (0, (2, 3), (3, 1), False, OrderedDict())
        remade = rebuild(*args)
        assert torch.equal(remade, tensor)


def test_pickle_storage_type() -> None:
    with _api("Tensor._typed_storage()._pickle_storage_type()"):
        assert torch_zip.pickle_storage_type(torch.float32) is torch.FloatStorage
        assert torch_zip.pickle_storage_type(torch.float16) is torch.HalfStorage
        assert torch_zip.pickle_storage_type(torch.bfloat16) is torch.BFloat16Storage
        assert torch_zip.pickle_storage_type(torch.float64) is torch.DoubleStorage


def test_typed_storage_parts() -> None:
    with _api("TypedStorage._untyped_storage / _pickle_storage_type() / _size()"):
        tensor = torch.arange(5, dtype=torch.bfloat16)
        typed = tensor.__reduce_ex__(2)[1][0]  # the TypedStorage torch's pickle holds
        assert isinstance(typed, torch.storage.TypedStorage)
        untyped, storage_type, numel = torch_zip.typed_storage_parts(typed)
        assert isinstance(untyped, torch.UntypedStorage)
        assert untyped.data_ptr() == tensor.untyped_storage().data_ptr()
        assert untyped.nbytes() == tensor.untyped_storage().nbytes()
        assert storage_type is torch.BFloat16Storage
        assert numel == 5


def test_open_zipfile_writer_and_write_record() -> None:
    with _api("torch.serialization._open_zipfile_writer / torch._C.PyTorchFileWriter.write_record"):
        storage = torch.arange(4, dtype=torch.float32).untyped_storage()
        buffer = io.BytesIO()
        with torch_zip.open_zipfile_writer(buffer) as writer:
            torch_zip.write_record(writer, "text", "abc", 3)
            torch_zip.write_record(writer, "blob", b"\x00\x01", 2)
            torch_zip.write_record(writer, "data/0", storage, storage.nbytes())
        archive = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
        names = archive.namelist()
        prefix = names[0].split("/")[0]
        assert archive.read(f"{prefix}/text") == b"abc"
        assert archive.read(f"{prefix}/blob") == b"\x00\x01"
        assert archive.read(f"{prefix}/data/0") == bytes(storage)
        # stored and 64-byte aligned, as torch.load(mmap=True) needs
        info = archive.getinfo(f"{prefix}/data/0")
        assert info.compress_type == zipfile.ZIP_STORED
        local = buffer.getvalue()[info.header_offset : info.header_offset + 30]
        name_length, extra_length = struct.unpack("<HH", local[26:30])
        assert (info.header_offset + 30 + name_length + extra_length) % 64 == 0


def test_storage_alignment() -> None:
    with _api("torch.serialization._get_storage_alignment"):
        alignment = torch_zip.storage_alignment()
        archive = _saved(torch.ones(2))
        records = {name.split("/", 1)[1]: name for name in archive.namelist()}
        if alignment is None:
            assert ".storage_alignment" not in records
        else:
            assert archive.read(records[".storage_alignment"]) == str(alignment).encode()


def test_weights_only_allowed_globals() -> None:
    with _api("torch._weights_only_unpickler._get_allowed_globals"):
        names = torch_zip.weights_only_allowed_globals()
        assert isinstance(names, set) and all(isinstance(name, str) for name in names)
        for name in ("torch.Size", "torch._utils._rebuild_tensor_v2", "collections.OrderedDict"):
            assert name in names


def test_names_the_dcp_reader_matches() -> None:
    # optckpt.io.dcp.unpickle maps these names (as strings, without calling them); torch must
    # still have them and still write the tensor one
    for name in (
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_tensor_v3",
        "torch.serialization._get_layout",
    ):
        with _api(name):
            module, attr = name.rsplit(".", 1)
            assert callable(getattr(__import__(module, fromlist=[attr]), attr))
    with _api("torch._utils._rebuild_tensor_v2 (as pickled by torch.save)"):
        archive = _saved(torch.ones(2))
        pkl = next(name for name in archive.namelist() if name.endswith("/data.pkl"))
        assert b"torch._utils\n_rebuild_tensor_v2\n" in archive.read(pkl)


def test_write_torch_still_matches_torch_save(tmp_path: Path) -> None:
    # all the wrappers together: optckpt's writer gives torch.save's records, Deferred included
    tree = {"a": torch.arange(6, dtype=torch.float32), "b": torch.ones(3, dtype=torch.bfloat16)}
    with _api("torch.save's zip format (optckpt/io/torch_zip.py)"):
        torch.save({"a": tree["a"].to(torch.float16), "b": tree["b"]}, tmp_path / "torch.pt")
        deferred = {"a": torch_format.Deferred(tree["a"], torch.float16), "b": tree["b"]}
        torch_format.save_torch(deferred, tmp_path / "optckpt.pt")
        assert _records(tmp_path / "optckpt.pt") == _records(tmp_path / "torch.pt")


def _records(path: Path) -> dict[str, bytes]:
    archive = zipfile.ZipFile(path)
    # serialization_id is random per save; the archive's folder name follows the file name
    return {
        name.split("/", 1)[1]: archive.read(name)
        for name in archive.namelist()
        if not name.endswith("serialization_id")
    }
