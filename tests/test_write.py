"""Writing rules: never the input, never over a file without force, nothing half-written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from optckpt.errors import ExitCode, UsageError
from optckpt.io.write import atomic_output, check_output, format_for, save_checkpoint


def test_format_follows_extension_unless_given() -> None:
    assert format_for(Path("a.safetensors")) == "safetensors"
    assert format_for(Path("a.pt")) == "pt"
    assert format_for(Path("a.ckpt")) == "pt"
    assert format_for(Path("a.pt"), "safetensors") == "safetensors"
    with pytest.raises(UsageError):
        format_for(Path("a.pt"), "onnx")


def test_refuses_the_input_itself(tmp_path: Path) -> None:
    source = tmp_path / "in.pt"
    source.write_bytes(b"x")
    with pytest.raises(UsageError, match="is the input") as info:
        check_output(tmp_path / "." / "in.pt", [source], force=True)
    assert info.value.exit_code == ExitCode.USAGE


def test_refuses_a_hard_link_to_the_input(tmp_path: Path) -> None:
    source = tmp_path / "in.pt"
    source.write_bytes(b"x")
    os.link(source, tmp_path / "alias.pt")
    with pytest.raises(UsageError, match="is the input"):
        check_output(tmp_path / "alias.pt", [source], force=True)


def test_refuses_an_existing_file_without_force(tmp_path: Path) -> None:
    out = tmp_path / "out.pt"
    out.write_bytes(b"keep me")
    with pytest.raises(UsageError, match="--force"):
        check_output(out, [tmp_path / "in.pt"], force=False)
    check_output(out, [tmp_path / "in.pt"], force=True)
    assert out.read_bytes() == b"keep me"


def test_refuses_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        check_output(tmp_path / "nope" / "out.pt", [tmp_path / "in.pt"], force=False)


def test_save_is_loadable_and_leaves_no_temporary(tmp_path: Path) -> None:
    out = tmp_path / "out.pt"
    tree = {"w": torch.arange(6.0).view(2, 3), "epoch": 3}
    written: list[int] = []
    save_checkpoint(tree, out, "pt", progress=written.append)
    loaded = torch.load(out, weights_only=True)
    assert torch.equal(loaded["w"], tree["w"]) and loaded["epoch"] == 3
    assert sum(written) == out.stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == ["out.pt"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_an_error_midway_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    out = tmp_path / "out.pt"
    calls = {"n": 0}
    real_save = torch.save

    def failing_save(obj: object, f: object, *args: object, **kwargs: object) -> None:
        class Half:
            def write(self, data: bytes) -> int:
                calls["n"] += 1
                if calls["n"] > 2:
                    raise error
                return f.write(data)  # type: ignore[attr-defined]

            def flush(self) -> None:
                f.flush()  # type: ignore[attr-defined]

        real_save(obj, Half(), *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "save", failing_save)
    # torch's zip writer reports a failed write as a RuntimeError when it closes the archive;
    # Ctrl-C must still surface as KeyboardInterrupt.
    expected = (
        KeyboardInterrupt if isinstance(error, KeyboardInterrupt) else (OSError, RuntimeError)
    )
    with pytest.raises(expected):
        save_checkpoint({"w": torch.randn(1000)}, out, "pt")
    assert calls["n"] > 2, "the write must have started before it failed"
    assert list(tmp_path.iterdir()) == []


def test_a_failed_fsync_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint({"w": torch.randn(10)}, tmp_path / "out.safetensors", "safetensors")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_target_survives_a_failed_write(tmp_path: Path) -> None:
    out = tmp_path / "out.pt"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_output(out) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("boom")
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.pt"]
