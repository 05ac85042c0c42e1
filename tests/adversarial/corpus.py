"""A generated corpus of hostile and broken inputs (issue 11), built fresh in each test run.

Every entry is a :class:`Case`: a builder that writes its input into an empty folder, and
the exit codes each command may give. Nothing here is a committed binary: pickles are
written opcode by opcode or with a pickler whose reductions name the globals under test,
torch zips with torch's own zip writer, safetensors files from a header dict.

Hostile code in the corpus never runs anything harmful if it did run: it creates the file
``CANARY`` in the case folder (or prints the Zen of Python), and the runner checks for both.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CANARY = "CANARY"
# Commands whose every run must refuse an unreadable input with exit 3.
UNREADABLE = {"*": {3}}


@dataclass
class Case:
    """One hostile input.

    Attributes:
        name: the test id.
        build: writes the input into the folder given and returns its path (file or folder).
        codes: per command name (``"*"`` for every other command), the exit codes allowed.
        commands: which commands to run (default: every checkpoint command).
    """

    name: str
    build: Callable[[Path], Path]
    codes: dict[str, set[int]] = field(default_factory=lambda: dict(UNREADABLE))
    commands: tuple[str, ...] = ()

    def allowed(self, command: str) -> set[int]:
        """The exit codes ``command`` may give for this input."""
        return self.codes.get(command, self.codes.get("*", {3}))


CASES: list[Case] = []


def case(name: str, codes: dict[str, set[int]] | None = None, commands: tuple[str, ...] = ()):
    """Register the decorated builder as a :class:`Case`."""

    def register(build: Callable[[Path], Path]) -> Callable[[Path], Path]:
        CASES.append(Case(name, build, codes or dict(UNREADABLE), commands))
        return build

    return register


# --- building blocks -----------------------------------------------------------------------

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001


def _adam_state() -> dict[str, Any]:
    """A real Adam state dict after one step, two parameters in one group."""
    params = [torch.nn.Parameter(torch.ones(3, 2)), torch.nn.Parameter(torch.ones(2))]
    opt = torch.optim.Adam(params)
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    opt.step()
    return opt.state_dict()


class _Rebuild:
    """Pickles as ``torch._utils._rebuild_tensor_v2(storage key, offset, size, stride)``."""

    def __init__(self, key: str, numel: int, offset: int, size: tuple, stride: tuple) -> None:
        self.key, self.numel, self.args = key, numel, (offset, size, stride)

    def __reduce__(self) -> Any:
        offset, size, stride = self.args
        storage = _StorageRef(self.key, self.numel)
        return (
            torch._utils._rebuild_tensor_v2,
            (storage, offset, size, stride, False, OrderedDict()),
        )


class _StorageRef:
    def __init__(self, key: str, numel: int) -> None:
        self.key, self.numel = key, numel


class _TorchPickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _StorageRef):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None


def _pickle(tree: Any) -> bytes:
    buffer = io.BytesIO()
    _TorchPickler(buffer, protocol=2).dump(tree)
    return buffer.getvalue()


def torch_zip(path: Path, data_pkl: bytes, storages: dict[str, bytes] | None = None) -> Path:
    """A torch zip file holding ``data_pkl`` and ``storages``, written by torch's zip writer."""
    writer = torch._C.PyTorchFileWriter(str(path))
    writer.write_record("data.pkl", data_pkl, len(data_pkl))
    writer.write_record(".format_version", "1", 1)
    writer.write_record("byteorder", sys.byteorder, len(sys.byteorder))
    for key, blob in (storages or {}).items():
        writer.write_record(f"data/{key}", blob, len(blob))
    writer.write_end_of_file()
    return path


def legacy_file(path: Path, main_pickle: bytes) -> Path:
    """A legacy (pre-zip) torch file whose main pickle is ``main_pickle``."""
    head = pickle.dumps(_LEGACY_MAGIC, protocol=2) + pickle.dumps(_LEGACY_PROTOCOL, protocol=2)
    info = pickle.dumps({"protocol_version": _LEGACY_PROTOCOL, "little_endian": True}, protocol=2)
    path.write_bytes(head + info + main_pickle + pickle.dumps([], protocol=2))
    return path


