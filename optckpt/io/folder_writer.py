"""Writing a training folder: the optimizer files rewritten, every other file carried over.

A checkpoint folder (a Trainer ``checkpoint-N/``, an Accelerate ``save_state`` folder) is
read as its optimizer files (:mod:`optckpt.io.folders`); a command that rewrites it writes
a folder the library that made it loads again (``Trainer.train(resume_from_checkpoint=)``,
``Accelerator.load_state``):

* each optimizer file under its own name and in its own format (a torch file as
  ``torch.save`` writes it, whatever extension the library gave it: Accelerate loads
  ``optimizer.bin`` with ``torch.load``);
* every other file (model weights, scheduler, RNG states, ``trainer_state.json``, ...) and
  subfolder carried over as it is, as a file of its own: a copy-on-write clone where the file
  system makes one (``FICLONE``: btrfs, XFS; no bytes copied), else a copy (the kernel
  copies). With ``link`` (``--link``), a hard link instead where the file system allows
  (``os.link``: no bytes copied, no space) -- but a hard link shares its data with the input,
  and ``torch.save``, safetensors' ``save_file`` and so ``Accelerator.save_state`` into the
  output write into existing files, which would change the input too: hence copies by
  default. A symlink stays a symlink to the same file (see :func:`_link_target`), a FIFO or
  other special file a hard link to it, never opened. optckpt never opens a carried file for
  writing: every writer here makes new files and renames them;
* atomically: everything goes into a temporary folder beside the target, every file written
  (not the hard links) and folder in it is fsynced, then it is renamed onto the target
  (:func:`~optckpt.io.dcp.writer.atomic_folder`); on any failure, Ctrl-C included, the
  temporary folder goes and nothing appears at ``-o``.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from optckpt.errors import UsageError
from optckpt.io.dcp.writer import atomic_folder, check_output_folder
from optckpt.io.folders import optimizer_files, walk
from optckpt.io.read import sniff
from optckpt.locate import KeyPath

OMIT = object()
"""A tree entry that asks for a file of the folder to be left out of the output (a scheduler
file that ``remap --drop-scheduler`` drops)."""

# Names that ask for one file, not a folder: a folder output takes none of them.
_FILE_SUFFIXES = frozenset({".pt", ".pth", ".bin", ".ckpt", ".safetensors"})


def is_training_folder(path: Path) -> bool:
    """Whether ``path`` is a folder that holds optimizer files (what ``--force`` may replace)."""
    return path.is_dir() and bool(optimizer_files(path))


def check_training_folder_output(out: Path, inputs: Iterable[object], *, force: bool) -> None:
    """Refuse a folder output that would lose data or cannot be written.

    ``out`` may be absent or an empty folder; a folder that holds a checkpoint (optimizer
    files) is replaced only with ``force``, and never one that is, holds or lies inside an
    input, or holds what a symlink in an input folder points at.

    Raises:
        UsageError: ``out`` is named as a file (``.pt``, ``.safetensors``, ...), is or holds
            an input or a symlink's target, lies inside an input folder, is a file, a
            non-empty folder that is no checkpoint, one without ``force``, or its parent
            folder does not exist.
        UnwritableOutputError: the parent folder cannot be written.
    """
    if out.suffix in _FILE_SUFFIXES:
        raise UsageError(
            f"-o {out}: a training folder is written as a folder (its optimizer files "
            "rewritten, the other files carried over); give a folder name, or name one "
            "optimizer file of it as the input to write one file"
        )
    inputs = list(inputs)
    check_output_folder(
        out, inputs, force=force, replaceable=is_training_folder, holding="a checkpoint"
    )
    resolved = out.resolve()
    for folder in (Path(p) for p in inputs if isinstance(p, (str, os.PathLike))):
        if not is_training_folder(folder):
            continue  # carried from nowhere: not walked (a checkpoint-N symlinked to /)
        for link, target in symlink_targets(folder):
            if target == resolved or target.is_relative_to(resolved):
                raise UsageError(
                    f"-o {out} holds {target}, which {link} in the input points at; "
                    "write to a new folder"
                )


def _link_target(link: Path, folder: Path) -> str:
    """What the copy of the symlink ``link`` (in ``folder``) points at: its own target where
    that is absolute or stays inside ``folder`` (the copy points at the copied file), else
    the same file as an absolute path (a relative ``../x`` would name another file, or none,
    beside ``-o``)."""
    target = os.readlink(link)
    if os.path.isabs(target):
        return target
    inside = os.path.normpath(os.path.join(os.path.relpath(link.parent, folder), target))
    if inside != ".." and not inside.startswith(".." + os.sep):
        return target
    # the kernel resolves a relative target from the link's real folder, ".." included
    return os.path.join(os.path.realpath(link.parent), target)


def symlink_targets(folder: Path) -> list[tuple[Path, Path]]:
    """Every symlink under ``folder`` (its optimizer files included) and where it points:
    an output that holds one of the targets would replace what the input's link reads."""
    found = []
    for here, _, files in walk(folder):
        for name in files:
            link = here / name
            if link.is_symlink():
                found.append((link, Path(os.path.realpath(link))))
    return found


