"""optckpt.io.folders: a training output folder stands for the checkpoint-N transformers picks.

The truth is transformers' own ``trainer_utils.get_last_checkpoint`` on the same folder.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.trainer_utils import get_last_checkpoint

from optckpt.io import load_checkpoint
from optckpt.io.folders import Resolved, last_checkpoint, resolve_folder

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TRAINER_RUN = FIXTURES / "hf_trainer"  # an output_dir holding checkpoint-2/

# Names around the pattern's edges: numbers of every width, leading zeros, a Unicode digit
# (\d matches it, int() reads it), a trailing newline ($ allows one), near misses.
NAMES = [
    "checkpoint-1",
    "checkpoint-2",
    "checkpoint-10",
    "checkpoint-9",
    "checkpoint-010",
    "checkpoint-0",
    "checkpoint-\u0663",  # ARABIC-INDIC DIGIT THREE
    "checkpoint-12\n",
    "checkpoint-11.bak",
    "checkpoint-",
    "checkpoint-x",
    "Checkpoint-99",
    "checkpoint_98",
    "xcheckpoint-97",
    "checkpoint--96",
]


def _make(folder: Path, entries: dict[str, str]) -> None:
    """Each entry a folder, a file, or a symlink to a folder, as ``entries`` says."""
    target = folder / "elsewhere"
    target.mkdir()
    for name, kind in entries.items():
        if kind == "dir":
            (folder / name).mkdir()
        elif kind == "file":
            (folder / name).write_text("x")
        else:
            (folder / name).symlink_to(target)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(NAMES), st.sampled_from(["dir", "file", "link"])))
def test_last_checkpoint_is_transformers_choice(entries: dict[str, str]) -> None:
    folder = Path(tempfile.mkdtemp())
    try:
        _make(folder, entries)
        theirs = get_last_checkpoint(str(folder))
        ours = last_checkpoint(folder)
        assert (None if ours is None else str(ours)) == theirs
    finally:
        shutil.rmtree(folder)


def test_resolve_folder_reads_checkpoint_folders_and_files_as_given(tmp_path: Path) -> None:
    checkpoint = TRAINER_RUN / "checkpoint-2"
    assert resolve_folder(checkpoint).path == checkpoint
    assert resolve_folder(checkpoint / "optimizer.pt").path == checkpoint / "optimizer.pt"
    # A folder with its own optimizer file is a checkpoint, whatever else it holds.
    shutil.copytree(checkpoint, tmp_path / "run")
    (tmp_path / "run" / "checkpoint-5").mkdir()
    assert resolve_folder(tmp_path / "run") == Resolved(tmp_path / "run")
    assert resolve_folder(tmp_path / "run").notes() == []


def test_output_folder_is_read_as_its_newest_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for step in (2, 10):
        shutil.copytree(TRAINER_RUN / "checkpoint-2", run / f"checkpoint-{step}")
    (run / "checkpoint-11").write_text("a file is no checkpoint")
    checkpoint = load_checkpoint(run)
    assert checkpoint.path == run / "checkpoint-10" == Path(get_last_checkpoint(str(run)))
    assert checkpoint.given == run
    (note,) = checkpoint.notes()
    assert str(run / "checkpoint-10") in note and "get_last_checkpoint" in note
    truth = torch.load(run / "checkpoint-10" / "optimizer.pt", weights_only=True)
    assert checkpoint.root["optimizer.pt"]["param_groups"] == truth["param_groups"]


def test_folder_with_neither_says_what_it_looked_for(tmp_path: Path) -> None:
    from optckpt.errors import UnreadableCheckpointError

    (tmp_path / "checkpoint-x").mkdir()
    with pytest.raises(UnreadableCheckpointError, match="no checkpoint-N folder"):
        load_checkpoint(tmp_path)


def test_a_checkpoint_that_is_a_symlink_to_root_is_not_walked(tmp_path: Path) -> None:
    # the newest checkpoint-N a symlink to /: refused from its top level, never a walk of
    # the whole file system
    from optckpt.errors import UnreadableCheckpointError

    (tmp_path / "checkpoint-9").symlink_to("/")
    with pytest.raises(UnreadableCheckpointError, match="checkpoint-9: folder holds no optim"):
        load_checkpoint(tmp_path)


def test_a_folder_nested_deeper_than_pythons_recursion_is_read(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # Python 3.11's os.walk and Path.rglob recurse once per level
    import sys

    from optckpt.io.folders import remove_tree

    folder = tmp_path / "checkpoint-2"
    shutil.copytree(TRAINER_RUN / "checkpoint-2", folder)
    # pytest removes old temporary folders with shutil.rmtree: leave it nothing this deep
    request.addfinalizer(lambda: remove_tree(folder / "a"))
    deep = folder
    for _ in range(sys.getrecursionlimit() + 100):
        deep = deep / "a"
        deep.mkdir()
    (deep / "notes.txt").write_text("deep")
    checkpoint = load_checkpoint(folder)
    assert str((deep / "notes.txt").relative_to(folder)) in checkpoint.members