def reduce_global(module: str, name: str, arg: str, *, stack_global: bool = False) -> bytes:
    """A protocol-2 (or 4, for STACK_GLOBAL) pickle calling ``module.name(arg)``."""
    if stack_global:

        def text(s: str) -> bytes:
            return b"\x8c" + bytes([len(s)]) + s.encode()

        callee = text(module) + text(name) + b"\x93"
        return b"\x80\x04" + callee + text(arg) + b"\x85R."
    raw = arg.encode()
    return (
        b"\x80\x02c"
        + f"{module}\n{name}\n".encode()
        + b"X"
        + struct.pack("<I", len(raw))
        + raw
        + b"\x85R."
    )


def safetensors_file(
    path: Path, header: Any, data: bytes = b"", *, raw: bytes | None = None
) -> Path:
    """A safetensors file from a header (dumped as JSON unless ``raw`` bytes are given)."""
    blob = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def with_entry(path: Path, key: str, value_opcodes: bytes) -> Path:
    """Rewrite the torch zip ``path`` (a dict at the top) so that its pickle also sets
    ``key`` to what ``value_opcodes`` build; every other record is copied as it was."""
    with zipfile.ZipFile(path) as z:
        records = {i.filename.split("/", 1)[1]: z.read(i) for i in z.infolist()}
    pickled = records.pop("data.pkl")
    raw = key.encode()
    pickled = pickled[:-1] + b"X" + struct.pack("<I", len(raw)) + raw + value_opcodes + b"s."
    path.unlink()
    writer = torch._C.PyTorchFileWriter(str(path))
    writer.write_record("data.pkl", pickled, len(pickled))
    for name, blob in records.items():
        if name != "version":  # the writer adds its own
            writer.write_record(name, blob, len(blob))
    writer.write_end_of_file()
    return path


def real_pt(folder: Path, name: str = "adam.pt") -> Path:
    path = folder / name
    model = {"w": torch.ones(3, 2), "b": torch.ones(2)}
    torch.save({"model": model, "optimizer": _adam_state()}, path)
    return path


def _nested_lists(depth: int) -> bytes:
    """A pickle of ``depth`` nested lists, written as opcodes (pickle itself would recurse)."""
    return b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."


def _laughs(levels: int, width: int = 10) -> bytes:
    """A pickle of ``levels`` nested lists, each holding ``width`` references to the one below
    (memo references: tiny on disk, ``width ** levels`` leaves when walked as a tree)."""
    out = bytearray(b"\x80\x02]q\x00")  # EMPTY_LIST, BINPUT 0
    for level in range(1, levels + 1):
        out += b"(" + (b"h" + bytes([level - 1])) * width + b"lq" + bytes([level])
    return bytes(out) + b"."


def _optimizer_with(**overrides: Any) -> dict[str, Any]:
    state = _adam_state()
    for key, value in overrides.items():
        if key == "state":
            state["state"] = value
        elif key == "group":
            state["param_groups"][0].update(value)
        else:
            state[key] = value
    return state


def _saved(folder: Path, tree: Any, name: str = "ckpt.pt") -> Path:
    path = folder / name
    torch.save(tree, path)
    return path


# --- A. not a checkpoint -------------------------------------------------------------------


@case("empty-file")
def _(d: Path) -> Path:
    (d / "x.pt").write_bytes(b"")
    return d / "x.pt"


@case("random-bytes")
def _(d: Path) -> Path:
    (d / "x.pt").write_bytes(bytes(range(256)) * 64)
    return d / "x.pt"


@case("text-file")
def _(d: Path) -> Path:
    (d / "x.pt").write_text("state = {}\n")
    return d / "x.pt"


@case("json-file")
def _(d: Path) -> Path:
    (d / "x.json").write_text(json.dumps({"state": {}, "param_groups": []}))
    return d / "x.json"


