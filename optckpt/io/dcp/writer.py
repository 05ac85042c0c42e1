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
from typing import Any

from optckpt.errors import UnwritableOutputError, UsageError
from optckpt.io.dcp import METADATA, is_dcp
from optckpt.io.folders import remove_tree, walk
from optckpt.io.outfile import is_deferred
from optckpt.locate import locate_optimizers


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
    parent = resolved.parent
    if not parent.is_dir():
        raise UsageError(f"-o {out}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UnwritableOutputError(f"cannot write {out}: permission denied (folder {parent})")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
                    _fsync(here / name)
            for name in dirs:
                _fsync(here / name)
        _fsync(tmp)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private
        if target.is_dir() and any(target.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=parent))
            os.replace(target, old / "replaced")
        os.replace(tmp, target)
        _fsync(parent)
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


def _made(node: Any) -> Any:
    """The tree with every :class:`~optckpt.io.torch_format.Deferred` made (DCP's planner
    takes only tensors), containers copied only where something was made."""
    if is_deferred(node):
        return node.materialize()
    if isinstance(node, Mapping):
        items = {k: _made(v) for k, v in node.items()}
        changed = any(items[k] is not v for k, v in node.items())
        return items if changed else node
    if isinstance(node, list):
        made = [_made(v) for v in node]
        return made if any(a is not b for a, b in zip(made, node)) else node
    return node


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


def write_dcp(tree: Any, out: Path) -> None:
    """Write ``tree`` (a dict) as a DCP folder at ``out``, atomically (see the module doc).

    Call :func:`check_output_folder` first. Optimizers must already be name-keyed
    (:func:`name_keyed_tree`).

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

    state = dict(_made(tree))
    with atomic_folder(out) as tmp, warnings.catch_warnings():
        # one process without a process group is what is meant: torch warns that it assumes so
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        try:
            save(state, storage_writer=FileSystemWriter(tmp, sync_files=True), no_dist=True)
        except CheckpointException as e:
            # torch wraps the real error (a BaseException): raise that one instead
            failures = list(e.failures.values())
            cause = failures[0][0] if failures else None
            if isinstance(cause, Exception):
                raise cause from None
            raise RuntimeError(str(e)) from None
        if not (tmp / METADATA).is_file():
            raise RuntimeError("torch.distributed.checkpoint.save wrote no .metadata")
