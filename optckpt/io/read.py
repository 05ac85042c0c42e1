"""The one way in for checkpoint files: pick the reader by what the file is, load safely.

* torch zip files (``torch.save`` since 1.6): ``torch.load(weights_only=True, mmap=True)``, so
  tensors are views of the file and memory does not grow with its size;
* legacy torch files (``_use_new_zipfile_serialization=False``): ``weights_only=True`` without
  mmap, which the legacy format does not allow;
* safetensors files (optckpt's layout, see :mod:`optckpt.io.safetensors_format`, or plain);
* checkpoint folders such as a Hugging Face Trainer ``checkpoint-N/``: the optimizer files in
  it (``optimizer.pt``, ``optimizer.bin``, ...) are read as above; a Trainer's ``output_dir``
  stands for its newest ``checkpoint-N/`` (:mod:`optckpt.io.folders`).

Nothing ever falls back to ``weights_only=False``, and nothing a file names is ever imported:
before torch sees a pickle, :mod:`optckpt.io.pickles` reads its opcodes for the globals it
names and how deep it nests. A pickle that names a callable able to run code (``os.system``,
``builtins.eval``, ...) is refused outright; one that needs other globals outside torch's
allow-list is refused with the list of them, and ``allow_globals`` lets named ones through
torch's ``safe_globals`` mechanism (never a dangerous one).

Work is bounded before it starts: a zip's ``data.pkl`` (or a legacy file's pickles) over
:data:`~optckpt.io.pickles.MAX_PICKLE_BYTES`, a compressed record that inflates like a zip
bomb, a record that fails its CRC, and nesting past :data:`~optckpt.io.pickles.MAX_NESTING`
are refused (the zip checks are :mod:`optckpt.io.zip_checks`); after loading,
:func:`~optckpt.io.pickles.check_tree` refuses reference cycles and tensors whose shape claims
far more bytes than their storage holds (zero strides).
"""

from __future__ import annotations

import mmap
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optckpt.errors import UnreadableCheckpointError, UnsafeCheckpointError
from optckpt.io.allowlist import resolve_globals as resolve_globals  # re-exported
from optckpt.io.folders import Resolved, files_under, resolve_folder
from optckpt.io.folders import optimizer_files as top_optimizer_files
from optckpt.io.pickles import (
    DATA_RECONSTRUCTORS,
    MAX_PICKLE_BYTES,
    PickleScan,
    Refused,
    check_tree,
    scan_pickles,
    torch_allowed_globals,
    why_dangerous,
)
from optckpt.io.safetensors_format import looks_like_safetensors
from optckpt.io.structure import describe_safetensors, describe_torch_zip

# Re-exported: the zip bounds were defined here.
from optckpt.io.zip_checks import MAX_COMPRESSION_RATIO as MAX_COMPRESSION_RATIO
from optckpt.io.zip_checks import MAX_METADATA_BYTES as MAX_METADATA_BYTES
from optckpt.io.zip_checks import first_line, zip_pickle
from optckpt.locate import KeyPath, tensor_paths

if TYPE_CHECKING:
    import torch

