"""The one way in for checkpoint files: pick the reader by what the file is, load safely.

* torch zip files (``torch.save`` since 1.6): ``torch.load(weights_only=True, mmap=True)``, so
  tensors are views of the file and memory does not grow with its size;
* legacy torch files (``_use_new_zipfile_serialization=False``): ``weights_only=True`` without
  mmap, which the legacy format does not allow;
* safetensors files (optckpt's layout, see :mod:`optckpt.io.safetensors_format`, or plain);
* checkpoint folders such as a Hugging Face Trainer ``checkpoint-N/``: the optimizer files in
  it (``optimizer.pt``, ``optimizer.bin``, ...) are read as above.

Nothing ever falls back to ``weights_only=False``. A pickle that needs globals outside torch's
allow-list is refused with the list of them; ``allow_globals`` lets named ones through torch's
``safe_globals`` mechanism.
"""

from __future__ import annotations

import importlib
import pickle
import re
import struct
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from optckpt.errors import UnreadableCheckpointError, UnsafeCheckpointError, UsageError
from optckpt.io.safetensors_format import looks_like_safetensors, read_safetensors

# Files a training folder keeps its optimizer state in: Hugging Face Trainer writes
# optimizer.pt, Accelerate optimizer.bin (optimizer_1.bin, ... for more than one).
_OPTIMIZER_FILE = re.compile(r"^optimizer(_\d+)?\.(pt|pth|bin)$")

_ZIP_MAGIC = b"PK\x03\x04"
# A legacy torch file starts with a pickled magic number: protocol 2 and a LONG1 opcode.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


@dataclass
class Checkpoint:
    """A checkpoint read from disk.

    Attributes:
        path: the file or folder given.
        format: ``"torch"``, ``"torch-legacy"`` or ``"safetensors"`` (of the file that holds
            the optimizer state, for a folder).
        size: bytes on disk (all files, for a folder).
        root: the loaded object. For a folder, a dict from member file name to its content,
            holding only the optimizer files (the others are listed in ``members``).
        members: for a folder, the names of all its files; empty for a file.
        saved_devices: the device each storage was saved from, by storage address, for
            torch files read to the CPU and for safetensors files where optckpt recorded
            devices (see :meth:`saved_device`). Writing the tree back with these keeps them.
        sources: the files read (memory-mapped where the format allows).
    """

    path: Path
    format: str
    size: int
    root: Any
    members: list[str] = field(default_factory=list)
    saved_devices: dict[int, str] = field(default_factory=dict)
    sources: list[Path] = field(default_factory=list)

    def saved_device(self, tensor: torch.Tensor) -> str:
        """The device ``tensor`` was saved from (``cuda:0`` for a CUDA checkpoint read to CPU)."""
        return self.saved_devices.get(tensor.untyped_storage().data_ptr(), str(tensor.device))


def resolve_globals(names: Iterable[str]) -> list[Any]:
    """Import each ``module.Name`` so it can be allow-listed for ``weights_only`` loading.

    Raises:
        UsageError: a name that is not ``module.attribute`` or cannot be imported.
    """
    found = []
    for name in names:
        module_name, _, attr = name.rpartition(".")
        if not module_name:
            raise UsageError(f"--allow-global wants MODULE.NAME, got {name!r}")
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as e:
            raise UsageError(f"--allow-global {name}: cannot import it ({e})") from e
        # Allow-list under the name the pickle uses, which may differ from __qualname__.
        found.append((obj, name))
    return found


def _importable(name: str) -> bool:
    try:
        resolve_globals([name])
    except UsageError:
        return False
    return True


# What torch's weights-only unpickler and its rebuild functions raise on mangled bytes, besides
# the UnpicklingError and RuntimeError handled on their own: a pickle cut mid-opcode fails in
# struct.unpack or indexes past the end; a changed byte can reach a rebuild function with
# arguments of the wrong type, or name a storage that the file does not hold (AssertionError).
_CORRUPT = (
    EOFError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    AssertionError,
    struct.error,
    zipfile.BadZipFile,
    OSError,
)


def _unsafe_globals(path: Path, legacy: bool, error: Exception) -> list[str]:
    """The globals a pickle needs that torch does not allow, or ``[]`` if it is corrupt."""
    if not legacy:
        try:
            return torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except (pickle.UnpicklingError, RuntimeError, *_CORRUPT):
            return []  # torch cannot even list the pickle's globals: it is corrupt
    # torch can only disassemble zip pickles; for legacy ones, read the unpickler's message.
    # A truncated legacy pickle also ends in "Unsupported global", naming a cut-off global.
    names = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(error))))
    return names if all(_importable(n) for n in names) else []