@case("plain-zip-no-data-pkl")
def _(d: Path) -> Path:
    with zipfile.ZipFile(d / "x.pt", "w") as z:
        z.writestr("readme.txt", "hello")
    return d / "x.pt"


for _cut in (10, 100, 400, 0.5, 0.9, -22, -1):

    @case(f"zip-truncated-at-{_cut}")
    def _(d: Path, cut: float = _cut) -> Path:
        src = real_pt(d, "full.pt").read_bytes()
        (d / "full.pt").unlink()
        at = int(len(src) * cut) if isinstance(cut, float) else cut
        (d / "x.pt").write_bytes(src[:at])
        return d / "x.pt"


@case("legacy-magic-then-garbage")
def _(d: Path) -> Path:
    (d / "x.pt").write_bytes(pickle.dumps(_LEGACY_MAGIC, protocol=2) + b"\xff" * 100)
    return d / "x.pt"


@case("legacy-truncated")
def _(d: Path) -> Path:
    torch.save(_adam_state(), d / "full.pt", _use_new_zipfile_serialization=False)
    data = (d / "full.pt").read_bytes()
    (d / "full.pt").unlink()
    (d / "x.pt").write_bytes(data[: len(data) // 2])
    return d / "x.pt"


# A folder that is no checkpoint is unreadable (3); writing commands may refuse its -o first (2).
_FOLDER = {"*": {3}, "convert": {2, 3}, "move": {2, 3}, "resume-step-o": {2, 3}}


@case("empty-folder", _FOLDER)
def _(d: Path) -> Path:
    (d / "run").mkdir()
    return d / "run"


@case("folder-optimizer-pt-is-a-folder", _FOLDER)
def _(d: Path) -> Path:
    (d / "run" / "optimizer.pt").mkdir(parents=True)
    return d / "run"


def _trainer_folder(d: Path) -> Path:
    """A checkpoint folder as a Trainer writes one: optimizer.pt and a file beside it."""
    (d / "run").mkdir()
    torch.save(_adam_state(), d / "run" / "optimizer.pt")
    (d / "run" / "trainer_state.json").write_text("{}")
    return d / "run"


@case("folder-carries-fifo-symlink-loops-and-links-out", {"*": {0}, "remap": {2}})
def _(d: Path) -> Path:
    # carried as they are by every writing command: the FIFO never opened, no link followed
    run = _trainer_folder(d)
    os.mkfifo(run / "pipe")
    (run / "loop1").symlink_to("loop2")
    (run / "loop2").symlink_to("loop1")
    (run / "root").symlink_to("/")
    (d / "outside.txt").write_text("outside")
    (run / "escapes").symlink_to("../outside.txt")
    return run


@case("output-dir-newest-checkpoint-is-a-symlink-to-root", _FOLDER)
def _(d: Path) -> Path:
    # the newest checkpoint-N a symlink to /: refused from its top level, never walked
    (d / "out_dir").mkdir()
    _trainer_folder(d).rename(d / "out_dir" / "checkpoint-1")
    (d / "out_dir" / "checkpoint-9").symlink_to("/")
    return d / "out_dir"


@case("fifo-as-input")
def _(d: Path) -> Path:
    os.mkfifo(d / "x.pt")  # reading it would block forever
    return d / "x.pt"


@case("folder-optimizer-pt-is-a-fifo", _FOLDER)
def _(d: Path) -> Path:
    (d / "run").mkdir()
    os.mkfifo(d / "run" / "optimizer.pt")
    return d / "run"


@case("symlink-loop")
def _(d: Path) -> Path:
    os.symlink(d / "b.pt", d / "a.pt")
    os.symlink(d / "a.pt", d / "b.pt")
    return d / "a.pt"


@case("dangling-symlink")
def _(d: Path) -> Path:
    os.symlink(d / "missing.pt", d / "x.pt")
    return d / "x.pt"


# --- B. pickles that want to run code ------------------------------------------------------

_CALLS = [
    ("os", "system", f"touch {CANARY}"),
    ("posix", "system", f"touch {CANARY}"),
    ("subprocess", "getoutput", f"touch {CANARY}"),
    ("builtins", "exec", f"open('{CANARY}', 'w')"),
    ("builtins", "eval", f"open('{CANARY}', 'w')"),
    ("builtins", "__import__", "evil"),
    ("importlib", "import_module", "evil"),
    ("evil", "payload", "x"),  # a module in the current folder that writes the canary
    ("this", "s", "x"),  # importing `this` prints the Zen of Python
    ("torch", "load", CANARY),
    ("torch.serialization", "load", CANARY),
    ("runpy", "run_path", "evil.py"),
]


def _with_evil_module(d: Path) -> None:
    (d / "evil.py").write_text(f"open({str(d / CANARY)!r}, 'w').close()\npayload = print\n")


for _module, _name, _arg in _CALLS:
    for _form in ("zip", "legacy", "zip-stack-global"):

        @case(f"code-{_form}-{_module}.{_name}")
        def _(d: Path, m: str = _module, n: str = _name, a: str = _arg, form: str = _form) -> Path:
            _with_evil_module(d)
            body = reduce_global(m, n, a, stack_global=form.endswith("stack-global"))
            if form == "legacy":
                return legacy_file(d / "x.pt", body)
            return torch_zip(d / "x.pt", body)


@case("code-nested-in-a-real-checkpoint")
def _(d: Path) -> Path:
    _with_evil_module(d)
    evil = reduce_global("os", "system", f"touch {CANARY}")[2:-1]  # no PROTO, no STOP
    return with_entry(real_pt(d, "x.pt"), "x", evil)


# --- C. pickles that are broken or too big -------------------------------------------------


@case("zip-data-pkl-crc-mismatch")
def _(d: Path) -> Path:
    path = real_pt(d, "x.pt")
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    pickled = bytes(data[start : start + info.file_size])
    at = pickled.index(b"exp_avg_sq")
    data[start + at] = ord("E")  # a changed name, CRC left as it was
    path.write_bytes(bytes(data))
    return path


@case("deep-nesting-zip")
def _(d: Path) -> Path:
    return torch_zip(d / "x.pt", _nested_lists(200_000))


@case("deep-nesting-legacy")
def _(d: Path) -> Path:
    return legacy_file(d / "x.pt", _nested_lists(200_000))


@case("billion-laughs-references")
def _(d: Path) -> Path:
    return torch_zip(d / "x.pt", _laughs(12))


@case("billion-laughs-beside-an-optimizer", {"*": {0, 3}})
def _(d: Path) -> Path:
    return with_entry(real_pt(d, "x.pt"), "junk", _laughs(12)[2:-1])


@case("pickle-bomb-deflated")
def _(d: Path) -> Path:
    # 512 MiB of pickle opcodes (EMPTY_LIST, POP) that deflate to well under a megabyte
    path = d / "x.pt"
    unit = b"]0" * (1 << 19)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z, z.open("x/data.pkl", "w") as f:
        f.write(b"\x80\x02")
        for _ in range(512):
            f.write(unit)
        f.write(b"N.")
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("x/version", "3\n")
        z.writestr("x/byteorder", "little")
    return path


def _tensor_case(name: str, numel: int, offset: int, size: tuple, stride: tuple) -> None:
    @case(name)
    def _(d: Path) -> Path:
        state = {
            "state": {0: {"step": 1, "exp_avg": _Rebuild("0", numel, offset, size, stride)}},
            "param_groups": [{"params": [0], "lr": 1e-3}],
        }
        blob = torch.zeros(numel).numpy().tobytes()
        return torch_zip(d / "x.pt", _pickle(state), {"0": blob})


_tensor_case("zero-stride-10^12-squared", 1, 0, (10**12, 10**12), (0, 0))
_tensor_case("zero-stride-1e9", 4, 0, (10**9,), (0,))
_tensor_case("view-past-storage", 4, 0, (100,), (1,))
_tensor_case("offset-past-storage", 4, 10, (2,), (1,))
_tensor_case("negative-offset", 4, -1, (2,), (1,))
_tensor_case("negative-size", 4, 0, (-2,), (1,))
_tensor_case("negative-stride", 4, 3, (2,), (-1,))


def _unrecorded_case(name: str, key: str) -> None:
    """A tensor whose storage ``key`` names no record of the archive."""

    @case(name)
    def _(d: Path) -> Path:
        state = {
            "state": {0: {"exp_avg": _Rebuild(key, 4, 0, (4,), (1,))}},
            "param_groups": [{"params": [0], "lr": 1e-3}],
        }
        return torch_zip(d / "x.pt", _pickle(state))


_unrecorded_case("storage-key-path-traversal", "../../etc/passwd")
_unrecorded_case("storage-record-missing", "7")


@case("persistent-id-unknown-type")
def _(d: Path) -> Path:
    return torch_zip(d / "x.pt", b"\x80\x02(X\x04\x00\x00\x00evilq\x00tQ.")


# --- D. safetensors headers ----------------------------------------------------------------

_GOOD = {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
_ST_HEADERS: dict[str, Any] = {
    "negative-dim": {"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}},
    "float-dim": {"t": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}},
    "bool-dim": {"t": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}},
    "string-shape": {"t": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}},
    "huge-dim": {"t": {"dtype": "F32", "shape": [2**64], "data_offsets": [0, 8]}},
    "dims-overflow": {"t": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}},
    "reversed-offsets": {"t": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}},
    "negative-begin": {"t": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}},
    "three-offsets": {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4, 8]}},
    "offsets-past-end": {"t": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}},
    "overlapping": {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    },
    "unknown-dtype": {"t": {"dtype": "F128", "shape": [2], "data_offsets": [0, 8]}},
    "size-mismatch": {"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
    "metadata-a-list": {**_GOOD, "__metadata__": ["x"]},
    "metadata-values-not-strings": {**_GOOD, "__metadata__": {"a": {"b": 1}}},
    "entry-not-a-dict": {"t": [1, 2]},
    "tree-dtype-load": {
        **_GOOD,
        "__metadata__": {"optckpt.tree": json.dumps({"x": {"__dtype__": "load"}})},
    },
    "tree-device-junk": {
        **_GOOD,
        "__metadata__": {"optckpt.tree": json.dumps({"x": {"__device__": "evil:7"}})},
    },
    "tree-float-junk": {
        **_GOOD,
        "__metadata__": {"optckpt.tree": json.dumps({"x": {"__float__": "1e400x"}})},
    },
    "tree-missing-tensor": {
        **_GOOD,
        "__metadata__": {"optckpt.tree": json.dumps({"x": {"__tensor__": "nope"}})},
    },
    "tree-tensor-not-a-name": {
        **_GOOD,
        "__metadata__": {"optckpt.tree": json.dumps({"x": {"__tensor__": [1]}})},
    },
    "tree-bad-dict-pairs": {
        **_GOOD,
        "__metadata__": {"optckpt.tree": json.dumps({"x": {"__dict__": [[[1], 2]]}})},
    },
    "tree-not-json": {**_GOOD, "__metadata__": {"optckpt.tree": "{not json"}},
    "tree-deep": {**_GOOD, "__metadata__": {"optckpt.tree": "[" * 100_000 + "]" * 100_000}},
    "devices-not-a-mapping": {
        **_GOOD,
        "__metadata__": {
            "optckpt.tree": json.dumps({"x": {"__tensor__": "t"}}),
            "optckpt.devices": "[1]",
        },
    },
}

