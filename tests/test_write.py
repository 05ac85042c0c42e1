"""Writing rules: never the input, never over a file without force, nothing half-written."""

from __future__ import annotations

import errno
import io
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from optckpt.errors import ExitCode, UnwritableOutputError, UsageError
from optckpt.io import outfile, torch_format
from optckpt.io.safetensors_format import read_safetensors
from optckpt.io.safetensors_format import writer as safetensors_writer
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


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_an_error_midway_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException, fmt: str
) -> None:
    out = tmp_path / f"out.{fmt}"
    calls = {"n": 0}
    real_write_all = torch_format.write_all

    def failing_write_all(f: object, data: object) -> None:
        calls["n"] += 1
        if calls["n"] > 2:
            raise error
        real_write_all(f, data)

    monkeypatch.setattr(torch_format, "write_all", failing_write_all)
    monkeypatch.setattr(safetensors_writer, "write_all", failing_write_all)
    # torch's zip writer reports a failed write as a RuntimeError when it closes the archive;
    # Ctrl-C must still surface as KeyboardInterrupt.
    expected = (
        KeyboardInterrupt if isinstance(error, KeyboardInterrupt) else (OSError, RuntimeError)
    )
    tree = {f"w{i}": torch.randn(1000) for i in range(4)}
    with pytest.raises(expected):
        save_checkpoint(tree, out, fmt)
    assert calls["n"] > 2, "the write must have started before it failed"
    assert list(tmp_path.iterdir()) == []


def test_a_failed_kernel_copy_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "in" / "src.pt"
    src.parent.mkdir()
    torch.save({"w": torch.randn(100_000)}, src)  # large enough to be copied in the kernel
    tree = torch.load(src, weights_only=True, mmap=True)

    def failing_copy(*args: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "copy_file_range", failing_copy)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises((OSError, RuntimeError)):
        save_checkpoint(tree, out_dir / "out.pt", "pt", sources=[src])
    assert list(out_dir.iterdir()) == []


def test_a_failed_fsync_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint({"w": torch.randn(10)}, tmp_path / "out.safetensors", "safetensors")
    assert list(tmp_path.iterdir()) == []


def _write_behind(
    monkeypatch: pytest.MonkeyPatch,
    flush: Callable[[int], None],
    *,
    every: int = 1,
    pause: float = 0.05,
    after_write: Callable[[], None] | None = None,
) -> None:
    """Make the write-behind flush (through ``flush``, in place of ``os.fdatasync``) every
    ``every`` bytes, and each write of both writers pause ``pause`` s, so that the 10 ms poll
    sees the file grow; ``after_write`` runs after each write."""
    monkeypatch.setattr(outfile, "WRITE_BEHIND_BYTES", every)
    monkeypatch.setattr(os, "fdatasync", flush)
    slow = outfile.write_all

    def slow_write(f: object, data: object) -> None:
        slow(f, data)
        time.sleep(pause)
        if after_write is not None:
            after_write()

    monkeypatch.setattr(torch_format, "write_all", slow_write)
    monkeypatch.setattr(safetensors_writer, "write_all", slow_write)


def _io_error(fd: int) -> None:
    raise OSError(errno.EIO, "Input/output error")


def _no_write_behind_left() -> bool:
    return not [t for t in threading.enumerate() if t.name == "optckpt-write-behind"]


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_large_writes_are_written_back_while_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    # The write-behind thread flushes each time another WRITE_BEHIND_BYTES have been written,
    # before the file is complete; the file is still the same bytes.
    sizes: list[int] = []
    real = os.fdatasync

    def recording(fd: int) -> None:
        sizes.append(os.fstat(fd).st_size)
        real(fd)

    _write_behind(monkeypatch, recording, every=1 << 16, pause=0.02)
    monkeypatch.setattr(safetensors_writer, "_SLICE", 1 << 16)
    tree = {"w": torch.randn(200_000)}  # 800 KB, written in 64 KiB slices
    out = tmp_path / f"out.{fmt}"
    save_checkpoint(tree, out, fmt)
    assert sizes and min(sizes) < out.stat().st_size  # flushed before the end
    loaded = torch.load(out, weights_only=True) if fmt == "pt" else read_safetensors(out)
    assert torch.equal(loaded["w"], tree["w"])
    assert _no_write_behind_left()


