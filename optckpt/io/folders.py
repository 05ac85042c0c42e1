"""Training folders: which files hold optimizer state, and which checkpoint a run folder means.

* A checkpoint folder (a Hugging Face Trainer ``checkpoint-N/``, an Accelerate ``save_state``
  folder) keeps each optimizer in a file of its own at its top level: Trainer writes
  ``optimizer.pt``, Accelerate ``optimizer.bin`` (``optimizer_1.bin``, ... for more than one).
* A training output folder (the Trainer's ``output_dir``) holds no optimizer file itself but
  ``checkpoint-N/`` folders; it stands for its newest one, found by the rule of transformers'
  ``trainer_utils.get_last_checkpoint``, which ``Trainer.train(resume_from_checkpoint=True)``
  uses: the entries whose name is ``checkpoint-`` and a number (the pattern searched as
  transformers does, so ``\\d`` is any Unicode digit and a trailing newline is allowed), that
  are folders (symlinks followed), the one with the largest number (on a tie, the first that
  ``os.listdir`` lists, as transformers' ``max`` takes).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Files a training folder keeps its optimizer state in.
OPTIMIZER_FILE = re.compile(r"^optimizer(_\d+)?\.(pt|pth|bin)$")

# transformers.trainer_utils._re_checkpoint (PREFIX_CHECKPOINT_DIR = "checkpoint").
_CHECKPOINT_DIR = re.compile(r"^checkpoint\-(\d+)$")


def optimizer_files(folder: Path) -> list[Path]:
    """The optimizer files at the top of ``folder``, by name."""
    return sorted(p for p in folder.iterdir() if OPTIMIZER_FILE.match(p.name) and p.is_file())


def walk(folder: Path, *, strict: bool = True) -> Iterator[tuple[Path, list[str], list[str]]]:
    """Every folder under ``folder``, top-down, as ``(folder, subfolders, other entries)``;
    symlinks (to folders too) are other entries, never followed.

    Unlike ``os.walk``: with ``strict`` (for a copy), a folder that cannot be listed raises
    its :class:`OSError` (``os.walk`` skips it, so a copy would lack it silently); without,
    it is skipped. Depth costs no recursion (Python 3.11's ``os.walk`` and ``Path.rglob``
    recurse per level: a folder nested 1,000 deep raises ``RecursionError``).
    """
    stack = [folder]
    while stack:
        here = stack.pop()
        dirs: list[str] = []
        files: list[str] = []
        try:
            with os.scandir(here) as entries:
                for entry in entries:
                    (dirs if entry.is_dir(follow_symlinks=False) else files).append(entry.name)
        except OSError:
            if strict or here == folder:
                raise
            continue
        yield here, dirs, files
        stack.extend(here / name for name in reversed(dirs))


def files_under(folder: Path) -> list[Path]:
    """Every file under ``folder`` (symlinks to files too), sorted; folders that cannot be
    listed are skipped, symlinks to folders not followed (see :func:`walk`)."""
    found = (here / name for here, _, names in walk(folder, strict=False) for name in names)
    return sorted(p for p in found if p.is_file())


def remove_tree(folder: Path) -> None:
    """Remove ``folder`` and everything in it as far as possible, ignoring errors (as
    ``shutil.rmtree(folder, ignore_errors=True)``, which recurses per level in Python 3.11)."""
    folders = []
    try:
        for here, _, files in walk(folder, strict=False):
            folders.append(here)
            for name in files:
                with contextlib.suppress(OSError):
                    os.unlink(here / name)
    except OSError:
        pass
    for here in reversed(folders):
        with contextlib.suppress(OSError):
            os.rmdir(here)


def last_checkpoint(folder: Path) -> Path | None:
    """The newest ``checkpoint-N`` folder in ``folder`` by transformers' rule (see the module
    doc), or ``None`` where there is none."""
    numbered = []
    for name in os.listdir(folder):
        found = _CHECKPOINT_DIR.search(name)
        if found is not None and os.path.isdir(os.path.join(folder, name)):
            numbered.append((name, int(found.group(1))))
    if not numbered:
        return None
    return folder / max(numbered, key=lambda entry: entry[1])[0]


@dataclass(frozen=True)
class Resolved:
    """The checkpoint a path given on the command line stands for.

    Attributes:
        path: what is read: the path given, or the newest ``checkpoint-N`` in it.
        given: the path given, where it is a training output folder; else ``None``.
    """

    path: Path
    given: Path | None = None

    def notes(self) -> list[str]:
        """What a command says about the choice (nothing when the path was read as given)."""
        if self.given is None:
            return []
        return [
            f"{self.given} is a training output folder: read {self.path}, its newest "
            "checkpoint-N (the rule of transformers' get_last_checkpoint)"
        ]


def resolve_folder(path: str | Path) -> Resolved:
    """The checkpoint ``path`` stands for: a training output folder (a folder with no
    optimizer file of its own and no DCP checkpoint, that holds ``checkpoint-N/`` folders)
    stands for its newest ``checkpoint-N``; anything else for itself (a folder without either
    is refused when it is read)."""
    path = Path(path)
    if not path.is_dir():
        return Resolved(path)
    from optckpt.io.dcp import is_dcp  # optckpt.io.dcp imports optckpt.io.read

    if is_dcp(path) or optimizer_files(path):
        return Resolved(path)
    newest = last_checkpoint(path)
    return Resolved(path) if newest is None else Resolved(newest, path)