for _label, _header in _ST_HEADERS.items():

    @case(f"safetensors-{_label}")
    def _(d: Path, header: Any = _header) -> Path:
        return safetensors_file(d / "x.safetensors", header, b"\0" * 8)


@case("safetensors-header-deep-json")
def _(d: Path) -> Path:
    return safetensors_file(
        d / "x.safetensors", None, raw=b"{" + b'"a":[' * 50_000 + b"]" * 50_000 + b"}"
    )


@case("safetensors-header-length-past-end")
def _(d: Path) -> Path:
    (d / "x.safetensors").write_bytes(struct.pack("<Q", 1000) + b"{}")
    return d / "x.safetensors"


@case("safetensors-header-not-utf8")
def _(d: Path) -> Path:
    return safetensors_file(d / "x.safetensors", None, raw=b'{"\xff": 1}')


# --- E. optimizer state with odd values ----------------------------------------------------

# Odd values are shown (0) or refused: 3 (not an optimizer state dict), 4 (incompatible);
# remap may also find names it cannot recover (2), resume-step a check that fails (1), and
# convert a value safetensors cannot hold (2).
_ODD_CODES = {
    "*": {0, 3, 4},
    "remap": {0, 2, 3, 4},
    "resume-step": {0, 1, 3, 4},
    "resume-step-o": {0, 1, 3, 4},
    "convert": {0, 2, 3, 4},
}
_BAD_STATE: dict[str, Callable[[], Any]] = {
    "params-holding-lists": lambda: _optimizer_with(group={"params": [[0], [1]]}),
    "params-holding-dicts": lambda: _optimizer_with(group={"params": [{"a": 1}, 1]}),
    "params-holding-floats": lambda: _optimizer_with(group={"params": [0.5, 1]}),
    "params-not-a-list": lambda: _optimizer_with(group={"params": 7}),
    "param-groups-not-a-list": lambda: _optimizer_with(param_groups={"a": 1}),
    "group-not-a-dict": lambda: _optimizer_with(param_groups=[[0, 1]]),
    "state-not-a-dict": lambda: _optimizer_with(state=[1, 2]),
    "bare-tensor-state": lambda: _optimizer_with(state={0: torch.ones(3, 2), 1: torch.ones(2)}),
    "string-step": lambda: _optimizer_with(
        state={0: {"step": "ten", "exp_avg": torch.ones(3, 2), "exp_avg_sq": torch.ones(3, 2)}}
    ),
    "complex-step": lambda: _optimizer_with(
        state={0: {"step": 1 + 2j, "exp_avg": torch.ones(3, 2), "exp_avg_sq": torch.ones(3, 2)}}
    ),
    "complex-tensor-step": lambda: _optimizer_with(
        state={
            0: {
                "step": torch.tensor(1 + 2j),
                "exp_avg": torch.ones(3, 2),
                "exp_avg_sq": torch.ones(3, 2),
            }
        }
    ),
    "nan-step": lambda: _optimizer_with(
        state={
            0: {
                "step": torch.tensor(float("nan")),
                "exp_avg": torch.ones(3, 2),
                "exp_avg_sq": torch.ones(3, 2),
            }
        }
    ),
    "huge-lr": lambda: _optimizer_with(group={"lr": 10**400}),
    "nan-lr": lambda: _optimizer_with(group={"lr": float("nan")}),
    "complex-lr": lambda: _optimizer_with(group={"lr": 1j}),
    "lr-a-dict": lambda: _optimizer_with(group={"lr": {"a": [1, 2]}}),
    "bool-ids": lambda: _optimizer_with(group={"params": [True, False]}),
    "negative-ids": lambda: _optimizer_with(group={"params": [-1, -2]}),
    "float-state-keys": lambda: _optimizer_with(state={0.5: {"step": torch.tensor(1.0)}}),
    "tuple-state-keys": lambda: _optimizer_with(state={(0, 1): {"step": torch.tensor(1.0)}}),
    "state-key-not-a-param": lambda: _optimizer_with(
        state={99: {"step": torch.tensor(1.0), "exp_avg": torch.ones(2)}}
    ),
    "duplicate-ids-across-groups": lambda: {
        **_adam_state(),
        "param_groups": [
            {**_adam_state()["param_groups"][0]},
            {**_adam_state()["param_groups"][0]},
        ],
    },
    "state-key-int-and-str": lambda: _optimizer_with(
        state={0: {"step": torch.tensor(1.0)}, "0": {"step": torch.tensor(1.0)}}
    ),
    "moments-of-other-shapes": lambda: _optimizer_with(
        state={
            0: {"step": torch.tensor(1.0), "exp_avg": torch.ones(3, 2), "exp_avg_sq": torch.ones(5)}
        }
    ),
    "int-moments": lambda: _optimizer_with(
        state={
            0: {
                "step": torch.tensor(1.0),
                "exp_avg": torch.ones(3, 2, dtype=torch.int64),
                "exp_avg_sq": torch.ones(3, 2, dtype=torch.int64),
            }
        }
    ),
    "markup-and-escapes-in-names": lambda: _optimizer_with(
        group={"param_names": ["[/]x[bold]", "\x1b[31mred\x1b[0m\r\b"]}
    ),
}

