"""Hostile safetensors files: every header field and every optckpt tree tag (issue 11).

Each hostile file is generated here from a header dict (or raw header bytes), never committed,
and goes through the reading commands: ``inspect``, ``inspect --stats``, ``diff F F`` and
``convert F -o OUT.pt``. Each must exit 3 with one ``error:`` line that names the file (and the
tensor, where the header names one), leave nothing at ``-o`` and the input as it was. Most run
through :class:`typer.testing.CliRunner`; a few through ``python -m optckpt`` in a subprocess,
the way CI calls it. Valid edge cases (empty and zero-dim tensors, files written by the
``safetensors`` package, optckpt's own fixture) must still read, and read as ``safe_open``
reads them.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from checks import assert_one_line_error
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import optckpt.io.safetensors_format as fmt
import optckpt.io.safetensors_format.header as fmt_header
import optckpt.io.safetensors_format.reader as fmt_reader
from optckpt.cli.app import app
from optckpt.errors import UnreadableCheckpointError
from optckpt.io import load_checkpoint
from optckpt.io.safetensors_format import (
    DEVICES_KEY,
    TREE_KEY,
    read_header,
    read_safetensors,
    write_safetensors,
)

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "fixtures"
runner = CliRunner()


# --- building files ------------------------------------------------------------------------


def st_file(path: Path, header: Any, data: bytes = b"", *, raw: bytes | None = None) -> Path:
    """Write ``8-byte length + header + data``; the header is ``header`` as JSON or ``raw``."""
    blob = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def with_length(path: Path, length: int) -> Path:
    """A file whose 8-byte length says ``length`` in front of an 8-byte header."""
    path.write_bytes(struct.pack("<Q", length) + b"{}" + b" " * 6)
    return path


def entry(dtype: Any = "F32", shape: Any = (2,), offsets: Any = (0, 8)) -> dict[str, Any]:
    """One header entry (tuples become lists; anything else is written as given)."""
    return {
        "dtype": dtype,
        "shape": list(shape) if isinstance(shape, tuple) else shape,
        "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets,
    }


def optimizer_state() -> dict[str, Any]:
    """A real AdamW state dict after one step: 0-dim ``step``s and an empty parameter's state."""
    params = [torch.nn.Parameter(torch.ones(3, 2)), torch.nn.Parameter(torch.empty(0))]
    opt = torch.optim.AdamW(params, lr=0.01)
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    opt.step()
    return opt.state_dict()


def optimizer_file(
    path: Path,
    *,
    hyperparam: Any = None,
    tree: str | None = None,
    devices: str | None = None,
) -> Path:
    """optckpt's own file of :func:`optimizer_state`, its metadata then edited.

    ``hyperparam``: a JSON node put into group 0 as the hyperparameter ``hostile``; ``tree``
    and ``devices``: the text of ``optckpt.tree`` / ``optckpt.devices``. The data section is
    kept, the header padded to 8 bytes as the writer pads it.
    """
    write_safetensors(optimizer_state(), path)
    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + length])
    if hyperparam is not None:
        decoded = json.loads(header["__metadata__"][TREE_KEY])
        decoded["param_groups"][0]["hostile"] = hyperparam
        header["__metadata__"][TREE_KEY] = json.dumps(decoded)
    if tree is not None:
        header["__metadata__"][TREE_KEY] = tree
    if devices is not None:
        header["__metadata__"][DEVICES_KEY] = devices
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return st_file(path, None, blob[8 + length :], raw=raw)


# --- the hostile corpus --------------------------------------------------------------------


@dataclass
class Hostile:
    """One hostile file.

    Attributes:
        id: the test id.
        build: writes the file into the folder given and returns it.
        needles: what the one error line must say besides the file's name.
        reference_refuses: whether ``safetensors.safe_open`` refuses it too; False where the
            file is a valid safetensors file (optckpt's own metadata is what is wrong) or
            where optckpt is stricter on purpose (see ``STRICTER``).
    """

    id: str
    build: Callable[[Path], Path]
    needles: tuple[str, ...]
    reference_refuses: bool


HOSTILE: list[Hostile] = []
# Valid to safetensors, refused by optckpt: torch cannot make the tensor (sizes and strides
# are int64), a 100 MB header of one-sized dimensions would cost gigabytes, and a key given
# twice is read as the last one by both parsers but is never written by any writer.
STRICTER = {"shape-zero-times-huge", "shape-65-dims", "duplicate-identical-entry"}


