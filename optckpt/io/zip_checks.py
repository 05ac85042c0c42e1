"""The checks a torch zip file passes before torch reads it, and its ``data.pkl``.

torch's zip reader checks no CRC, takes the first archive in a file and finds records by name
without regard to case. :func:`zip_pickle` refuses, before any pickle is scanned, what it
could be fooled by or that would cost more than the file is worth: data before the archive,
repeated or confusable record names, a TorchScript archive, no ``data.pkl`` or one over
:data:`~optckpt.io.pickles.MAX_PICKLE_BYTES`, a compressed storage, a zip bomb
(:data:`MAX_COMPRESSION_RATIO`), metadata records over :data:`MAX_METADATA_BYTES`, and a CRC
failure in any record but the storages. Picking the reader and loading are
:mod:`optckpt.io.read`, which re-exports the two bounds.
"""

from __future__ import annotations

import mmap
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from optckpt.errors import UnreadableCheckpointError
from optckpt.io.pickles import MAX_PICKLE_BYTES

# Records of a torch zip other than data.pkl and the storages (version, byteorder,
# .format_version, ...) hold a few bytes each; together they may hold at most this much.
MAX_METADATA_BYTES = 16 * 2**20
# torch.save stores every record uncompressed. A compressed record larger than a MiB that
# inflates more than this many times its compressed size is a zip bomb.
MAX_COMPRESSION_RATIO = 100


def first_line(error: BaseException) -> str:
    """The first sentence of an exception's message (torch's run to paragraphs)."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    return text.splitlines()[0].split(". ")[0].rstrip(".")


@dataclass(frozen=True)
class ZipRecords:
    """A checked torch zip: its records by lower-cased name, its folder prefix (lower-cased,
    with the slash), and the CRC-checked ``data.pkl`` and ``byteorder`` (``None``: absent)."""

    by_name: dict[str, zipfile.ZipInfo]
    folder: str
    pickle: bytes
    byteorder: bytes | None


def zip_pickle(path: Path) -> bytes:
    """``data.pkl`` of a torch zip file, once the records torch reads are checked
    (see :func:`zip_records`)."""
    return zip_records(path).pickle


def zip_records(path: Path) -> ZipRecords:
    """The records of a torch zip file and its ``data.pkl``, once the records torch reads are
    checked.

    torch's zip reader checks no CRC, so a changed byte in ``data.pkl`` would load as altered
    names or values; Python's zipfile checks the CRC of a record read to its end. Only the
    small records are read here (``data.pkl``, ``version``, ``byteorder``, ...): the
    storages, which hold the tensor data, are memory-mapped in place by torch and their CRCs
    are not checked, since that would mean reading the whole file.

    Raises:
        UnreadableCheckpointError: not the zip layout torch writes, a CRC failure, a
            compressed storage, a zip bomb, or a ``data.pkl`` over
            :data:`~optckpt.io.pickles.MAX_PICKLE_BYTES`.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            # zipfile reads the last archive in a file and torch's reader the first: bytes
            # before the archive zipfile found (two saves joined, or appended with "ab") would
            # let torch load records that nothing here checked.
            if infos and min(info.header_offset for info in infos) != 0:
                raise UnreadableCheckpointError(
                    f"{path}: holds data before its zip archive (two torch.save outputs joined, "
                    "or a save appended to a file?); torch would read other records than "
                    "the ones checked"
                )
            if not infos or "/" not in infos[0].filename:
                raise UnreadableCheckpointError(
                    f"{path}: not a torch zip file (its records are not in one folder)"
                )
            # torch's reader takes the folder of the first record, and finds a record by
            # its name without regard to case: two names it could confuse are refused.
            folder = infos[0].filename.split("/", 1)[0].lower() + "/"
            by_name = {info.filename.lower(): info for info in infos}
            if len(by_name) != len(infos):
                raise UnreadableCheckpointError(
                    f"{path}: corrupt torch zip file (a record name repeats)"
                )
            if folder + "constants.pkl" in by_name:
                raise UnreadableCheckpointError(
                    f"{path}: a TorchScript archive (torch.jit.save), not a checkpoint"
                )
            pickle_info = by_name.get(folder + "data.pkl")
            if pickle_info is None:
                raise UnreadableCheckpointError(f"{path}: not a torch.save file (no data.pkl)")
            if pickle_info.file_size > MAX_PICKLE_BYTES:
                raise UnreadableCheckpointError(
                    f"{path}: its data.pkl holds {pickle_info.file_size:,} bytes of pickle, "
                    f"over the {MAX_PICKLE_BYTES // 2**20} MiB that optckpt reads"
                )
            # Reading a record to its end raises BadZipFile on a CRC mismatch.
            byteorder = None
            for info in _check_records(path, infos, folder):
                if info is not pickle_info:
                    content = archive.read(info)
                    if info.filename.lower() == folder + "byteorder":
                        byteorder = content
            return ZipRecords(by_name, folder, archive.read(pickle_info), byteorder)
    except zipfile.BadZipFile as e:
        if "CRC" in str(e):
            raise UnreadableCheckpointError(
                f"{path}: corrupt torch zip file ({first_line(e)}: the file was altered or damaged)"
            ) from e
        raise UnreadableCheckpointError(
            f"{path}: truncated or corrupt torch zip file ({first_line(e)})"
        ) from e
    except (zlib.error, EOFError, NotImplementedError, ValueError, struct.error) as e:
        raise UnreadableCheckpointError(f"{path}: corrupt torch zip file ({first_line(e)})") from e