for _label, _make in _BAD_STATE.items():

    @case(f"state-{_label}", _ODD_CODES)
    def _(d: Path, make: Callable[[], Any] = _make) -> Path:
        return _saved(
            d, {"model": {"w": torch.ones(3, 2), "b": torch.ones(2)}, "optimizer": make()}
        )


# --- F. names and paths --------------------------------------------------------------------


@case("path-not-utf8", {"*": {0}, "remap": {0, 2}})
def _(d: Path) -> Path:
    name = os.fsdecode(b"ckpt\xff.pt")
    return real_pt(d, name)


@case("path-with-markup-and-escape", {"*": {0}, "remap": {0, 2}})
def _(d: Path) -> Path:
    return real_pt(d, "[red]x[x\x1b[31m.pt")


# --- G. layouts given to remap --to and regenerate --layout --------------------------------

LAYOUT_COMMANDS = ("remap-to", "regenerate")
_LAYOUTS: dict[str, Any] = {
    "negative-shape": {"params": {"w": {"shape": [-3, 2]}}, "groups": [{"params": ["w"]}]},
    "huge-shape": {"params": {"w": {"shape": [2**31, 2**31]}}, "groups": [{"params": ["w"]}]},
    "petabytes": {
        "params": {f"w{i}": {"shape": [2**20, 2**20]} for i in range(1024)},
        "groups": [{"params": [f"w{i}" for i in range(1024)]}],
    },
    "shape-a-string": {"params": {"w": {"shape": "3,2"}}, "groups": [{"params": ["w"]}]},
    "unknown-param-in-group": {
        "params": {"w": {"shape": [3, 2]}},
        "groups": [{"params": ["nope"]}],
    },
    "unknown-dtype": {
        "params": {"w": {"shape": [3, 2], "dtype": "load"}},
        "groups": [{"params": ["w"]}],
    },
    "groups-not-a-list": {"params": {"w": {"shape": [3, 2]}}, "groups": {"params": ["w"]}},
    "lr-huge": {"params": {"w": {"shape": [3, 2]}}, "groups": [{"params": ["w"], "lr": 10**400}]},
}


