"""optckpt.io.folder_writer: a training folder in, a training folder out.

The folder is the Trainer fixture (``fixtures/hf_trainer/checkpoint-2``), copied under
``tmp_path`` with a subfolder and a symlink added; the written optimizer file is checked
against ``torch.load`` of the input, every other file against the input's bytes and inode.
Each writing command on a real Trainer and Accelerate folder, resumed by its library, is in
``tests/real/test_folders_real.py``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from checks import assert_bitwise_equal, folder_digests, run

from optckpt.convert import convert_checkpoint
from optckpt.errors import UsageError
from optckpt.io.folders import remove_tree
from optckpt.io.rewrite import prepare_output
from optckpt.move import move_checkpoint
from optckpt.resume import ResumeOptions, resume_each

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A Trainer output_dir: checkpoint-1/ (older) and checkpoint-2/, the latter with a
    subfolder and a symlink beside the Trainer's files."""
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "hf_trainer" / "checkpoint-2", run / "checkpoint-2")
    shutil.copytree(FIXTURES / "hf_trainer" / "checkpoint-2", run / "checkpoint-1")
    (run / "checkpoint-2" / "extra").mkdir()
    (run / "checkpoint-2" / "extra" / "notes.txt").write_text("kept")
    (run / "checkpoint-2" / "latest").symlink_to("trainer_state.json")
    return run


def test_convert_writes_the_newest_checkpoint_as_a_folder(run_dir: Path, tmp_path: Path) -> None:
    before = folder_digests(run_dir)
    out = tmp_path / "out"
    result = convert_checkpoint(run_dir, out)
    source = run_dir / "checkpoint-2"
    assert result.target_format == "folder" and result.out == out
    assert any("checkpoint-2" in note for note in result.notes)
    assert folder_digests(run_dir) == before  # the input is untouched
    written, original = folder_digests(out), folder_digests(source)
    assert set(written) == set(original)
    for name in set(original) - {"optimizer.pt"}:
        assert written[name] == original[name], name
    # carried files are files of their own (not hard links of the input's), symlinks symlinks
    for name in ("model.safetensors", "scheduler.pt", "extra/notes.txt"):
        assert (out / name).stat().st_ino != (source / name).stat().st_ino
        assert (out / name).stat().st_nlink == 1
    assert (out / "latest").is_symlink()
    # the optimizer file is rewritten, as torch.save writes it: equal to the input's
    assert (out / "optimizer.pt").stat().st_ino != (source / "optimizer.pt").stat().st_ino
    assert_bitwise_equal(
        torch.load(out / "optimizer.pt", weights_only=True),
        torch.load(source / "optimizer.pt", weights_only=True),
    )


def test_saving_into_the_output_leaves_the_input_alone(run_dir: Path, tmp_path: Path) -> None:
    # torch.save (and so Accelerator.save_state) into an existing file writes into it: the
    # output's files are its own, so a later save into the output folder keeps the input.
    source = run_dir / "checkpoint-2"
    before = folder_digests(source)
    out = tmp_path / "out"
    convert_checkpoint(run_dir, out)
    for name in ("model.safetensors", "scheduler.pt", "extra/notes.txt"):
        with open(out / name, "r+b") as f:  # in place, as torch.save's open(..., "wb") does
            f.write(b"overwritten")
    assert folder_digests(source) == before


def test_link_carries_hard_links(run_dir: Path, tmp_path: Path) -> None:
    source = run_dir / "checkpoint-2"
    out = tmp_path / "out"
    convert_checkpoint(run_dir, out, link=True)
    for name in ("model.safetensors", "scheduler.pt", "extra/notes.txt"):
        assert (out / name).stat().st_ino == (source / name).stat().st_ino
    assert (out / "latest").is_symlink()
    assert (out / "optimizer.pt").stat().st_ino != (source / "optimizer.pt").stat().st_ino


