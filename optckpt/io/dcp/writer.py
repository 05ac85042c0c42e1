"""Writing a checkpoint tree as a DCP folder, with torch's own ``FileSystemWriter``.

``torch.distributed.checkpoint.save`` in one process without a process group (``no_dist``)
flattens the tree as it flattens any state dict (``optim.state.<fqn>.exp_avg``,
``optim.param_groups.0.lr``, ``planner_data`` recording each key's path), so that
``dcp.load`` followed by ``set_optimizer_state_dict`` restores it into a model sharded over
any number of ranks: DCP reshards when it loads. Every optimizer is written name-keyed
(:func:`name_keyed_tree`), as ``get_optimizer_state_dict`` returns it.

The folder is written atomically (:func:`atomic_folder`): into a temporary folder beside the
target, every file and the folder fsynced, then renamed onto the target; on any failure the
temporary folder is removed and nothing appears at the target.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optckpt.errors import UnwritableOutputError, UsageError
from optckpt.io.dcp import METADATA, is_dcp
from optckpt.io.folders import remove_tree, walk
from optckpt.io.outfile import is_deferred
from optckpt.io.pages import FileRanges, trim_heap
from optckpt.io.write import check_folder, fsync
from optckpt.locate import locate_optimizers

if TYPE_CHECKING:
    from optckpt.io.torch_format import Deferred


def wants_dcp(out: str | os.PathLike[str], to: str | None) -> bool:
    """Whether ``-o out`` (as typed) with ``--to to`` asks for a DCP folder: ``--to dcp``, an
    ``-o`` that ends in ``/``, or one that is an existing folder."""
    if to is not None:
        return to == "dcp"
    text = os.fspath(out)
    return text.endswith(("/", os.sep)) or Path(text).is_dir()


def check_output_folder(
    out: Path,
    inputs: Iterable[object],
    *,
    force: bool,
    replaceable: Callable[[Path], bool] = is_dcp,
    holding: str = "a DCP checkpoint",
) -> None:
    """Refuse an output folder that would lose data or cannot be written.

    ``out`` may be absent or an empty folder; a folder that holds a checkpoint of its kind
    (``replaceable``: a DCP checkpoint by default) is replaced only with ``force``, and never
    one that is, holds or lies inside an input.

    Args:
        out: the ``-o`` folder.
        inputs: what the command reads (entries that are not paths are skipped).
        force: replace a checkpoint folder at ``out``.
        replaceable: whether a non-empty folder is a checkpoint ``force`` may replace.
        holding: what such a folder holds, for messages.

    Raises:
        UsageError: ``out`` is or holds an input, lies inside an input folder, is a file, a
            non-empty folder that is no such checkpoint, one without ``force``, or its
            parent folder does not exist.
        UnwritableOutputError: the parent folder cannot be written.
    """
    resolved = out.resolve()
    for source in (Path(p) for p in inputs if isinstance(p, (str, os.PathLike))):
        where = source.resolve()
        if where == resolved or where.is_relative_to(resolved):
            raise UsageError(f"-o {out} holds the input {source}; write to a new folder")
        if source.is_dir() and resolved.is_relative_to(where):
            raise UsageError(f"-o {out} is inside the input folder {source}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {out} is a file; {holding} is a folder")
    if out.is_dir() and any(out.iterdir()):
        if not replaceable(out):
            raise UsageError(f"-o {out} is a folder that holds files and no {holding[2:]}")
        if not force:
            raise UsageError(f"{out} holds {holding}; pass --force to replace it")
    check_folder(out, resolved.parent)


def _written_here(path: Path) -> bool:
    """Whether ``path`` is a file whose data this write made, to fsync: a regular file with
    one link. A hard link carried from the input holds the input's data, made durable by
    whoever wrote it (its new name is made durable by the folder's fsync), and fsyncing
    each costs a journal commit (minutes for 100,000 files); a FIFO or device carried as a
    link would block or act when opened; a symlink is not followed."""
    info = os.lstat(path)
    return stat.S_ISREG(info.st_mode) and info.st_nlink == 1


@contextlib.contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out``, else it goes.

    Every file written in it (not a hard link carried from elsewhere, see
    :func:`_written_here`) and every folder is fsynced (symlinks are not followed). An existing
    ``out`` (empty, or a checkpoint :func:`check_output_folder` let through) is renamed
    aside first and removed once the new folder is in place.

    Raises:
        UnwritableOutputError: an :class:`OSError` while creating, syncing or renaming.
    """
    target = out.resolve()  # -o a symlink to a folder: that folder is written
    parent = target.parent
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    except OSError as e:
        raise UnwritableOutputError(f"cannot write {out}: {e.strerror or e}") from e
    old: Path | None = None
    try:
        yield tmp
        for here, dirs, files in walk(tmp):
            for name in files:
                if _written_here(here / name):
                    fsync(here / name)
            for name in dirs:
                fsync(here / name)
        fsync(tmp)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private
        if target.is_dir() and any(target.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=parent))
            os.replace(target, old / "replaced")
        os.replace(tmp, target)
        fsync(parent)
    except BaseException as e:
        remove_tree(tmp)
        if old is not None and not target.exists():  # put the old checkpoint back
            os.replace(old / "replaced", target)
        if isinstance(e, OSError) and not isinstance(e, UnwritableOutputError):
            raise UnwritableOutputError(f"cannot write {out}: {e.strerror or e}") from e
        raise
    finally:
        if old is not None:
            remove_tree(old)


