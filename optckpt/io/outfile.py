"""The output file of a writer, and what it records about where storages were, without torch.

:func:`open_output`, :func:`write_all` and :func:`end_output` are how every file writer
(:mod:`optckpt.io.torch_format`, :mod:`optckpt.io.safetensors_format.writer`) opens, fills and
ends its file; :func:`storage_locations` and :func:`recorded_location` say which device to
record for each storage. None of them imports torch, so a writer of described tensors
(:mod:`optckpt.described`, ``convert`` to safetensors) runs without it; :func:`is_deferred`
tells a cast made when written (:class:`~optckpt.io.torch_format.Deferred`) from the rest.
"""

from __future__ import annotations

import errno
import io
import os
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optckpt.described import DescribedStorage, layout_name
from optckpt.locate import KeyPath, tensor_paths

if TYPE_CHECKING:
    from typing_extensions import TypeIs

    from optckpt.io.torch_format import Deferred


def is_deferred(value: object) -> TypeIs[Deferred]:
    """Whether ``value`` is a :class:`~optckpt.io.torch_format.Deferred` cast (none exists
    before :mod:`optckpt.io.torch_format`, which imports torch, is imported)."""
    module = sys.modules.get("optckpt.io.torch_format")
    return module is not None and isinstance(value, module.Deferred)


def write_all(f: Any, data: Any) -> None:
    """Write all of ``data`` to a raw (unbuffered) binary file, whose writes may be partial."""
    view = memoryview(data).cast("B")
    while view:
        n = f.write(view)
        view = view[n:]


def storage_locations(tree: Any, placement: Mapping[KeyPath, str]) -> dict[Any, str]:
    """The device to record for each CPU storage of ``tree`` saved from elsewhere, and for
    each :class:`~optckpt.io.torch_format.Deferred` cast (a cast kept on the device it was
    saved from: ``move --dtype`` without ``--device``).

    ``placement`` gives it by key path (:attr:`optckpt.io.Checkpoint.placement`); a tensor
    it does not name records where it is, a cast the CPU. A storage is one record in a torch
    file, so the tensors on it must agree: where they do not (a moved tensor that is the same
    storage as one left where it was), it records the CPU, where it is.

    Returns:
        Storage or Deferred -> device, for those to record elsewhere than the CPU. Keyed by
        the object (torch keeps one storage object per storage while it lives); the map
        holds each one for as long as the writing needs it.
    """
    found: dict[Any, str] = {}
    for key, tensor in tensor_paths(tree):
        if tensor.device.type != "cpu" or layout_name(tensor) != "strided":
            continue  # a sparse tensor has no storage: torch pickles its parts, where they are
        device = placement.get(key, "cpu")
        storage = tensor.untyped_storage()
        if found.setdefault(storage, device) != device:
            found[storage] = "cpu"
    for key, deferred in _deferred_paths(tree):
        found[deferred] = placement.get(key, "cpu")
    return {storage: device for storage, device in found.items() if device != "cpu"}