# ioctl(dest, FICLONE, source) from <linux/fs.h>: a copy-on-write clone of a whole file.
_FICLONE = 0x40049409


def _clone(source: Path, target: Path) -> bool:
    """Whether ``target`` could be made a copy-on-write clone of the regular file ``source``
    (a file of its own that shares extents until one is written); nothing left if not."""
    try:
        with open(source, "rb") as src, open(target, "xb") as dst:
            fcntl.ioctl(dst.fileno(), _FICLONE, src.fileno())
    except OSError:  # EOPNOTSUPP, EXDEV, EINVAL (ext4, tmpfs, another file system)
        target.unlink(missing_ok=True)
        return False
    shutil.copystat(source, target)
    return True


def _carry(source: Path, target: Path, folder: Path, link: bool) -> None:
    """``target`` made a file with the content of ``source``: a clone, else a copy; with
    ``link``, a hard link where the file system allows. A symlink is copied as a symlink to
    the same file (:func:`_link_target`); a FIFO or other special file is hard-linked (a copy
    would open it)."""
    if source.is_symlink():
        os.symlink(_link_target(source, folder), target)
        return
    regular = stat.S_ISREG(os.lstat(source).st_mode)
    if link or not regular:
        try:
            os.link(source, target, follow_symlinks=False)
            return
        except OSError:  # EXDEV, EPERM, EMLINK, ENOTSUP, ...: copy the bytes instead
            pass
    if not (regular and _clone(source, target)):
        shutil.copy2(source, target, follow_symlinks=False)


def _of_file(placement: Mapping[KeyPath, str], name: str) -> dict[KeyPath, str]:
    """The saved devices of one optimizer file's tree (the folder's are keyed by file name)."""
    return {key[1:]: device for key, device in placement.items() if key and key[0] == name}


def write_training_folder(
    tree: Mapping[str, Any],
    out: Path,
    folder: Path,
    placement: Mapping[KeyPath, str],
    sources: Sequence[Path],
    progress: Callable[[int], None] | None,
    *,
    link: bool = False,
) -> None:
    """Write the checkpoint folder ``folder`` to ``out`` with its optimizer files replaced by
    ``tree`` (file name -> its tree, as :func:`~optckpt.io.load_checkpoint` reads a folder),
    atomically (see the module doc).

    Args:
        tree: each optimizer file's tree, by its name in ``folder`` (also a scheduler file
            that remap rewrites; :data:`OMIT` for one left out).
        out: the target folder (checked by :func:`check_training_folder_output`).
        folder: the folder read, whose other files are carried over.
        placement: saved devices by key path, the file name first.
        sources: the memory-mapped files the trees were read from.
        progress: told the bytes of each write of the optimizer files.
        link: carry the other files as hard links, not copies (see the module doc).

    Raises:
        UnwritableOutputError: an :class:`OSError` while writing (disk full, ...).
    """
    with atomic_folder(out) as tmp:
        for here, dirs, files in walk(folder):
            where = tmp / here.relative_to(folder)
            for name in dirs:
                (where / name).mkdir()
            for name in files:
                if here == folder and tree.get(name) is OMIT:
                    continue
                if here == folder and name in tree:
                    fmt = sniff(here / name)
                    # imported here: the torch writer imports torch, a folder may not need it
                    from optckpt.io.safetensors_format.writer import write_safetensors
                    from optckpt.io.torch_format import save_torch

                    write = write_safetensors if fmt == "safetensors" else save_torch
                    write(
                        tree[name],
                        where / name,
                        progress=progress,
                        sources=sources,
                        placement=_of_file(placement, name),
                    )
                else:
                    _carry(here / name, where / name, folder, link)