def _check_records(path: Path, infos: list[zipfile.ZipInfo], folder: str) -> list[zipfile.ZipInfo]:
    """Refuse compressed storages and zip bombs; the records that are not storages."""
    metadata = []
    metadata_bytes = 0
    for info in infos:
        name = info.filename.lower()
        compressed = info.compress_type != zipfile.ZIP_STORED
        if (
            compressed
            and info.file_size > 2**20
            and info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1)
        ):
            raise UnreadableCheckpointError(
                f"{path}: record {info.filename} inflates from {info.compress_size:,} to "
                f"{info.file_size:,} bytes, over {MAX_COMPRESSION_RATIO} times (a zip bomb)"
            )
        if name.startswith(folder + "data/"):
            if compressed:
                # torch maps storages in place: a compressed one would be read as garbage.
                raise UnreadableCheckpointError(
                    f"{path}: storage {info.filename} is compressed; torch.save stores tensor "
                    "data uncompressed (was the file re-zipped?)"
                )
            continue
        metadata.append(info)
        if name != folder + "data.pkl":
            metadata_bytes += info.file_size
    if metadata_bytes > MAX_METADATA_BYTES:
        raise UnreadableCheckpointError(
            f"{path}: its records besides data.pkl and the storages hold {metadata_bytes:,} "
            f"bytes; torch.save writes a few bytes there"
        )
    return metadata


_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # a zip local file header, 30 bytes
_LOCAL_MAGIC = 0x04034B50


def record_start(mapped: mmap.mmap, base: int, info: zipfile.ZipInfo, where: str) -> int:
    """Where a stored record's data begins in the map (after its local header), for a zip
    that starts at ``base``.

    Raises:
        UnreadableCheckpointError: no local header there (``where`` names the zip).
    """
    at = base + info.header_offset
    try:
        fields = _LOCAL_HEADER.unpack_from(mapped, at)
    except struct.error as e:
        raise UnreadableCheckpointError(f"{where}: corrupt torch.save zip ({e})") from e
    if fields[0] != _LOCAL_MAGIC:
        raise UnreadableCheckpointError(f"{where}: corrupt torch.save zip (bad local header)")
    return int(at + _LOCAL_HEADER.size + fields[9] + fields[10])