def test_a_failed_write_behind_is_an_unwritable_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The kernel reports a write-back error once per descriptor: the background flush that got
    # it must raise it, or the final fsync could pass over lost data.
    _write_behind(monkeypatch, _io_error)
    out = tmp_path / "out.safetensors"
    with pytest.raises(UnwritableOutputError, match="Input/output error"):
        save_checkpoint({"w": torch.randn(10)}, out, "safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "code", [errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS], ids=["EINVAL", "EOPNOTSUPP", "ENOSYS"]
)
def test_a_file_system_that_cannot_flush_behind_still_gets_the_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    # fdatasync's EINVAL (a file system without it) ends the write-behind, not the write:
    # whether the file is durable is the final fsync's to say
    calls: list[int] = []

    def unsupported(fd: int) -> None:
        calls.append(fd)
        raise OSError(code, os.strerror(code))

    _write_behind(monkeypatch, unsupported)
    tree = {"w": torch.randn(10)}
    out = tmp_path / "out.safetensors"
    save_checkpoint(tree, out, "safetensors")
    assert len(calls) == 1  # tried once, then stopped
    assert torch.equal(read_safetensors(out)["w"], tree["w"])
    assert _no_write_behind_left()


@pytest.mark.parametrize("error", [KeyboardInterrupt, ValueError])
def test_an_error_while_a_write_behind_failed_is_that_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: type[BaseException]
) -> None:
    # Ctrl-C (or any error) in the writer after a background flush failed: the file is
    # abandoned, and what is reported is the error in flight (exit 130 for Ctrl-C), not EIO
    calls: list[int] = []

    def fail_second() -> None:
        calls.append(1)
        if len(calls) > 1:
            raise error

    _write_behind(monkeypatch, _io_error, after_write=fail_second)
    with pytest.raises(error):
        save_checkpoint({"w": torch.randn(10)}, tmp_path / "out.safetensors", "safetensors")
    assert len(calls) > 1 and list(tmp_path.iterdir()) == []
    assert _no_write_behind_left()


def test_an_existing_target_survives_a_failed_write(tmp_path: Path) -> None:
    out = tmp_path / "out.pt"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_output(out) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("boom")
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.pt"]


# the streaming torch writer (optckpt.io.torch_format) --------------------------------------


def _mixed_tree() -> dict[str, object]:
    torch.manual_seed(0)
    base = torch.randn(4, 6)
    state = {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 6)}
    return {
        "model": {
            "w": base,
            "w_view": base[1:3, ::2],
            "w_t": base.t(),
            "p": torch.nn.Parameter(torch.ones(2)),
        },
        "optimizer": {
            "state": {0: state, 1: {"step": 7, "exp_avg": state["exp_avg"]}},
            "param_groups": [{"params": [0, 1], "lr": 1e-3, "betas": (0.9, 0.999)}],
        },
        "big": torch.randn(100_000),  # large enough to be copied in the kernel
        "bf16": torch.randn(3).bfloat16(),
        "fp16": torch.randn(2, 2).half(),
        "ints": torch.arange(5),
        "flags": torch.tensor([True, False]),
        "u16": torch.tensor([1, 2], dtype=torch.uint16),
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "complex": torch.randn(2, dtype=torch.complex64),
        "epoch": 4,
        "name": "run",
        "none": None,
    }