def test_carried_files_are_copied_where_links_fail(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(*args: object, **kwargs: object) -> None:
        raise OSError(18, "Invalid cross-device link")  # EXDEV: another file system

    monkeypatch.setattr(os, "link", no_links)
    out = tmp_path / "out"
    convert_checkpoint(run_dir / "checkpoint-2", out, link=True)
    source = run_dir / "checkpoint-2"
    assert (out / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    assert (out / "model.safetensors").stat().st_ino != (source / "model.safetensors").stat().st_ino


def test_move_and_resume_step_rewrite_only_the_optimizer_file(
    run_dir: Path, tmp_path: Path
) -> None:
    source = run_dir / "checkpoint-2"
    move_checkpoint(run_dir, tmp_path / "moved", dtype="bfloat16")
    moved = torch.load(tmp_path / "moved" / "optimizer.pt", weights_only=True)
    cast = {v.dtype for s in moved["state"].values() for k, v in s.items() if k != "step"}
    assert cast == {torch.bfloat16}
    with pytest.raises(UsageError, match="--all-tensors moves every tensor of one file"):
        move_checkpoint(run_dir, tmp_path / "all", dtype="bfloat16", all_tensors=True)
    assert not (tmp_path / "all").exists()
    run = resume_each(source, ResumeOptions(out=tmp_path / "stepped"))
    assert run.ok and run.out == tmp_path / "stepped"
    saved = torch.load(source / "optimizer.pt", weights_only=True)["state"]
    stepped = torch.load(tmp_path / "stepped" / "optimizer.pt", weights_only=True)["state"]
    assert all(stepped[pid]["step"] == saved[pid]["step"] + 1 for pid in saved)
    written, original = folder_digests(tmp_path / "stepped"), folder_digests(source)
    assert {k for k in original if written[k] != original[k]} == {"optimizer.pt"}


@pytest.mark.parametrize("where", ["inside the output_dir", "inside the checkpoint", "same"])
def test_output_in_or_at_the_input_is_refused(run_dir: Path, where: str) -> None:
    out = {
        "inside the output_dir": run_dir / "checkpoint-3",
        "inside the checkpoint": run_dir / "checkpoint-2" / "new",
        "same": run_dir / "checkpoint-2",
    }[where]
    before = folder_digests(run_dir)
    with pytest.raises(UsageError, match="input"):
        convert_checkpoint(run_dir, out, force=True)
    assert folder_digests(run_dir) == before


def test_output_holding_the_input_is_refused_even_with_force(run_dir: Path) -> None:
    # -o the output_dir itself, with --force, would replace the folder the input is in
    with pytest.raises(UsageError, match="holds the input"):
        convert_checkpoint(run_dir / "checkpoint-2", run_dir, force=True)


def test_output_names_and_kinds(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="written as a folder"):
        prepare_output(tmp_path / "x.pt", force=False, rewrites=run_dir)
    with pytest.raises(UsageError, match="--format safetensors: convert writes a training folder"):
        prepare_output(
            tmp_path / "x", force=False, rewrites=run_dir, kind="safetensors", command="convert"
        )
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    with pytest.raises(UsageError, match="holds files and no checkpoint"):
        prepare_output(tmp_path / "notes", force=True, rewrites=run_dir)
    convert_checkpoint(run_dir, tmp_path / "out")
    with pytest.raises(UsageError, match="holds a checkpoint; pass --force"):
        prepare_output(tmp_path / "out", force=False, rewrites=run_dir)
    stale = tmp_path / "out" / "stale.txt"
    stale.write_text("from before")
    convert_checkpoint(run_dir, tmp_path / "out", force=True)  # replaced as a whole
    assert not stale.exists() and (tmp_path / "out" / "optimizer.pt").is_file()


def test_an_interrupted_write_leaves_nothing(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    calls = []

    def interrupted(*args: object, **kwargs: object) -> None:
        calls.append(args)
        if len(calls) == 3:  # a few files in
            raise KeyboardInterrupt
        real_link(*args, **kwargs)  # type: ignore[arg-type]

    real_link = os.link
    monkeypatch.setattr(os, "link", interrupted)
    listing = sorted(os.listdir(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(run_dir, out, link=True)
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == listing, "no temporary folder left behind"


@pytest.fixture
def hostile(run_dir: Path, tmp_path: Path) -> Path:
    """checkpoint-2 with what a hostile or unlucky folder holds beside the Trainer's files: a
    FIFO, a symlink loop, a symlink to /, relative symlinks that leave the folder (``../``)
    or stay in it, and a file outside the folder that one of them reads."""
    folder = run_dir / "checkpoint-2"
    (run_dir / "outside.txt").write_text("outside")
    os.mkfifo(folder / "pipe")
    (folder / "loop1").symlink_to("loop2")
    (folder / "loop2").symlink_to("loop1")
    (folder / "root").symlink_to("/")
    (folder / "escapes").symlink_to("../outside.txt")
    (folder / "extra" / "up").symlink_to("../scheduler.pt")  # stays inside
    return folder


def test_special_files_and_symlinks_are_carried_as_they_are(hostile: Path, tmp_path: Path) -> None:
    import signal
    import stat

    def hung(signum: int, frame: object) -> None:
        raise TimeoutError("the write blocked (opened the FIFO?)")

    signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        convert_checkpoint(hostile, tmp_path / "out")
    finally:
        signal.alarm(0)
    out = tmp_path / "out"
    assert stat.S_ISFIFO(os.lstat(out / "pipe").st_mode)
    assert os.readlink(out / "loop1") == "loop2" and os.readlink(out / "root") == "/"
    # a link that left the folder still reads the same file; one inside reads the copy
    assert (out / "escapes").read_text() == "outside"
    assert os.path.realpath(out / "escapes") == os.path.realpath(hostile / "escapes")
    assert os.readlink(out / "extra" / "up") == "../scheduler.pt"


@pytest.mark.parametrize("link", [False, True])
def test_only_files_written_are_fsynced(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, link: bool
) -> None:
    # a copy's data is new and must be made durable; a carried hard link's is the input's:
    # fsyncing each costs a journal commit (5.6 minutes for 100,000 files), and opening a
    # carried FIFO blocks
    from optckpt.io.dcp import writer

    synced: list[str] = []
    real = writer.fsync
    monkeypatch.setattr(writer, "fsync", lambda p: (synced.append(p.name), real(p)))
    out = run_dir.parent / "out"
    convert_checkpoint(run_dir, out, link=link)
    files = {p.name for p in out.rglob("*") if p.is_file() and not p.is_symlink()}
    assert files & set(synced) == ({"optimizer.pt"} if link else files)
    assert "extra" in synced  # folders are, for their new entries


def test_an_output_that_holds_what_an_input_link_reads_is_refused(
    run_dir: Path, tmp_path: Path
) -> None:
    # optimizer.pt a symlink into the -o folder: --force would replace the input's optimizer
    folder = run_dir / "checkpoint-2"
    out = tmp_path / "out"
    convert_checkpoint(folder, out)
    (folder / "optimizer.pt").unlink()
    (folder / "optimizer.pt").symlink_to(out / "optimizer.pt")
    before = folder_digests(out)
    with pytest.raises(UsageError, match=r"optimizer\.pt in the input points at"):
        move_checkpoint(folder, out, dtype="bfloat16", force=True)
    assert folder_digests(out) == before


def test_a_folder_that_cannot_be_listed_fails_the_write(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # os.walk skips a folder it cannot list unless told: the output would lack it silently
    real = os.scandir
    blocked = run_dir / "checkpoint-2" / "extra"

    def scandir(path: object = ".") -> object:
        if Path(os.fsdecode(path)) == blocked:  # type: ignore[arg-type]
            raise PermissionError(13, "Permission denied", str(blocked))
        return real(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "scandir", scandir)
    listing = sorted(os.listdir(tmp_path))
    with pytest.raises(PermissionError):
        convert_checkpoint(run_dir, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == listing


@pytest.mark.parametrize("fails", ["link", "link and copy"])
def test_a_full_disk_while_carrying_exits_3_and_leaves_nothing(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fails: str
) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "link", full)
    if fails == "link and copy":
        monkeypatch.setattr(shutil, "copy2", full)
    before, listing = folder_digests(run_dir), sorted(os.listdir(tmp_path))
    if fails == "link":  # copies then: only the optimizer file's write fails
        monkeypatch.setattr("optckpt.io.torch_format.save_torch", lambda *a, **k: full())
    result = run("move", run_dir, "-o", tmp_path / "out", "--dtype", "bfloat16", "--link")
    assert result.exit_code == 3, result.output
    assert "No space left on device" in result.stderr
    assert sorted(os.listdir(tmp_path)) == listing and folder_digests(run_dir) == before


def test_a_folder_nested_deeper_than_pythons_recursion_is_written(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    # Python 3.11's os.walk, Path.rglob and shutil.rmtree recurse once per level: the
    # write, the size the CLI reports and the removal of a failed write's temporary folder
    import sys

    deep = run_dir / "checkpoint-2" / "extra"
    for _ in range(sys.getrecursionlimit() + 100):
        deep = deep / "a"
        deep.mkdir()
    (deep / "notes.txt").write_text("deep")
    out = tmp_path / "out"
    # pytest removes old temporary folders with shutil.rmtree: leave it nothing this deep
    request.addfinalizer(lambda: remove_tree(run_dir / "checkpoint-2" / "extra" / "a"))
    request.addfinalizer(lambda: remove_tree(out / "extra" / "a"))
    result = run("convert", run_dir, "-o", out)
    assert result.exit_code == 0, result.output
    copied = out / (deep / "notes.txt").relative_to(run_dir / "checkpoint-2")
    assert copied.read_text() == "deep"

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    # fails once the whole tree is in the temporary folder, which must then go
    monkeypatch.setattr("optckpt.io.dcp.writer.fsync", full)
    listing = sorted(os.listdir(tmp_path))
    result = run("move", run_dir, "-o", tmp_path / "o2", "--dtype", "bfloat16")
    assert result.exit_code == 3, result.output
    assert sorted(os.listdir(tmp_path)) == listing


def test_an_output_that_is_a_symlink_to_a_folder_writes_that_folder(
    run_dir: Path, tmp_path: Path
) -> None:
    # the rename went onto the symlink, a folder over a non-folder: ENOTDIR, exit 3
    (tmp_path / "disk").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "disk")
    convert_checkpoint(run_dir, tmp_path / "out")
    assert (tmp_path / "out").is_symlink()
    assert (tmp_path / "disk" / "optimizer.pt").is_file()
    move_checkpoint(run_dir, tmp_path / "out", dtype="bfloat16", force=True)  # replaced
    assert (tmp_path / "out").is_symlink()
    moved = torch.load(tmp_path / "disk" / "optimizer.pt", weights_only=True)["state"]
    assert moved[0]["exp_avg"].dtype == torch.bfloat16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "out", "run"]


def test_a_newest_checkpoint_that_holds_no_optimizer_file_is_not_walked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # checkpoint-9 a symlink to a big tree (/usr, /): -o is checked, then the input is
    # refused from its top level; walking it (for its symlinks) would take the file system
    from optckpt.errors import UnreadableCheckpointError

    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint-9").symlink_to(tree)
    real = os.scandir

    def scandir(path: object = ".") -> object:
        if os.fsdecode(path).endswith("sub"):  # type: ignore[call-overload]
            raise AssertionError(f"walked {os.fsdecode(path)}")  # type: ignore[call-overload]
        return real(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(UnreadableCheckpointError, match="holds no optimizer file"):
        convert_checkpoint(tmp_path / "run", tmp_path / "out")
