"""Hostile outputs and hostile names: ``-o`` never destroys an input or a special file, and
names from a checkpoint reach the terminal escaped (rich markup, control characters)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from checks import assert_one_line_error
from typer.testing import CliRunner, Result

from optckpt.cli.app import app
from optckpt.errors import UsageError
from optckpt.io.write import check_output

runner = CliRunner()


def run(*args: str | Path) -> Result:
    return runner.invoke(app, [str(a) for a in args])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _snapshot(folder: Path) -> dict[str, str]:
    """Every entry of ``folder`` and what it is (hash of a file, target of a link)."""
    return {
        p.name: os.readlink(p) if p.is_symlink() else _sha(p) if p.is_file() else "special"
        for p in folder.iterdir()
    }


def _save_training(folder: Path, names: list[str], steps: int = 1) -> None:
    """``c.pt`` (model + AdamW built from named parameters), ``bare.pt`` (the optimizer
    alone), ``w.pt`` (the weights), ``lay.json`` and ``from.json`` (its layout)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3)) for _ in names]
    opt = torch.optim.AdamW(list(zip(names, params)), lr=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        sum((p**2).sum() for p in params).backward()  # type: ignore[union-attr]
        opt.step()
    weights = {n: p.detach() for n, p in zip(names, params)}
    torch.save({"model": weights, "optimizer": opt.state_dict()}, folder / "c.pt")
    torch.save(opt.state_dict(), folder / "bare.pt")
    torch.save(weights, folder / "w.pt")
    layout = {
        "params": {n: {"shape": [3], "dtype": "float32"} for n in names},
        "groups": [{"params": names}],
    }
    for name in ("lay.json", "from.json"):
        (folder / name).write_text(json.dumps(layout))


@pytest.fixture
def files(tmp_path: Path) -> Path:
    _save_training(tmp_path, ["a.weight", "a.bias", "b.weight"])
    return tmp_path


# every input of every kind, as -o, with and without --force --------------------------------

# (arguments before -o, the input given as -o)
PROTECTED: list[tuple[list[str], str]] = [
    (["convert", "c.pt"], "c.pt"),
    (["move", "c.pt", "--device", "cpu"], "c.pt"),
    (["remap", "c.pt", "--to", "lay.json"], "c.pt"),
    (["remap", "c.pt", "--to", "lay.json"], "lay.json"),
    (["remap", "c.pt", "--to", "lay.json", "--from", "from.json"], "from.json"),
    (["resume-step", "c.pt"], "c.pt"),
    (["resume-step", "bare.pt", "--model", "w.pt"], "w.pt"),
    (["resume-step", "bare.pt", "--model", "w.pt"], "bare.pt"),
    (["regenerate", "--optimizer", "adamw", "--layout", "lay.json"], "lay.json"),
    (["regenerate", "--optimizer", "adamw", "--layout", "w.pt"], "w.pt"),
]


@pytest.mark.parametrize("force", [False, True], ids=["", "force"])
@pytest.mark.parametrize(("args", "target"), PROTECTED, ids=lambda x: str(x))
def test_an_input_is_never_the_output(
    files: Path, args: list[str], target: str, force: bool
) -> None:
    # The command works when -o is a new file ...
    located = [str(files / a) if (files / a).exists() else a for a in args]
    assert run(*located, "-o", files / "new.pt").exit_code == 0
    (files / "new.pt").unlink()
    before = _snapshot(files)
    # ... and refuses the input, however it is spelled.
    for spelled in (files / target, files / "." / target):
        result = run(*located, "-o", spelled, *(["--force"] if force else []))
        assert result.exit_code == 2, result.output
        assert_one_line_error(result.stderr, "is the input")
    assert _snapshot(files) == before


@pytest.mark.parametrize(("args", "target"), PROTECTED[:5:2], ids=lambda x: str(x))
def test_a_symlink_to_an_input_is_refused(files: Path, args: list[str], target: str) -> None:
    located = [str(files / a) if (files / a).exists() else a for a in args]
    (files / "link.pt").symlink_to(files / target)
    before = _snapshot(files)
    result = run(*located, "-o", files / "link.pt", "--force")
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, "is the input")
    assert _snapshot(files) == before


def test_the_input_folder_is_protected(files: Path) -> None:
    folder = files / "run"
    folder.mkdir()
    (files / "bare.pt").rename(folder / "optimizer.pt")
    result = run("resume-step", folder, "-o", folder / "optimizer.pt", "--force")
    assert result.exit_code == 2
    assert_one_line_error(result.stderr)