# remap allocates nothing for the layout's new parameters (they get no state), so a layout
# of petabytes is no reason to refuse it; regenerate would allocate them.
_LAYOUT_CODES = {"petabytes": {"*": {2, 3, 4}, "remap-to": {0}}}


def _layout_case(label: str, write: Callable[[Path], None]) -> None:
    @case(f"layout-{label}", _LAYOUT_CODES.get(label, {"*": {2, 3, 4}}), LAYOUT_COMMANDS)
    def _(d: Path) -> Path:
        write(d / "layout.json")
        return d / "layout.json"


for _label, _layout in _LAYOUTS.items():
    _layout_case(_label, lambda p, layout=_layout: p.write_text(json.dumps(layout)))
_layout_case("deep-json", lambda p: p.write_text("[" * 100_000 + "]" * 100_000))
_layout_case("not-utf8", lambda p: p.write_bytes(b'{"params": "\xff"}'))


@case("layout-pickle-with-os-system", {"*": {3}}, LAYOUT_COMMANDS)
def _(d: Path) -> Path:
    return torch_zip(d / "layout.pt", reduce_global("os", "system", f"touch {CANARY}"))


@case("layout-fifo", {"*": {2, 3}}, LAYOUT_COMMANDS)
def _(d: Path) -> Path:
    os.mkfifo(d / "layout.json")
    return d / "layout.json"