def header_case(
    id: str, header: Any, data: bytes = b"\0" * 8, *needles: str, raw: bytes | None = None
) -> None:
    HOSTILE.append(
        Hostile(
            id,
            lambda d: st_file(d / f"{id}.safetensors", header, data, raw=raw),
            needles,
            id not in STRICTER,
        )
    )


def tree_case(id: str, *needles: str, **edits: Any) -> None:
    HOSTILE.append(
        Hostile(
            f"tree-{id}",
            lambda d: optimizer_file(d / f"{id}.safetensors", **edits),
            ("corrupt optckpt metadata", *needles),
            False,
        )
    )


# shapes
header_case("shape-negative", {"t": entry(shape=(-2,))}, b"\0" * 8, "tensor 't'", "shape [-2]")
header_case("shape-float", {"t": entry(shape=(2.0,))}, b"\0" * 8, "tensor 't'", "shape [2.0]")
header_case("shape-bool", {"t": entry(shape=(True, 2))}, b"\0" * 8, "tensor 't'", "shape")
header_case("shape-string-dim", {"t": entry(shape=("2",))}, b"\0" * 8, "tensor 't'", "shape")
header_case("shape-nested", {"t": entry(shape=([2],))}, b"\0" * 8, "tensor 't'", "shape")
header_case("shape-a-string", {"t": entry(shape="2")}, b"\0" * 8, "tensor 't'", "shape")
header_case("shape-null", {"t": entry(shape=None)}, b"\0" * 8, "tensor 't'", "shape")
header_case("shape-2-to-the-64", {"t": entry(shape=(2**64,))}, b"\0" * 8, "tensor 't'", "shape")
header_case(
    "shape-product-overflow",
    {"t": entry(shape=(2**32, 2**32, 2**32), offsets=(0, 8))},
    b"\0" * 8,
    "tensor 't'",
    "too large",
)
header_case(
    "shape-zero-times-huge",
    {"t": entry(shape=(0, 2**62, 4), offsets=(0, 0))},
    b"",
    "tensor 't'",
    "too large",
)
header_case(
    "shape-65-dims", {"t": entry(shape=(1,) * 64 + (2,))}, b"\0" * 8, "tensor 't'", "65 dimensions"
)
header_case(
    "shape-huge-int-literal",
    None,
    b"\0" * 8,
    "corrupt safetensors header",
    raw=b'{"t":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,8]}}',
)
header_case(
    "shape-nan-literal",
    None,
    b"\0" * 8,
    "tensor 't'",
    "shape [nan]",
    raw=b'{"t":{"dtype":"F32","shape":[NaN],"data_offsets":[0,8]}}',
)
# offsets
header_case(
    "offsets-float", {"t": entry(offsets=(0, 8.0))}, b"\0" * 8, "tensor 't'", "data_offsets"
)
header_case(
    "offsets-bool", {"t": entry(offsets=(False, 8))}, b"\0" * 8, "tensor 't'", "data_offsets"
)
header_case(
    "offsets-strings", {"t": entry(offsets=("0", "8"))}, b"\0" * 8, "tensor 't'", "data_offsets"
)
header_case(
    "offsets-nested", {"t": entry(offsets=([0], [8]))}, b"\0" * 8, "tensor 't'", "data_offsets"
)
header_case(
    "offsets-three", {"t": entry(offsets=(0, 4, 8))}, b"\0" * 8, "tensor 't'", "data_offsets"
)
header_case("offsets-one", {"t": entry(offsets=(8,))}, b"\0" * 8, "tensor 't'", "data_offsets")
header_case(
    "offsets-an-object", {"t": entry(offsets={"0": 8})}, b"\0" * 8, "tensor 't'", "data_offsets"
)
header_case(
    "offsets-reversed", {"t": entry(offsets=(8, 0))}, b"\0" * 8, "tensor 't'", "before they begin"
)
# the old reader took these 8 bytes from the end of the header itself
header_case(
    "offsets-negative-begin", {"t": entry(offsets=(-8, 0))}, b"", "tensor 't'", "data_offsets"
)
header_case(
    "offsets-2-to-the-64",
    {"t": entry(offsets=(2**64, 2**64 + 8))},
    b"\0" * 8,
    "tensor 't'",
    "data_offsets",
)
header_case(
    "offsets-past-the-data", {"t": entry(offsets=(8, 16))}, b"\0" * 8, "tensor 't'", "truncated"
)
header_case(
    "size-not-shape-times-dtype",
    {"t": entry(shape=(3,), offsets=(0, 8))},
    b"\0" * 8,
    "tensor 't'",
    "8 bytes",
)
header_case(
    "overlapping",
    {"a": entry(offsets=(0, 8)), "b": entry(offsets=(4, 12))},
    b"\0" * 12,
    "tensor 'b' at bytes 4..12 overlaps tensor 'a', which ends at byte 8",
)
header_case(
    "same-bytes-twice",
    {"a": entry(offsets=(0, 8)), "b": entry(offsets=(0, 8))},
    b"\0" * 8,
    "tensor 'b'",
    "overlaps",
)
header_case(
    "gap-before-first",
    {"t": entry(offsets=(8, 16))},
    b"\0" * 16,
    "tensor 't'",
    "bytes 0..8 of the data to no tensor",
)
header_case(
    "gap-between",
    {"a": entry(offsets=(0, 8)), "b": entry(offsets=(12, 20))},
    b"\0" * 20,
    "tensor 'b'",
    "bytes 8..12 of the data to no tensor",
)
header_case("bytes-after-last", {"t": entry()}, b"\0" * 12, "4 bytes after the last tensor")
# dtypes and entries
header_case("dtype-unknown", {"t": entry(dtype="F128")}, b"\0" * 8, "tensor 't'", "dtype 'F128'")
header_case("dtype-lowercase", {"t": entry(dtype="f32")}, b"\0" * 8, "tensor 't'", "dtype")
header_case("dtype-a-number", {"t": entry(dtype=4)}, b"\0" * 8, "tensor 't'", "dtype 4")
header_case(
    "dtype-missing", {"t": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "'t'", "no dtype"
)
header_case("entry-a-list", {"t": [1, 2]}, b"\0" * 8, "tensor 't'", "is a list")
header_case("entry-a-string", {"t": "F32"}, b"\0" * 8, "tensor 't'", "is a string")
header_case(
    "entry-name-escapes",
    {"\x1b[31mred\n": entry(shape=(-1,))},
    b"\0" * 8,
    "tensor '\\x1b[31mred\\n'",
)
# metadata
header_case("metadata-a-list", {"__metadata__": ["x"], "t": entry()}, b"\0" * 8, "__metadata__")
header_case("metadata-a-string", {"__metadata__": "x", "t": entry()}, b"\0" * 8, "__metadata__")
header_case(
    "metadata-int-value",
    {"__metadata__": {"format": 1}, "t": entry()},
    b"\0" * 8,
    "__metadata__ 'format'",
)
header_case(
    "metadata-nested-value",
    {"__metadata__": {"optckpt.tree": {"__tensor__": "t"}}, "t": entry()},
    b"\0" * 8,
    "__metadata__ 'optckpt.tree'",
)
# the JSON itself
header_case(
    "duplicate-entry",
    None,
    b"\0" * 16,
    "'t' appears twice",
    raw=b'{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
    b'"t":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}',
)
header_case(
    "duplicate-identical-entry",
    None,
    b"\0" * 8,
    "'t' appears twice",
    raw=b'{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
    b'"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
)
header_case(
    "deep-nesting",
    None,
    b"",
    "nested too deeply",
    raw=b'{"t":' + b"[" * 200_000 + b"]" * 200_000 + b"}",
)
header_case("deep-nesting-unclosed", None, b"", "corrupt", raw=b'{"t":' + b"[" * 200_000)
header_case("not-utf8", None, b"", "not UTF-8", raw=b'{"\xff\xfe": 1}')
header_case("not-json", None, b"", "corrupt safetensors header", raw=b"{not json}")
header_case("trailing-garbage", None, b"\0" * 8, "corrupt", raw=b'{"t": 1} }')
HOSTILE.append(
    Hostile(
        "length-past-the-end",
        lambda d: with_length(d / "length-past-the-end.safetensors", 4096),
        ("truncated",),
        True,
    )
)
header_case("top-level-list", None, b"", "not a checkpoint", raw=b"[1, 2]")

# optckpt's tree tags
tree_case("dtype-load", "__dtype__ 'load'", hyperparam={"__dtype__": "load"})
tree_case("dtype-tensor-class", "__dtype__ 'Tensor'", hyperparam={"__dtype__": "Tensor"})
tree_case("dtype-a-number", "__dtype__ 5", hyperparam={"__dtype__": 5})
tree_case("dtype-a-list", "__dtype__", hyperparam={"__dtype__": ["float32"]})
tree_case("device-unknown-type", "__device__ 'evil:7'", hyperparam={"__device__": "evil:7"})
tree_case("device-negative-index", "__device__ 'cuda:-1'", hyperparam={"__device__": "cuda:-1"})
tree_case("device-legacy-backend", "__device__ 'mkldnn'", hyperparam={"__device__": "mkldnn"})
tree_case("device-a-number", "__device__ 0", hyperparam={"__device__": 0})
tree_case("float-word", "__float__ 'load'", hyperparam={"__float__": "load"})
tree_case("float-not-a-repr", "__float__ 'infinity'", hyperparam={"__float__": "infinity"})
tree_case("float-overflowing", "__float__ '1e999'", hyperparam={"__float__": "1e999"})
tree_case("float-a-number", "__float__ 1.5", hyperparam={"__float__": 1.5})
tree_case("tensor-missing", "__tensor__ 'nope'", hyperparam={"__tensor__": "nope"})
tree_case("tensor-not-a-name", "__tensor__ ['x']", hyperparam={"__tensor__": ["x"]})
tree_case("dict-not-pairs", "__dict__", hyperparam={"__dict__": [[1]]})
tree_case("dict-an-object", "__dict__", hyperparam={"__dict__": {"a": 1}})
tree_case("dict-list-key", "hashable", hyperparam={"__dict__": [[[1], 2]]})
tree_case("dict-dict-key", "hashable", hyperparam={"__dict__": [[{"a": 1}, 2]]})
tree_case("tuple-a-string", "__tuple__", hyperparam={"__tuple__": "ab"})
tree_case("odict-not-a-pair", "__odict__ is not a list", hyperparam={"__odict__": [{}]})
tree_case("odict-items-a-list", "two mappings", hyperparam={"__odict__": [[1], {}]})
tree_case(
    "odict-dunder-attribute",
    "attribute name",
    hyperparam={"__odict__": [{}, {"__dict__": [["__class__", 1]]}]},
)
tree_case(
    "odict-number-attribute",
    "attribute name",
    hyperparam={"__odict__": [{}, {"__dict__": [[1, 2]]}]},
)
tree_case("unknown-tag", "unknown tag '__code__'", hyperparam={"__code__": "print(1)"})
tree_case("tag-among-keys", "unknown tag '__tensor__'", hyperparam={"__tensor__": "x", "a": 1})
tree_case("nested-past-the-bound", "nested more than", hyperparam=json.loads("[" * 150 + "]" * 150))
tree_case("nested-past-recursion", "nested too deeply", tree="[" * 100_000 + "]" * 100_000)
tree_case("not-json", "Expecting property name", tree="{not json")
tree_case("nan-literal", "NaN is not JSON", tree='{"state": {}, "param_groups": [NaN]}')
tree_case("huge-int-literal", "Exceeds the limit", tree="[" + "9" * 5000 + "]")
tree_case("devices-a-list", "optckpt.devices is a list", devices="[1]")
tree_case("devices-missing-tensor", "optckpt.devices names 'nope'", devices='{"nope": "cuda:0"}')
tree_case("devices-bad-device", "'load'", devices='{"state.0.exp_avg": "load"}')
tree_case("devices-meta", "'meta'", devices='{"state.0.exp_avg": "meta"}')
tree_case("devices-a-number", "the device 0", devices='{"state.0.exp_avg": 0}')
tree_case("devices-deep", "nested too deeply", devices="[" * 100_000 + "]" * 100_000)


def _run_all(path: Path, out: Path) -> dict[str, Any]:
    """The four reading commands on ``path`` through CliRunner."""
    commands = {
        "inspect": ["inspect", str(path)],
        "inspect --stats": ["inspect", "--stats", str(path)],
        "diff": ["diff", str(path), str(path)],
        "convert": ["convert", str(path), "-o", str(out)],
    }
    return {name: runner.invoke(app, args) for name, args in commands.items()}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_corpus_is_large_enough() -> None:
    assert len(HOSTILE) >= 30
    assert len({h.id for h in HOSTILE}) == len(HOSTILE)


@pytest.mark.parametrize("hostile", HOSTILE, ids=[h.id for h in HOSTILE])
def test_every_reading_command_refuses_with_exit_3(tmp_path: Path, hostile: Hostile) -> None:
    path = hostile.build(tmp_path)
    before, listing = _digest(path), sorted(os.listdir(tmp_path))
    out = tmp_path / "out.pt"
    for command, result in _run_all(path, out).items():
        assert result.exit_code == 3, (command, result.output, result.exception)
        assert_one_line_error(result.stderr, path.name, *hostile.needles)
        assert not result.stdout, (command, result.stdout)
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == listing, "no temporary file left behind"
    assert _digest(path) == before


@pytest.mark.parametrize("hostile", HOSTILE, ids=[h.id for h in HOSTILE])
def test_the_library_raises_one_unreadable_error(tmp_path: Path, hostile: Hostile) -> None:
    path = hostile.build(tmp_path)
    with pytest.raises(UnreadableCheckpointError) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("hostile", [h for h in HOSTILE if h.reference_refuses], ids=lambda h: h.id)
def test_safetensors_itself_refuses_the_same_headers(tmp_path: Path, hostile: Hostile) -> None:
    """Our rules are safetensors' rules: what we refuse in the header, safe_open refuses too."""
    path = hostile.build(tmp_path)
    with pytest.raises(SafetensorError), safe_open(str(path), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            f.get_tensor(name)


@pytest.mark.parametrize(
    "hostile", [h for h in HOSTILE if not h.reference_refuses], ids=lambda h: h.id
)
def test_where_optckpt_is_stricter_the_file_is_valid_safetensors(
    tmp_path: Path, hostile: Hostile
) -> None:
    """Valid safetensors files that optckpt refuses: its own metadata is wrong, or optckpt is
    stricter on purpose (``STRICTER``). safe_open reads them, so the refusal is optckpt's."""
    path = hostile.build(tmp_path)
    with safe_open(str(path), framework="pt") as f:
        assert isinstance(list(f.keys()), list)


def test_a_hostile_dtype_tag_never_reaches_the_output(tmp_path: Path) -> None:
    """``{"__dtype__": "load"}`` used to decode to torch.load and be written to the output."""
    path = optimizer_file(tmp_path / "x.safetensors", hyperparam={"__dtype__": "load"})
    with pytest.raises(UnreadableCheckpointError, match=r"__dtype__ 'load' is not a torch dtype"):
        read_safetensors(path)


def test_a_negative_begin_is_refused_before_any_tensor_is_made(tmp_path: Path) -> None:
    path = st_file(tmp_path / "x.safetensors", {"t": entry(offsets=(-8, 0))})
    with pytest.raises(UnreadableCheckpointError, match=r"tensor 't' has data_offsets \[-8, 0\]"):
        read_header(path)


def test_saved_devices_are_untouched_when_the_tree_is_refused(tmp_path: Path) -> None:
    path = optimizer_file(
        tmp_path / "x.safetensors",
        hyperparam={"__dtype__": "load"},
        devices='{"state.0.exp_avg": "cuda:0"}',
    )
    placement: dict[tuple[object, ...], str] = {}
    with pytest.raises(UnreadableCheckpointError):
        read_safetensors(path, placement)
    assert placement == {}


# --- subprocess: the real entry point ------------------------------------------------------

# one file per command, a handful in all: each run pays for importing torch
SUBPROCESS_CASES = {
    "offsets-negative-begin": "convert",
    "tree-dtype-load": "convert",
    "deep-nesting": "inspect --stats",
    "metadata-a-list": "diff",
}


def test_python_m_optckpt_refuses_hostile_files(tmp_path: Path) -> None:
    """The way CI calls it, the runs in parallel: exit 3, one line, nothing written."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OPTCKPT_DEBUG", None)
    runs = []
    for hostile in (h for h in HOSTILE if h.id in SUBPROCESS_CASES):
        folder = tmp_path / hostile.id
        folder.mkdir()
        path = hostile.build(folder)
        out = folder / "out.pt"
        args = {
            "convert": ["convert", str(path), "-o", str(out)],
            "inspect --stats": ["inspect", "--stats", str(path)],
            "diff": ["diff", str(path), str(path)],
        }[SUBPROCESS_CASES[hostile.id]]
        process = subprocess.Popen(
            [sys.executable, "-m", "optckpt", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=folder,
        )
        runs.append((hostile, path, _digest(path), out, args, process))
    assert len(runs) == len(SUBPROCESS_CASES)
    for hostile, path, before, out, args, process in runs:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 3, (hostile.id, args, stderr)
        assert_one_line_error(stderr, path.name, *hostile.needles)
        assert stdout == ""
        assert not out.exists()
        assert _digest(path) == before
        assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


# --- valid edge cases ----------------------------------------------------------------------


def _same_as_safe_open(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(tensors)
        for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            theirs = f.get_tensor(name)
            assert tensors[name].dtype == theirs.dtype
            assert tensors[name].shape == theirs.shape
            assert torch.equal(tensors[name], theirs)


def test_optckpt_file_with_empty_and_zero_dim_tensors_reads_and_converts(tmp_path: Path) -> None:
    state = optimizer_state()
    path = optimizer_file(tmp_path / "ok.safetensors")
    back = read_safetensors(path)
    assert back["state"][1]["exp_avg"].shape == (0,)
    assert back["state"][0]["step"].dim() == 0
    assert back["param_groups"][0]["betas"] == state["param_groups"][0]["betas"]
    inspected = runner.invoke(app, ["inspect", str(path)])
    assert inspected.exit_code == 0, inspected.stderr
    out = tmp_path / "out.pt"
    converted = runner.invoke(app, ["convert", str(path), "-o", str(out)])
    assert converted.exit_code == 0, converted.stderr
    again = torch.load(out, weights_only=True)
    for pid in (0, 1):
        for key, value in state["state"][pid].items():
            assert torch.equal(again["state"][pid][key], value)


def test_every_tag_the_writer_writes_reads_back(tmp_path: Path) -> None:
    tree = {
        "dtypes": [torch.bfloat16, torch.float8_e4m3fn, torch.int64, torch.complex64],
        "devices": [torch.device("cuda:1"), torch.device("cpu"), torch.device("meta")],
        "floats": [float("nan"), float("inf"), float("-inf"), 0.1, -0.0],
        "tuple": (1, (2, "x")),
        "int_keys": {0: "a", (1, 2): "b", "__x": "c"},
        "t": torch.arange(3.0),
        "deep": json.loads("[" * 90 + "]" * 90),
    }
    path = tmp_path / "tags.safetensors"
    write_safetensors(tree, path)
    back = read_safetensors(path)
    assert back["dtypes"] == tree["dtypes"]
    assert back["devices"] == tree["devices"]
    assert str(back["floats"][0]) == "nan" and back["floats"][1:] == tree["floats"][1:]
    assert back["tuple"] == tree["tuple"] and back["int_keys"] == tree["int_keys"]
    assert back["deep"] == tree["deep"]


def test_a_file_written_by_safetensors_itself_reads_as_safe_open_reads_it(tmp_path: Path) -> None:
    tensors = {
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(2.5),
        "bf16": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3),
        "i64": torch.tensor([2**62, -1]),
        "flags": torch.tensor([True, False]),
        "u8": torch.arange(5, dtype=torch.uint8),
        "also_empty": torch.empty(4, 0, dtype=torch.int32),
    }
    path = tmp_path / "plain.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    back = read_safetensors(path)
    _same_as_safe_open(path, back)
    for name, value in load_file(str(path)).items():
        assert torch.equal(back[name], value)


def test_the_fixture_reads_and_agrees_with_safe_open() -> None:
    path = FIXTURES / "adamw_train.safetensors"
    _, metadata, _ = read_header(path)
    assert TREE_KEY in metadata
    tensors, _ = fmt.load_tensors(path)
    _same_as_safe_open(path, tensors)
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 0, result.stderr


VALID_HEADERS: dict[str, tuple[Any, bytes]] = {
    "no-tensors": ({}, b""),
    "metadata-only": ({"__metadata__": {"a": "b"}}, b""),
    "metadata-null": ({"__metadata__": None, "t": entry()}, b"\0" * 8),
    "entries-out-of-offset-order": (
        {"b": entry(offsets=(8, 16)), "a": entry(offsets=(0, 8))},
        bytes(range(16)),
    ),
    "empty-tensors-sharing-offsets": (
        {
            "e0": entry(shape=(0,), offsets=(0, 0)),
            "t": entry(),
            "e1": entry(shape=(2, 0), offsets=(8, 8)),
            "e2": entry(shape=(0, 5), offsets=(8, 8)),
        },
        b"\0" * 8,
    ),
    "zero-dim": ({"s": entry(shape=(), offsets=(0, 4))}, b"\0\0\x80\x3f"),
    "empty-but-large-shape": ({"e": entry(shape=(0, 2**62, 1), offsets=(0, 0))}, b""),
    "unknown-entry-field": ({"t": {**entry(), "note": [1, {"x": 2}]}}, b"\0" * 8),
    "padded-header": (None, b"\0" * 8),
}


@pytest.mark.parametrize("case", VALID_HEADERS, ids=list(VALID_HEADERS))
def test_valid_edge_cases_read_as_safe_open_reads_them(tmp_path: Path, case: str) -> None:
    header, data = VALID_HEADERS[case]
    raw = None
    if header is None:  # trailing spaces, as the writers pad the header to 8 bytes
        raw = json.dumps({"t": entry()}).encode() + b"        "
    path = st_file(tmp_path / "ok.safetensors", header, data, raw=raw)
    tensors = read_safetensors(path)
    _same_as_safe_open(path, tensors)
    if case == "zero-dim":
        assert tensors["s"].dim() == 0 and tensors["s"].item() == 1.0


# --- the cross-check against safe_open -----------------------------------------------------


class _FakeSafeOpen:
    def __init__(self, keys: list[str], metadata: dict[str, str] | None) -> None:
        self._keys, self._metadata = keys, metadata

    def __enter__(self) -> _FakeSafeOpen:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def keys(self) -> list[str]:
        return self._keys

    def metadata(self) -> dict[str, str] | None:
        return self._metadata


def _safe_open_raises(monkeypatch: pytest.MonkeyPatch, message: str) -> None:
    """Make the header check's ``safe_open`` refuse every file with ``message``."""

    def refusing(*args: Any, **kwargs: Any) -> Any:
        raise SafetensorError(message)

    monkeypatch.setattr(fmt_header, "safe_open", refusing)


def _plain(tmp_path: Path) -> Path:
    return st_file(tmp_path / "ok.safetensors", {"t": entry()}, b"\0" * 8)


def test_a_header_safetensors_refuses_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _safe_open_raises(
        monkeypatch, "Error while deserializing header: invalid offset for tensor `t`"
    )
    with pytest.raises(UnreadableCheckpointError, match="safetensors refuses the file"):
        read_header(_plain(tmp_path))


def test_a_header_safetensors_reads_otherwise_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fmt_header, "safe_open", lambda *a, **k: _FakeSafeOpen(["u"], None))
    with pytest.raises(UnreadableCheckpointError, match="safetensors reads other tensors"):
        read_header(_plain(tmp_path))
    monkeypatch.setattr(fmt_header, "safe_open", lambda *a, **k: _FakeSafeOpen(["t"], {"x": "y"}))
    with pytest.raises(UnreadableCheckpointError, match="other tensors or metadata"):
        read_header(_plain(tmp_path))


def test_an_older_safetensors_without_a_dtype_is_no_disagreement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _safe_open_raises(monkeypatch, "invalid JSON in header: unknown variant `C64`, expected one of")
    path = st_file(
        tmp_path / "c.safetensors", {"c": entry(dtype="C64", offsets=(0, 16))}, b"\0" * 16
    )
    assert read_safetensors(path)["c"].dtype == torch.complex64


def test_a_file_that_shrinks_after_its_header_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _plain(tmp_path)
    real = fmt.read_header

    def then_truncate(p: Path) -> Any:
        found = real(p)
        with p.open("r+b") as f:
            f.truncate(p.stat().st_size - 4)
        return found

    monkeypatch.setattr(fmt_reader, "read_header", then_truncate)
    with pytest.raises(UnreadableCheckpointError, match="changed size"):
        fmt.load_tensors(path)