def _stand_ins(node: Any, later: dict[int, tuple[Any, Deferred]]) -> Any:
    """The tree with every :class:`~optckpt.io.torch_format.Deferred` replaced by a ``meta``
    tensor of its shape and dtype (what DCP's planner plans from: it never reads data),
    recorded in ``later`` by the stand-in's id; containers copied only where one was."""
    if is_deferred(node):
        import torch

        stand_in = torch.empty(node.shape, dtype=node.dtype, device="meta")
        later[id(stand_in)] = (stand_in, node)
        return stand_in
    if isinstance(node, Mapping):
        items = {k: _stand_ins(v, later) for k, v in node.items()}
        changed = any(items[k] is not v for k, v in node.items())
        return items if changed else node
    if isinstance(node, list):
        made = [_stand_ins(v, later) for v in node]
        return made if any(a is not b for a, b in zip(made, node)) else node
    return node


def _later_planner(later: Mapping[int, tuple[Any, Deferred]], ranges: FileRanges) -> Any:
    """torch's ``DefaultSavePlanner``, but each stand-in's tensor is made only when torch's
    writer asks for its data (``resolve_data``, the planner's extension point), one tensor
    at a time: peak memory is the largest tensor, not the checkpoint. A tensor of the tree
    that is a view of a memory-mapped input has its pages released once written.

    torch's ``FileSystemWriter`` keeps every tensor it wrote to a file until the file is
    done (for its safetensors format; written with ``torch.save``, as here, it never looks
    at them again). So when it asks for the next one, the memory of the one made before is
    freed under it (its storage resized to nothing; a view of an input file has its pages
    released instead). That needs the writer's serial loader, which asks for one tensor
    after the one before is written: one thread, nothing copied ahead (:func:`write_dcp`).
    """
    import torch
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    class LaterPlanner(DefaultSavePlanner):
        def __init__(self) -> None:
            super().__init__()
            self._last: tuple[Deferred | None, Any] | None = None

        def resolve_data(self, write_item: Any) -> Any:
            obj = self.lookup_object(write_item.index)
            found = later.get(id(obj))
            if found is None or found[0] is not obj:
                data = self.transform_object(write_item, obj)
                if isinstance(data, torch.Tensor):  # a tensor of the tree: a file's view?
                    self.release()
                    self._last = (None, data)
                return data
            self.release()
            made = found[1].materialize()
            nbytes = made.numel() * made.element_size()
            if not made.untyped_storage().resizable() and not ranges.find(made.data_ptr(), nbytes):
                made = made.clone()  # memory not torch's (a decompressed chunk): freed as ours
            self._last = (found[1], made)
            return made

        def release(self) -> None:
            """Free the tensor made last, and the pages of an input file it was read from
            (torch's writer is done with it)."""
            if self._last is None:
                return
            deferred, tensor = self._last
            self._last = None
            read = tensor if deferred is None else deferred.source
            ranges.drop(read.data_ptr(), read.numel() * read.element_size())
            if deferred is None:
                return  # the tree's own tensor: never freed here
            storage = tensor.untyped_storage()
            if storage.resizable():  # made here: no view of a file
                storage.resize_(0)
            del tensor, storage
            trim_heap()

    return LaterPlanner()