def _torch_load(
    path: Path, legacy: bool, map_location: str | None, allowed: Sequence[Any], seen: dict[int, str]
) -> Any:
    location: Any = map_location
    if map_location == "cpu":
        # torch hands each storage to a callable map_location already on the CPU, with the
        # device it was saved from; keep the storage there and remember that device.
        def location(storage: Any, saved: str) -> Any:
            if storage.data_ptr():  # an empty storage has no address to key on
                seen[storage.data_ptr()] = saved
            return storage

    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(str(path), map_location=location, weights_only=True, mmap=not legacy)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise UnreadableCheckpointError(f"{path}: corrupt pickle ({_first_line(e)})") from e
        names = _unsafe_globals(path, legacy, e)
        if not names:
            raise UnreadableCheckpointError(f"{path}: truncated or corrupt torch file") from e
        listed = ", ".join(names)
        flags = " ".join(f"--allow-global {n}" for n in names)
        raise UnsafeCheckpointError(
            f"{path}: refusing to unpickle globals outside torch's weights_only allow-list: "
            f"{listed}; if you trust this file, pass {flags}",
            names,
        ) from e
    except RuntimeError as e:
        message = _first_line(e)
        if "central directory" in message or "zip archive" in message:
            raise UnreadableCheckpointError(
                f"{path}: truncated or corrupt torch zip file ({message})"
            ) from e
        if "cuda" in message.lower() or "device" in message.lower():
            raise UnreadableCheckpointError(
                f"{path}: cannot map tensors to {map_location} ({message})"
            ) from e
        raise UnreadableCheckpointError(f"{path}: cannot read torch file ({message})") from e
    except _CORRUPT as e:
        raise UnreadableCheckpointError(
            f"{path}: truncated or corrupt torch file ({_first_line(e) or type(e).__name__})"
        ) from e


def _first_line(error: BaseException) -> str:
    """The first sentence of an exception's message (torch's run to paragraphs)."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    return text.splitlines()[0].split(". ")[0].rstrip(".")


def sniff(path: Path) -> str:
    """Name the format of a file from its first bytes.

    Returns:
        ``"torch"``, ``"torch-legacy"`` or ``"safetensors"``.

    Raises:
        UnreadableCheckpointError: empty, or of no known format.
    """
    size = path.stat().st_size
    if size == 0:
        raise UnreadableCheckpointError(f"{path}: empty file")
    with path.open("rb") as f:
        head = f.read(64)
    if head.startswith(_ZIP_MAGIC):
        return "torch"
    if head.startswith(_LEGACY_MAGIC):
        return "torch-legacy"
    if looks_like_safetensors(head, size):
        return "safetensors"
    raise UnreadableCheckpointError(
        f"{path}: not a checkpoint (neither a torch file nor safetensors)"
    )


def _read_file(
    path: Path, map_location: str | None, allowed: Sequence[Any], seen: dict[int, str]
) -> tuple[str, Any]:
    kind = sniff(path)
    if kind == "safetensors":
        return kind, read_safetensors(path, seen)
    return kind, _torch_load(path, kind == "torch-legacy", map_location, allowed, seen)


def _read_folder(path: Path, map_location: str | None, allowed: Sequence[Any]) -> Checkpoint:
    files = sorted(p for p in path.rglob("*") if p.is_file())
    members = [str(p.relative_to(path)) for p in files]
    if (path / ".metadata").exists():
        raise UnreadableCheckpointError(
            f"{path}: torch.distributed.checkpoint folders are not supported yet; "
            "use torch.distributed.checkpoint.format_utils.dcp_to_torch_save to make a torch file"
        )
    optimizer_files = [p for p in files if p.parent == path and _OPTIMIZER_FILE.match(p.name)]
    if not optimizer_files:
        listed = ", ".join(members[:10]) + (" ..." if len(members) > 10 else "") or "nothing"
        raise UnreadableCheckpointError(
            f"{path}: folder holds no optimizer file (optimizer.pt, optimizer.bin); it has: {listed}"
        )
    root = {}
    kinds = set()
    seen: dict[int, str] = {}
    for p in optimizer_files:
        kind, root[p.name] = _read_file(p, map_location, allowed, seen)
        kinds.add(kind)
    return Checkpoint(
        path=path,
        format=kinds.pop() if len(kinds) == 1 else "torch",
        size=sum(p.stat().st_size for p in files),
        root=root,
        members=members,
        saved_devices=seen,
        sources=optimizer_files,
    )


def load_checkpoint(
    path: str | Path,
    *,
    map_location: str | None = "cpu",
    allow_globals: Iterable[str] = (),
) -> Checkpoint:
    """Read a checkpoint file or folder safely, whatever its format.

    Args:
        path: a torch file (zip or legacy), a safetensors file, or a training folder.
        map_location: where tensors go (``"cpu"`` by default, so checkpoints saved from CUDA
            open on machines without one); ``None`` keeps the saved devices.
        allow_globals: ``module.Name`` globals to let through torch's ``weights_only``
            unpickler, for checkpoints that hold such objects and that you trust.

    Returns:
        The :class:`Checkpoint`.

    Raises:
        UnreadableCheckpointError: missing, empty, truncated, corrupt or unknown input.
        UnsafeCheckpointError: the pickle needs globals not allowed; lists them.
        UsageError: an ``allow_globals`` entry that cannot be imported.
    """
    path = Path(path)
    allowed = resolve_globals(allow_globals)
    if not path.exists():
        raise UnreadableCheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        return _read_folder(path, map_location, allowed)
    seen: dict[int, str] = {}
    kind, root = _read_file(path, map_location, allowed, seen)
    return Checkpoint(
        path=path,
        format=kind,
        size=path.stat().st_size,
        root=root,
        saved_devices=seen,
        sources=[path],
    )