# -o must be a regular file or absent --------------------------------------------------------


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _socket(path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()  # the socket file stays


def _char_device(path: Path) -> None:
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a /dev/null of our own
    except PermissionError:
        pytest.skip("making a device node needs root")


def _link_to_dev_null(path: Path) -> None:
    path.symlink_to("/dev/null")  # replacing the link would spare /dev/null, but is refused


@pytest.mark.parametrize("force", [False, True], ids=["", "force"])
@pytest.mark.parametrize("make", [_fifo, _socket, _char_device, _link_to_dev_null])
def test_a_special_file_is_never_replaced(
    files: Path, make: Callable[[Path], None], force: bool
) -> None:
    out = files / "special.pt"
    make(out)
    before = os.lstat(out)
    result = run("convert", files / "c.pt", "-o", out, *(["--force"] if force else []))
    assert result.exit_code == 2, result.output
    assert_one_line_error(result.stderr, "not a regular file")
    after = os.lstat(out)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert not [p for p in files.iterdir() if p.name.endswith(".tmp")]
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_dev_null_is_refused_by_the_check() -> None:
    # The check alone: nothing is written, so the real /dev/null is safe to name.
    with pytest.raises(UsageError, match="is a character device, not a regular file"):
        check_output(Path("/dev/null"), [], force=True)


def test_a_dangling_symlink_needs_force(files: Path) -> None:
    out = files / "dangling.pt"
    out.symlink_to(files / "nowhere.pt")
    result = run("convert", files / "c.pt", "-o", out)
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, "exists")
    assert out.is_symlink()


# names that are markup or terminal escapes --------------------------------------------------

HOSTILE = [
    "[/]",
    "\x1b[31mred",
    "\x1b]0;title\x07",
    "car\rriage",
    "back\bspace",
    "[bold]b[/bold]",
    "bidi\u202eevil",
    "c1\x9bcsi",
    "ok",
]
RAW = ("\x1b", "\r", "\b", "\x07", "\x9b", "\u202e")


@pytest.fixture
def hostile(tmp_path: Path) -> Path:
    folder = tmp_path / "x[red]\x1b[2J"  # the path is hostile too (no "/" in a name)
    folder.mkdir()
    _save_training(folder, HOSTILE)
    os.rename(folder / "c.pt", folder / "c[bold].pt")
    again = tmp_path / "again"
    again.mkdir()
    _save_training(again, HOSTILE, steps=2)
    # a target layout with a new hostile name and one name dropped
    layout = json.loads((folder / "lay.json").read_text())
    layout["params"]["new\x1b[2J[/]"] = {"shape": [3], "dtype": "float32"}
    del layout["params"]["[/]"]
    layout["groups"][0]["params"] = list(layout["params"])
    (folder / "target.json").write_text(json.dumps(layout))
    return folder


NAMES = (
    "\\x1b[31mred",
    "car\\rriage",
    "back\\x08space",
    "[bold]b[/bold]",
    "bidi\\u202eevil",
    "[/]",
)


@pytest.mark.parametrize(
    ("args", "code", "shown"),
    [
        (["inspect", "{c}"], 0, NAMES),
        (["inspect", "{c}", "--stats", "--all"], 0, NAMES),
        (["diff", "{c}", "{again}"], 1, NAMES),
        (["remap", "{c}", "--to", "{target}", "--dry-run"], 0, ("new\\x1b[2J[/]", "dropped: [/]")),
        (["resume-step", "{c}"], 0, ("x[red]\\x1b[2J",)),
    ],
    ids=["inspect", "stats", "diff", "remap", "resume-step"],
)
def test_hostile_names_are_printed_escaped(
    hostile: Path, tmp_path: Path, args: list[str], code: int, shown: tuple[str, ...]
) -> None:
    paths = {
        "c": hostile / "c[bold].pt",
        "again": tmp_path / "again" / "c.pt",
        "target": hostile / "target.json",
    }
    result = run(*(a.format(**paths) for a in args))
    assert result.exit_code == code, result.output
    for raw in RAW:
        assert raw not in result.stdout and raw not in result.stderr, repr(raw)
    for needle in shown:  # markup shown as text, not applied; controls as escapes
        assert needle in result.stdout, needle
    if args[0] != "remap":
        assert "c[bold].pt" in result.stdout


def test_hostile_names_round_trip_through_json(hostile: Path) -> None:
    result = run("inspect", hostile / "c[bold].pt", "--json")
    assert result.exit_code == 0
    assert "\x1b" not in result.stdout and "\r" not in result.stdout  # json.dumps escapes
    report = json.loads(result.stdout)
    assert [p["name"] for p in report["optimizers"][0]["params"]] == HOSTILE


def test_hostile_path_in_an_error_is_escaped(tmp_path: Path) -> None:
    missing = tmp_path / "gone\x1b[2J[bold].pt"
    result = run("inspect", missing)
    assert result.exit_code == 3
    assert "\x1b" not in result.stderr
    assert_one_line_error(result.stderr, "gone\\x1b[2J[bold].pt")