def _torch_save_bytes(tree: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(tree, buffer)
    return buffer.getvalue()


def _assert_same_tree(a: object, b: object, layout: bool = True) -> None:
    """Equal trees, tensors bitwise; with ``layout``, also their strides and offsets (not
    kept by safetensors, which stores every tensor contiguous, as a plain Tensor)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and (type(a) is type(b) or not layout)
        assert (a.dtype, a.shape) == (b.dtype, b.shape)
        if layout:
            assert (a.stride(), a.storage_offset()) == (b.stride(), b.storage_offset())
        if a.numel():
            bytes_a, bytes_b = (t.contiguous().view(-1).view(torch.uint8) for t in (a, b))
            assert torch.equal(bytes_a, bytes_b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for k in a:
            _assert_same_tree(a[k], b[k], layout)
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same_tree(x, y, layout)
    else:
        assert a == b


def test_pt_output_is_byte_for_byte_torch_save(tmp_path: Path) -> None:
    tree = _mixed_tree()
    out = tmp_path / "out.pt"
    save_checkpoint(tree, out, "pt")
    assert out.read_bytes() == _torch_save_bytes(tree)
    loaded = torch.load(out, weights_only=True)
    _assert_same_tree(loaded, torch.load(io.BytesIO(_torch_save_bytes(tree)), weights_only=True))
    # storage sharing survives: the view, the transpose and the reused exp_avg
    m = loaded["model"]
    assert m["w_view"].untyped_storage().data_ptr() == m["w"].untyped_storage().data_ptr()
    assert m["w_t"].untyped_storage().data_ptr() == m["w"].untyped_storage().data_ptr()
    state = loaded["optimizer"]["state"]
    assert state[0]["exp_avg"] is state[1]["exp_avg"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64, torch.float32])
def test_deferred_cast_is_written_as_the_cast_tensor(tmp_path: Path, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    other = torch.float64 if dtype == torch.float32 else torch.float32
    source = torch.randn(6, 5, dtype=other)
    transposed = torch.randn(5, 6, dtype=other).t()  # non-contiguous: .to() keeps its strides
    sliced = torch.randn(10, dtype=other)[::3]  # not dense: .to() makes it contiguous
    lazy = {
        "a": torch_format.Deferred(source, dtype),
        "t": torch_format.Deferred(transposed, dtype),
        "s": torch_format.Deferred(sliced, dtype),
        "scalar": torch_format.Deferred(torch.tensor(1.5, dtype=other), dtype),
        "kept": source,
    }
    lazy["again"] = lazy["a"]  # the same cast twice is one storage, as for a tensor
    eager = {
        k: v.materialize() if isinstance(v, torch_format.Deferred) else v for k, v in lazy.items()
    }
    eager["again"] = eager["a"]
    out = tmp_path / "out.pt"
    save_checkpoint(lazy, out, "pt")
    assert out.read_bytes() == _torch_save_bytes(eager)
    loaded = torch.load(out, weights_only=True)
    assert loaded["a"].dtype == dtype and loaded["again"] is loaded["a"]
    assert loaded["t"].stride() == transposed.to(dtype).stride()
    assert torch.equal(loaded["s"], sliced.to(dtype))


def test_deferred_refuses_what_it_cannot_reproduce() -> None:
    assert not torch_format.can_defer(torch.arange(3), torch.float16)  # integer source
    assert not torch_format.can_defer(torch.randn(3), torch.float32)  # no cast
    assert not torch_format.can_defer(torch.nn.Parameter(torch.randn(3)), torch.float16)
    assert not torch_format.can_defer(torch.randn(3), torch.int32)
    with pytest.raises(ValueError):
        torch_format.Deferred(torch.arange(3), torch.float16)


def test_deferred_pickled_elsewhere_becomes_its_tensor() -> None:
    source = torch.randn(3)
    loaded = torch.load(
        io.BytesIO(_torch_save_bytes({"d": torch_format.Deferred(source, torch.float16)})),
        weights_only=True,
    )
    assert torch.equal(loaded["d"], source.half())


def _mapped(tmp_path: Path) -> tuple[Path, object]:
    src = tmp_path / "in" / "src.pt"
    src.parent.mkdir()
    torch.save(_mixed_tree(), src)
    return src, torch.load(src, weights_only=True, mmap=True)


def _count_kernel_copies(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    copied: list[int] = []
    real = os.copy_file_range

    def counting(src: int, dst: int, count: int, offset_src: int | None = None) -> int:
        n = real(src, dst, count, offset_src)
        copied.append(n)
        return n

    monkeypatch.setattr(os, "copy_file_range", counting)
    return copied


@pytest.mark.skipif(not hasattr(os, "copy_file_range"), reason="needs os.copy_file_range")
def test_mapped_storages_are_copied_in_the_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, tree = _mapped(tmp_path)
    copied = _count_kernel_copies(monkeypatch)
    out = tmp_path / "out.pt"
    save_checkpoint(tree, out, "pt", sources=[src])
    assert sum(copied) > 0
    assert out.read_bytes() == _torch_save_bytes(tree)
    copied.clear()
    st = tmp_path / "out.safetensors"
    save_checkpoint(tree, st, "safetensors", sources=[src])
    assert sum(copied) > 0
    _assert_same_tree(read_safetensors(st), torch.load(src, weights_only=True), layout=False)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
@pytest.mark.parametrize("errno_", [errno.EXDEV, errno.ENOSYS])
def test_without_a_kernel_copy_the_bytes_are_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, errno_: int
) -> None:
    src, tree = _mapped(tmp_path)

    def unsupported(*args: object) -> int:
        raise OSError(errno_, os.strerror(errno_))

    monkeypatch.setattr(os, "copy_file_range", unsupported)
    out = tmp_path / f"out.{fmt}"
    save_checkpoint(tree, out, fmt, sources=[src])
    if fmt == "pt":
        assert out.read_bytes() == _torch_save_bytes(tree)
    else:
        _assert_same_tree(read_safetensors(out), torch.load(src, weights_only=True), layout=False)


def test_a_mapped_input_replaced_on_disk_is_not_copied_from(tmp_path: Path) -> None:
    src, tree = _mapped(tmp_path)
    expected = _torch_save_bytes(tree)
    replacement = src.with_name("new.pt")
    torch.save({"other": torch.zeros(100)}, replacement)
    os.replace(replacement, src)  # same path, another file: the mapping shows the old one
    out = tmp_path / "out.pt"
    save_checkpoint(tree, out, "pt", sources=[src])
    assert out.read_bytes() == expected


def test_deferred_casts_in_safetensors(tmp_path: Path) -> None:
    source = torch.randn(4, 3).t()
    out = tmp_path / "out.safetensors"
    save_checkpoint({"d": torch_format.Deferred(source, torch.bfloat16)}, out, "safetensors")
    assert torch.equal(read_safetensors(out)["d"], source.bfloat16())


def test_an_error_while_casting_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[int] = []
    real = torch_format.Deferred.materialize

    def failing(self: torch_format.Deferred) -> torch.Tensor:
        made.append(1)
        if len(made) > 1:
            raise MemoryError("out of memory")
        return real(self)

    monkeypatch.setattr(torch_format.Deferred, "materialize", failing)
    tree = {f"d{i}": torch_format.Deferred(torch.randn(100), torch.float16) for i in range(3)}
    with pytest.raises((MemoryError, RuntimeError)):
        save_checkpoint(tree, tmp_path / "out.pt", "pt")
    assert len(made) == 2
    assert list(tmp_path.iterdir()) == []


def test_write_behind_uses_fsync_where_there_is_no_fdatasync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # some platforms' Pythons (macOS) have no os.fdatasync: the flush falls back to fsync
    flushed: list[int] = []
    real = os.fsync

    def recording(fd: int) -> None:
        flushed.append(fd)
        real(fd)

    _write_behind(monkeypatch, _io_error)  # the slow writes; fdatasync then taken away
    monkeypatch.delattr(os, "fdatasync")
    monkeypatch.setattr(os, "fsync", recording)
    out = tmp_path / "out.safetensors"
    tree = {"w": torch.randn(10)}
    save_checkpoint(tree, out, "safetensors")
    assert len(flushed) >= 2  # the write-behind's, then the final one
    assert torch.equal(read_safetensors(out)["w"], tree["w"])


def test_the_c_library_is_found_without_running_ldconfig(monkeypatch: pytest.MonkeyPatch) -> None:
    """madvise and malloc_trim come from the symbols the interpreter already has:
    ctypes.util.find_library runs ldconfig, a process per command (Linux, glibc)."""
    import ctypes.util
    import sys

    from optckpt.io import pages

    if not sys.platform.startswith("linux"):
        pytest.skip("the C library's own symbols: glibc on Linux")

    def no_ldconfig(name: str) -> None:
        raise AssertionError("find_library runs ldconfig")

    monkeypatch.setattr(ctypes.util, "find_library", no_ldconfig)
    for cached in (pages._libc_function, pages._madvise, pages._malloc_trim):
        cached.cache_clear()
    try:
        assert pages._madvise() is not None and pages._malloc_trim() is not None
    finally:
        for cached in (pages._libc_function, pages._madvise, pages._malloc_trim):
            cached.cache_clear()