_ZIP_MAGIC = b"PK\x03\x04"
# A legacy torch file starts with a pickled magic number: protocol 2 and a LONG1 opcode.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
# A legacy file is five pickles in a row (magic number, protocol version, system info, the
# object, storage keys), then the storages' raw bytes (torch.serialization._legacy_save).
_LEGACY_PICKLES = 5
# Where DTensor and its placement classes live (torch >= 2.5, and the older private path).
_DTENSOR_MODULES = (
    "torch.distributed.tensor.",
    "torch.distributed._tensor.",
    "torch.distributed.device_mesh.",
)


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
        placement: the device each tensor was saved from, by its key path in ``root``
            (:func:`optckpt.locate.tensor_paths`), where that is not where it is now: a
            checkpoint saved from CUDA and read to the CPU has ``cuda:0`` here (torch files,
            and safetensors files where optckpt recorded devices). Commands that replace
            part of the tree keep it in step (:mod:`optckpt.devices`), and the writers
            record it, so the checkpoint is written back as it was saved.
        sources: the files read (memory-mapped where the format allows).
        given: the path given, where it was a training output folder and ``path`` the
            newest ``checkpoint-N`` in it (:func:`optckpt.io.folders.resolve_folder`).
    """

    path: Path
    format: str
    size: int
    root: Any
    members: list[str] = field(default_factory=list)
    placement: dict[KeyPath, str] = field(default_factory=dict)
    sources: list[Path] = field(default_factory=list)
    given: Path | None = None

    def notes(self) -> list[str]:
        """What a command says about how it read the checkpoint: which ``checkpoint-N`` of a
        training output folder it used."""
        return Resolved(self.path, self.given).notes()

    def saved_device(self, path: KeyPath, tensor: torch.Tensor) -> str | None:
        """The device the tensor at key path ``path`` was saved from (``cuda:0`` for a CUDA
        checkpoint read to the CPU); where it is, if nothing else was recorded. ``None``
        where the format records no devices (DCP)."""
        return self.placement.get(path, str(tensor.device))

    def later(self, tensor: Any, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """For a placeholder whose tensor is read only when written: one for
        ``tensor.to(dtype)`` (see :meth:`optckpt.io.dcp.reader.DcpCheckpoint.later`). ``None``
        here: a checkpoint read with its tensors holds no placeholders."""
        return None


def _looks_like_a_class(name: str) -> bool:
    """Whether a global's last part is named as classes are (``Namespace``, not ``run``):
    only those are worth suggesting for ``--allow-global``, which refuses anything else."""
    return name in DATA_RECONSTRUCTORS or name.rpartition(".")[2][:1].isupper()


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


def _legacy_pickles(path: Path) -> PickleScan:
    """Scan the pickles at the start of a legacy file, memory-mapped: the storages' raw
    bytes after them can be gigabytes that the scan never touches."""
    with path.open("rb") as f:
        try:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # a file system without mmap
            return scan_pickles(f.read(MAX_PICKLE_BYTES + 1), _LEGACY_PICKLES)
        with mapped:
            return scan_pickles(mapped, _LEGACY_PICKLES)


def _check_pickles(path: Path, legacy: bool, allowed_names: set[str]) -> list[str]:
    """Read the file's pickles without running them; the globals torch will refuse.

    Raises:
        UnreadableCheckpointError: corrupt, over a bound, or not runnable by torch.
        UnsafeCheckpointError: the pickle names a callable that can run code.
    """
    try:
        scan = _legacy_pickles(path) if legacy else scan_pickles(zip_pickle(path))
    except Refused as e:
        raise UnreadableCheckpointError(f"{path}: {e}") from e
    from optckpt.io.dcp import sharded_state_error  # optckpt.io.dcp imports this module

    refused = sharded_state_error(path, scan.globals)  # FSDP2's opt.state_dict(): DTensors
    if refused is not None:
        raise refused
    torch_allowed = torch_allowed_globals()
    unsafe = [g for g in scan.globals if g not in torch_allowed and g not in allowed_names]
    dangerous = [(g, why) for g in unsafe if (why := why_dangerous(g))]
    if dangerous:
        name, why = dangerous[0]
        others = f" (and {', '.join(g for g, _ in dangerous[1:])})" if len(dangerous) > 1 else ""
        raise UnsafeCheckpointError(
            f"{path}: refusing to load: the pickle asks for {name}{others}, a callable that "
            f"can run code ({why}); this file will not be loaded, with or without --allow-global",
            unsafe,
        )
    sharded = [g for g in scan.globals if g.startswith(_DTENSOR_MODULES)]
    if sharded:
        # Refused even where torch allows these (importing torch.distributed.tensor does):
        # each rank's file holds only its shard, and torch cannot map DTensors to the CPU.
        raise UnsafeCheckpointError(
            f"{path}: holds sharded DTensors ({sharded[0]}), a sharded state dict (FSDP2, "
            "tensor parallelism) saved with torch.save, which optckpt does not read; save it "
            "with torch.distributed.checkpoint, or gather it first with "
            "get_optimizer_state_dict(model, optimizer, options=StateDictOptions("
            "full_state_dict=True, cpu_offload=True))",
            sharded,
        )
    if scan.unsupported:
        names = f"; it names {', '.join(unsafe)}" if unsafe else ""
        raise UnreadableCheckpointError(
            f"{path}: not a torch checkpoint pickle: it uses the {scan.unsupported} opcode, "
            f"which torch's weights-only unpickler does not run{names}"
        )
    return unsafe


def _torch_load(
    path: Path,
    legacy: bool,
    map_location: str | None,
    allowed: Sequence[Any],
    placement: dict[KeyPath, str],
) -> Any:
    import torch

    location: Any = map_location
    # Storages torch read to the CPU from another device, and that device. Keyed by the
    # storage object, which torch keeps one of per storage; this map holds each, so none is
    # freed (and its memory reused) before the tree's tensors are matched to it below.
    moved: dict[torch.UntypedStorage, str] = {}
    if map_location == "cpu":
        # torch hands each storage to a callable map_location already on the CPU, with the
        # device it was saved from; keep the storage there and remember that device.
        def location(storage: Any, saved: str) -> Any:
            if saved != "cpu":
                moved[storage] = saved
            return storage

    names = _check_pickles(path, legacy, {name for _, name in allowed})
    try:
        with _utf8_name(path) as name, torch.serialization.safe_globals(list(allowed)):
            root = torch.load(name, map_location=location, weights_only=True, mmap=not legacy)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise UnreadableCheckpointError(f"{path}: corrupt pickle ({first_line(e)})") from e
        # A class reached only while building another (numpy's dtype classes, such as
        # numpy.dtypes.Float64DType, behind numpy.dtype) is no global of the pickle's own:
        # torch names it in its message.
        built = re.search(r"but got <class '([\w.]+)'>", str(e))
        if not names and built:
            names = [built.group(1)]
        if not names:
            reason = re.search(r"WeightsUnpickler error: (.*)", str(e))
            detail = f" ({reason.group(1).split('. ')[0].rstrip('.')})" if reason else ""
            raise UnreadableCheckpointError(
                f"{path}: truncated or corrupt torch file{detail}"
            ) from e
        # None of them is dangerous (_check_pickles refused those): a data class, perhaps.
        listed = ", ".join(names)
        functions = [n for n in names if not _looks_like_a_class(n)]
        if functions:
            advice = (
                f"{', '.join(functions)} {'is' if len(functions) == 1 else 'are'} not named "
                "as a class, and optckpt lets only classes through --allow-global"
            )
        else:
            flags = " ".join(f"--allow-global {n}" for n in names)
            advice = f"if you trust this file, pass {flags} (which imports their modules)"
        raise UnsafeCheckpointError(
            f"{path}: refusing to unpickle globals outside torch's weights_only allow-list: "
            f"{listed}; {advice}",
            names,
        ) from e
    except RuntimeError as e:
        message = first_line(e)
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
            f"{path}: truncated or corrupt torch file ({first_line(e) or type(e).__name__})"
        ) from e
    if moved:
        for key, tensor in tensor_paths(root):
            saved = moved.get(tensor.untyped_storage())
            if saved is not None:
                placement[key] = saved
    return root


@contextmanager
def _utf8_name(path: Path) -> Iterator[str]:
    """A name of ``path`` that torch can open.

    torch's C++ file reader takes UTF-8 names only, while a POSIX file name may hold any bytes
    (``ckpt\\xff.pt`` arrives as a surrogate escape). Such a file is opened here and handed
    to torch as ``/proc/self/fd/N``, which it can open and memory-map like the file itself.
    """
    name = str(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        with path.open("rb") as f:
            alias = f"/proc/self/fd/{f.fileno()}"
            if not os.path.exists(alias):
                raise UnreadableCheckpointError(
                    f"{path}: torch cannot open a file whose name is not UTF-8 here; rename it"
                ) from None
            yield alias
        return
    yield name


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
    path: Path,
    map_location: str | None,
    allowed: Sequence[Any],
    placement: dict[KeyPath, str],
    describe: bool = False,
) -> tuple[str, Any]:
    """The file's format and tree; the devices its tensors were saved from go into
    ``placement`` (see :attr:`Checkpoint.placement`), by key path in the file's tree.
    ``describe``: tensors described, not made, where :mod:`optckpt.io.structure` models
    the file (else it is read as without)."""
    kind = sniff(path)
    try:
        root = None
        if describe and not allowed and map_location == "cpu":
            if kind == "torch":
                root = describe_torch_zip(path, placement)
            elif kind == "safetensors":
                root = describe_safetensors(path)
        if root is None:
            placement.clear()
            if kind == "safetensors":
                from optckpt.io.safetensors_format import read_safetensors

                root = read_safetensors(path, placement)
            else:
                root = _torch_load(path, kind == "torch-legacy", map_location, allowed, placement)
        # Every command walks the tree: refuse one it would choke on, whatever the format.
        check_tree(root)
    except Refused as e:
        raise UnreadableCheckpointError(f"{path}: {e}") from e
    # Belt and braces for what the bounds above should already prevent.
    except RecursionError as e:
        raise UnreadableCheckpointError(f"{path}: nested too deeply to read") from e
    except MemoryError as e:
        raise UnreadableCheckpointError(f"{path}: not enough memory to read it") from e
    return kind, root


def _read_folder(
    path: Path, map_location: str | None, allowed: Sequence[Any], describe: bool = False
) -> Checkpoint:
    from optckpt.io.dcp import is_dcp  # optckpt.io.dcp imports this module

    if is_dcp(path):
        from optckpt.io.dcp.reader import read_dcp

        return read_dcp(path, allowed=allowed)  # DCP records no devices: read to the CPU
    # The top level first: a folder that holds no optimizer file (a checkpoint-N that is a
    # symlink to /) is not walked.
    optimizer_files = top_optimizer_files(path)
    if not optimizer_files:
        names = sorted(os.listdir(path))
        listed = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "") or "nothing"
        raise UnreadableCheckpointError(
            f"{path}: folder holds no optimizer file (optimizer.pt, optimizer.bin) and no "
            f"checkpoint-N folder; it has: {listed}"
        )
    files = files_under(path)
    members = [str(p.relative_to(path)) for p in files]
    root = {}
    kinds = set()
    placement: dict[KeyPath, str] = {}
    for p in optimizer_files:
        found: dict[KeyPath, str] = {}
        kind, root[p.name] = _read_file(p, map_location, allowed, found, describe)
        placement.update({(p.name, *key): device for key, device in found.items()})
        kinds.add(kind)
    return Checkpoint(
        path=path,
        format=kinds.pop() if len(kinds) == 1 else "torch",
        size=sum(p.stat().st_size for p in files),
        root=root,
        members=members,
        placement=placement,
        sources=optimizer_files,
    )


def load_checkpoint(
    path: str | Path,
    *,
    map_location: str | None = "cpu",
    allow_globals: Iterable[str] = (),
    describe: bool = False,
) -> Checkpoint:
    """Read a checkpoint file or folder safely, whatever its format.

    Args:
        path: a torch file (zip or legacy), a safetensors file, or a training folder (an
            output folder stands for its newest ``checkpoint-N``; see
            :func:`optckpt.io.folders.resolve_folder`).
        map_location: where tensors go (``"cpu"`` by default, so checkpoints saved from CUDA
            open on machines without one); ``None`` keeps the saved devices.
        allow_globals: ``module.Name`` globals to let through torch's ``weights_only``
            unpickler, for checkpoints that hold such objects and that you trust.
        describe: describe tensors rather than make them, without torch
            (:mod:`optckpt.io.structure`; ``inspect`` without ``--stats``), for torch zip and
            safetensors files it models; others are read as without. Needs the default
            ``map_location`` and no ``allow_globals``.

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
        resolved = resolve_folder(path)
        checkpoint = _read_folder(resolved.path, map_location, allowed, describe)
        checkpoint.given = resolved.given
        return checkpoint
    placement: dict[KeyPath, str] = {}
    kind, root = _read_file(path, map_location, allowed, placement, describe)
    return Checkpoint(
        path=path,
        format=kind,
        size=path.stat().st_size,
        root=root,
        placement=placement,
        sources=[path],
    )