def name_keyed_tree(
    root: Any, rekey: Callable[[Mapping[str, Any]], Mapping[str, Any]]
) -> list[str]:
    """Rewrite, in place, every optimizer state dict of ``root`` name-keyed, as DCP keeps it
    (``rekey(state_dict)`` names one); the key paths rewritten."""
    done = []
    for located in locate_optimizers(root):
        keyed = rekey(located.state_dict)
        if keyed is not located.state_dict:
            located.state_dict.clear()
            located.state_dict.update(keyed)
            done.append(located.key)
    return done


def write_dcp(tree: Any, out: Path, *, sources: Iterable[str | Path] = ()) -> None:
    """Write ``tree`` (a dict) as a DCP folder at ``out``, atomically (see the module doc).

    Call :func:`check_output_folder` first. Optimizers must already be name-keyed
    (:func:`name_keyed_tree`). A :class:`~optckpt.io.torch_format.Deferred` in the tree (a
    cast, a DCP tensor assembled when written) is made only when torch's writer writes it,
    and freed before the next one is made (:func:`_later_planner`). ``sources``: the
    memory-mapped files the tree was read from, whose pages are released as they are
    written.

    Raises:
        UsageError: ``tree`` is not a dict (DCP saves state dicts).
        UnwritableOutputError: writing failed with an :class:`OSError`.
    """
    if not isinstance(tree, Mapping):
        raise UsageError(
            f"a DCP checkpoint holds a dict; this checkpoint is a {type(tree).__name__}"
        )
    # torch.distributed.checkpoint re-exports these without __all__ listing them for mypy;
    # taken from there, where users (and tests) patch them
    from torch.distributed.checkpoint import (  # type: ignore[attr-defined]
        FileSystemWriter,
        save,
    )
    from torch.distributed.checkpoint.api import CheckpointException

    later: dict[int, tuple[Any, Deferred]] = {}
    state = dict(_stand_ins(tree, later))
    with (
        atomic_folder(out) as tmp,
        warnings.catch_warnings(),
        FileRanges(list(sources)) as ranges,
    ):
        # one process without a process group is what is meant: torch warns that it assumes so
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        planner = _later_planner(later, ranges)
        # one thread, nothing copied ahead: torch's serial loader (see _later_planner)
        writer = FileSystemWriter(tmp, sync_files=True, thread_count=1, per_thread_copy_ahead=0)
        try:
            save(state, storage_writer=writer, planner=planner, no_dist=True)
        except CheckpointException as e:
            # torch wraps the real error (a BaseException): raise that one instead
            failures = list(e.failures.values())
            cause = failures[0][0] if failures else None
            if isinstance(cause, Exception):
                raise cause from None
            raise RuntimeError(str(e)) from None
        finally:
            planner.release()
        if not (tmp / METADATA).is_file():
            raise RuntimeError("torch.distributed.checkpoint.save wrote no .metadata")