def _deferred_paths(tree: Any) -> Iterator[tuple[KeyPath, Any]]:
    """``(key path, cast)`` for every :class:`~optckpt.io.torch_format.Deferred` of a tree."""
    stack: list[tuple[KeyPath, Any]] = [((), tree)]
    while stack:
        path, value = stack.pop()
        if is_deferred(value):
            yield path, value
        elif isinstance(value, Mapping):
            stack.extend(((*path, k), v) for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            stack.extend(((*path, i), v) for i, v in enumerate(value))


def recorded_location(storage: Any, locations: Mapping[Any, str]) -> str:
    """The device to record for ``storage``: the one it was saved from (``locations``, from
    :func:`storage_locations`) if it is a CPU storage read from such a file, else where it
    is; a new string for a device other than the CPU, as torch's."""
    if isinstance(storage, DescribedStorage):
        location = "cpu"  # a description is of a tensor read to the CPU
    else:
        import torch

        location = torch.serialization.location_tag(storage)
    if location == "cpu":
        location = locations.get(storage, location)
    # torch's location_tag builds "cuda:0" anew for each storage, so its pickle writes the
    # string each time rather than referring back to the first (memoized only per object)
    return location if location == "cpu" else location.encode().decode()


def open_output(path: Path) -> Any:
    """Open ``path`` for writing as a raw binary file, creating it, without truncating it.

    On ext4, closing a file that was opened with ``O_TRUNC`` starts its write-back at once
    (``auto_da_alloc``), which only competes with the fsync that follows; call
    :func:`end_output` when done to cut what an existing file held beyond the new end.

    The file is written back to the disk while it is being written (see
    :class:`_WriteBehind`), so the fsync that makes it durable finds little left to do.
    """
    return _Output(os.open(path, os.O_WRONLY | os.O_CREAT, 0o666), path)


class _Output(io.FileIO):
    """A raw output file with a :class:`_WriteBehind` that ends before the file closes."""

    def __init__(self, fd: int, path: Path) -> None:
        super().__init__(fd, "wb")
        self._behind = _WriteBehind(fd, path)

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        try:
            if kind is not None and not self.closed:
                # The exception in flight (Ctrl-C, SIGTERM, a failed read) is the one to
                # report, and the file is abandoned: a background flush's error is dropped.
                self._behind.stop(report=False)
        finally:
            self.close()

    def close(self) -> None:
        behind = getattr(self, "_behind", None)
        try:
            if behind is not None and not self.closed:
                behind.stop()  # before the descriptor goes: the thread flushes through it
        finally:
            super().close()


class _WriteBehind:
    """Write a growing file back to the disk from a background thread as it grows.

    An fsync at the end of a large write waits for all of it to reach the disk (about as long
    as the copy itself on this project's machines: ``cp && sync`` is ~1.7x ``cp``). Here a
    thread calls ``fdatasync`` each time another :data:`WRITE_BEHIND_BYTES` have been written,
    so the disk works while the writer copies and the final fsync (the caller's, which makes
    the write durable) has little left. It only starts write-back earlier: what is written,
    and when the file counts as durable, do not change. ``fdatasync`` releases the GIL.

    An error of a background flush (``EIO``, ``ENOSPC``) is raised by :meth:`stop`, as an
    :class:`OSError` naming the file: the kernel reports a write-back error once per
    descriptor, so the final fsync might not see it again. A file system that cannot flush
    the file (``EINVAL``, ``EOPNOTSUPP``, ``ENOSYS``) just ends the thread.
    """

    def __init__(self, fd: int, path: Path) -> None:
        self._fd = fd
        self._path = path
        self._done = threading.Event()
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="optckpt-write-behind", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        flushed = 0
        while not self._done.wait(_POLL_SECONDS):
            try:
                end = os.fstat(self._fd).st_size
                if end - flushed >= WRITE_BEHIND_BYTES:
                    _datasync(self._fd)
                    flushed = end
            except OSError as e:
                # A file system that cannot flush this file (fdatasync's EINVAL) only loses
                # the head start; whether the write is durable is the final fsync's to say.
                if e.errno not in _UNSUPPORTED:
                    self._error = e
                return

    def stop(self, *, report: bool = True) -> None:
        """End the thread (waiting for a flush under way).

        Args:
            report: raise a background flush's error (else it is dropped).

        Raises:
            OSError: a background flush failed; the message names the file.
        """
        self._done.set()
        self._thread.join()
        e, self._error = self._error, None
        if e is not None and report:
            raise OSError(e.errno, e.strerror, str(self._path)) from e


def _datasync(fd: int) -> None:
    """``fdatasync`` where the platform has it (not every macOS Python does), else ``fsync``."""
    sync = getattr(os, "fdatasync", None) or os.fsync
    sync(fd)


# Write back every this many new bytes: large enough that small files never start a flush.
WRITE_BEHIND_BYTES = 64 * 1024 * 1024
_POLL_SECONDS = 0.01
# What fdatasync says where a file system cannot flush the file: the write-behind stops.
_UNSUPPORTED = frozenset({errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})


def end_output(f: Any) -> None:
    """Cut the file opened by :func:`open_output` at the current position, if it is longer."""
    end = f.tell()
    if os.fstat(f.fileno()).st_size > end:
        f.truncate(end)
