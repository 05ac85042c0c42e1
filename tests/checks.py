"""Assertions shared by the test modules (``tests/`` is on ``sys.path``, see pyproject.toml)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.torch_version import TorchVersion
from typer.testing import CliRunner, Result

from optckpt.cli.app import app
from optckpt.io import load_checkpoint
from optckpt.layout import find_model_state

# optckpt's optimizers mirror torch 2.13 (the version constraints.txt pins); an older torch
# behaves differently in a few places, each marked with this.
BEFORE_2_13 = TorchVersion(torch.__version__) < "2.13.0a0"


# Every optimizer class of the installed torch.optim, by name: enumerated from torch itself, so
# that a torch upgrade adding one fails the tests that walk them until optckpt knows it.
TORCH_CLASSES: dict[str, type[torch.optim.Optimizer]] = {
    name: cls
    for name, cls in vars(torch.optim).items()
    if isinstance(cls, type)
    and issubclass(cls, torch.optim.Optimizer)
    and cls is not torch.optim.Optimizer
}


# The checks of resume-step, in the order it reports them (without --check-torch).
RESUME_CHECKS = [
    "loads",
    "shapes",
    "step_counters_agree",
    "finite_before",
    "steps_taken",
    "step_counters_advance",
    "finite_after",
]


def tensors_of(node: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a tree of dicts, lists and tuples, found by plain recursion (the
    independent truth for optckpt's own walks)."""
    if isinstance(node, torch.Tensor):
        yield node
    elif isinstance(node, Mapping):
        for v in node.values():
            yield from tensors_of(v)
    elif isinstance(node, (list, tuple)):
        for v in node:
            yield from tensors_of(v)


def save_tree(path: Path, **tree: Any) -> Path:
    """``torch.save(tree, path)``; returns ``path``."""
    torch.save(tree, path)
    return path


def run(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    """``optckpt ARGS...`` in this process (typer's CliRunner), stdout and stderr apart."""
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def trained_adam(
    make_model: Callable[[], nn.Module], steps: int, **kwargs: Any
) -> tuple[nn.Module, torch.optim.Adam]:
    """A model (made after seeding torch with 0) and the ``torch.optim.Adam`` (lr 1e-2, and
    ``kwargs``) that trained it ``steps`` steps on random (5, 4) batches."""
    torch.manual_seed(0)
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, **kwargs)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).square().sum().backward()
        optimizer.step()
    return model, optimizer


def two_optimizers(
    model: nn.Module, train: Callable[[nn.Module, torch.optim.Optimizer], None]
) -> list[dict[str, Any]]:
    """The state dicts of an SGD (momentum 0.9) and an Adam over the same ``model``, each
    trained by ``train`` in turn: what a checkpoint with several optimizers holds."""
    optimizers = [
        torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9),
        torch.optim.Adam(model.named_parameters(), lr=0.1),
    ]
    for optimizer in optimizers:
        train(model, optimizer)
    return [optimizer.state_dict() for optimizer in optimizers]


def changed_in_2_13(what: str) -> pytest.MarkDecorator:
    """Expected to fail on torch < 2.13 (strict: passing there is reported too)."""
    return pytest.mark.xfail(BEFORE_2_13, reason=f"torch < 2.13: {what}", strict=True)


def dcp_save_trained(
    folder: Path,
    widths: tuple[int, int, int],
    *,
    steps: int,
    batch: int,
    extra: dict[str, Any],
    compress: bool = False,
) -> None:
    """``dcp.save`` (one process) of ``get_state_dict``'s model and AdamW after ``steps``
    real steps, beside ``extra``: a seeded ``Linear(a, b), ReLU, Linear(b, c)`` for
    ``widths`` ``(a, b, c)``; ``compress``: every entry through torch's ZStandard extension."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint._extension import ZStandard
    from torch.distributed.checkpoint.state_dict import get_state_dict

    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    torch.manual_seed(0)
    a, b, c = widths
    model = nn.Sequential(nn.Linear(a, b), nn.ReLU(), nn.Linear(b, c))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):
        model(torch.randn(batch, a)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    msd, osd = get_state_dict(model, optimizer)
    extensions = [ZStandard()] if compress else None
    writer = FileSystemWriter(str(folder), _extensions=extensions)
    dcp.save({"model": msd, "optim": osd, "extra": extra}, storage_writer=writer)


def step_by_recipe(optimizer: torch.optim.Optimizer, steps: int, seed: int) -> None:
    """``steps`` steps of a torch optimizer on the synthetic gradients of ``seed``, by the
    README's recipe (its own code, not optckpt's): a generator seeded ``seed + 1``, one
    ``randn`` per parameter in group order, each step."""
    gen = torch.Generator().manual_seed(seed + 1)
    order = [p for g in optimizer.param_groups for p in g["params"]]
    for _ in range(steps):
        for p in order:
            p.grad = torch.randn(p.shape, generator=gen)
        optimizer.step()


def assert_bitwise_equal(ours: Any, theirs: Any, path: str = "") -> None:
    """Equal structure, key order, types, dtypes, devices and bits (torch.equal)."""
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, torch.Tensor), f"{path}: {type(ours)} is not a tensor"
        assert (ours.dtype, ours.device, ours.shape) == (
            theirs.dtype,
            theirs.device,
            theirs.shape,
        ), (
            f"{path}: {ours.dtype} {ours.device} {tuple(ours.shape)} vs "
            f"{theirs.dtype} {theirs.device} {tuple(theirs.shape)}"
        )
        assert torch.equal(ours, theirs), f"{path}: values differ:\n{ours}\n{theirs}"
    elif isinstance(theirs, dict):
        assert isinstance(ours, dict), f"{path}: {type(ours)} is not a dict"
        assert list(ours) == list(theirs), f"{path}: keys {list(ours)} vs {list(theirs)}"
        for key in theirs:
            assert_bitwise_equal(ours[key], theirs[key], f"{path}/{key}")
    elif isinstance(theirs, (list, tuple)):
        assert type(ours) is type(theirs), f"{path}: {type(ours)} vs {type(theirs)}"
        assert len(ours) == len(theirs), f"{path}: length {len(ours)} vs {len(theirs)}"
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert_bitwise_equal(a, b, f"{path}/{i}")
    else:
        assert type(ours) is type(theirs) and ours == theirs, f"{path}: {ours!r} vs {theirs!r}"


def assert_one_line_error(stderr: str, *needles: str) -> None:
    """A user error: one ``error: ...`` line on stderr, no traceback, holding every needle."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def saved_devices(checkpoint: Any) -> dict[str, str | None]:
    """The saved device of every tensor of a loaded checkpoint, by key path
    (``/optimizer/state/0/exp_avg``, as :func:`tensors_by_path` spells it)."""
    from optckpt.locate import tensor_paths

    return {
        "/" + "/".join(map(str, path)): checkpoint.saved_device(path, tensor)
        for path, tensor in tensor_paths(checkpoint.root)
    }


def tensors_by_path(node: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint tree, by key path (``/optimizer/state/0/exp_avg``)."""
    if isinstance(node, torch.Tensor):
        return {prefix: node}
    if not isinstance(node, (dict, list, tuple)):
        return {}
    items = node.items() if isinstance(node, dict) else enumerate(node)
    return {
        path: tensor
        for key, child in items
        for path, tensor in tensors_by_path(child, f"{prefix}/{key}").items()
    }


class RecordedProgress:
    """A ``progress=`` start callback that records the total it is given and every write."""

    def __init__(self) -> None:
        self.started: list[int] = []
        self.written: list[int] = []

    def __call__(self, total: int) -> Any:
        self.started.append(total)
        return self.written.append


def flat_optimizer_state(optim: dict[str, Any]) -> dict[tuple[str, str], torch.Tensor]:
    """(FQN, state key) -> tensor, of a name-keyed optimizer state dict or of torch's
    flattened one (``state.<fqn>.<key>``), as DCP tests compare them."""
    if "state" in optim:
        return {(fqn, k): v for fqn, st in optim["state"].items() for k, v in st.items()}
    return {
        tuple(key[len("state.") :].rsplit(".", 1)): v  # type: ignore[misc]
        for key, v in optim.items()
        if key.startswith("state.")
    }


def assert_same_bits(a: dict[Any, torch.Tensor], b: dict[Any, torch.Tensor]) -> None:
    """The same keys, and under each a tensor of the same dtype, shape and bytes."""
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(
            a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)
        ), k


class TiedNet(nn.Module):
    """Embedding tied to the output head, a BatchNorm (buffers), a body layer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.norm = nn.BatchNorm1d(6)
        self.body = nn.Linear(6, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.embed.weight


def saved_model_state(model: nn.Module, path: Path) -> Any:
    """The model's state dict as optckpt reads it back from a torch file (mmap'd)."""
    torch.save({"model": model.state_dict()}, path)
    return find_model_state(load_checkpoint(path).root)


def folder_digests(path: Path) -> dict[str, str]:
    """What a file or folder holds, to tell that nothing changed it: each file's SHA-256 and
    each symlink's target, by path relative to ``path`` (``""`` for a file itself)."""
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    found = {}
    for entry in sorted(path.rglob("*")):
        key = str(entry.relative_to(path))
        if entry.is_symlink():
            found[key] = "-> " + os.readlink(entry)
        elif entry.is_file():
            found[key] = hashlib.sha256(entry.read_bytes()).hexdigest()
    return found


def dcp_as_torch_reads_it(folder: Path, scratch: Path) -> Any:
    """A DCP folder as torch itself reads it: ``dcp_to_torch_save``, then ``torch.load``."""
    import warnings

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = scratch / f"{folder.name}.torch-reads.pt"
    with warnings.catch_warnings():  # no process group: torch warns that it assumes one
        warnings.simplefilter("ignore")
        dcp_to_torch_save(str(folder), str(out))
    return torch.load(out, weights_only=True)


class Assemblies:
    """What :func:`track_assemblies` saw: each tensor a DCP placeholder's writer made, and
    the most that held memory of their own at once (weak references to their storages; a
    view of a ``.distcp`` file holds none, nor does a storage freed under its tensor)."""

    def __init__(self) -> None:
        self.storages: list[tuple[Any, bool]] = []  # (weak reference, a view of a file)
        self.most_alive = 0

    @property
    def made(self) -> int:
        return len(self.storages)

    def alive(self) -> int:
        return sum(
            1
            for ref, in_file in self.storages
            if not in_file and (s := ref()) is not None and s.nbytes() > 0
        )


def _in_distcp_mapping(address: int) -> bool:
    """Whether ``address`` lies in a memory mapping of a ``.distcp`` file (/proc/self/maps)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end:
            return len(fields) == 6 and fields[5].endswith(".distcp")
    return False


def track_assemblies(monkeypatch: pytest.MonkeyPatch) -> Assemblies:
    """Watch every ``Assembled.materialize`` (a DCP tensor made when written): after each,
    how many of the tensors made so far still hold memory (see :class:`Assemblies`)."""
    import weakref

    from optckpt.io.dcp.tensors import Assembled

    seen = Assemblies()
    original = Assembled.materialize

    def materialize(self: Assembled) -> torch.Tensor:
        tensor = original(self)
        storage = tensor.untyped_storage()
        seen.storages.append((weakref.ref(storage), _in_distcp_mapping(storage.data_ptr())))
        seen.most_alive = max(seen.most_alive, seen.alive())
        return tensor

    monkeypatch.setattr(Assembled, "materialize", materialize)
    return seen


def torch_zip_bytes(path: Path) -> bytes:
    """A torch zip file's bytes with the value of ``.data/serialization_id`` and its CRC32
    (data descriptor and central directory) blanked: the one record optckpt's torch-free
    writer writes otherwise than torch (``optckpt.io.zip_writer``)."""
    import struct
    import zipfile

    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        (info,) = [i for i in archive.infolist() if i.filename.endswith("/.data/serialization_id")]
        directory = archive.start_dir  # type: ignore[attr-defined]
    name_length, extra_length = struct.unpack_from("<HH", data, info.header_offset + 26)
    start = info.header_offset + 30 + name_length + extra_length
    assert data[start : start + 40].isdigit() and info.file_size == 40
    data[start : start + 40] = b"0" * 40
    assert data[start + 40 : start + 44] == b"PK\x07\x08"
    data[start + 44 : start + 48] = bytes(4)
    at = directory  # the central directory: entries of 46 bytes plus name, extra, comment
    while data[at : at + 4] == b"PK\x01\x02":
        n, m, k = struct.unpack_from("<HHH", data, at + 28)
        if bytes(data[at + 46 : at + 46 + n]) == info.filename.encode():
            data[at + 16 : at + 20] = bytes(4)
        at += 46 + n + m + k
    return bytes(data)


def convert_without_torch(src: Path, out: Path) -> None:
    """``convert_checkpoint(src, out)`` in a fresh process; assert that it never imported
    torch."""
    import subprocess
    import sys

    script = (
        "import sys\nfrom optckpt.convert import convert_checkpoint\n"
        f"convert_checkpoint({str(src)!r}, {str(out)!r})\nprint('torch' in sys.modules)"
    )
    found = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert found.stdout.strip() == "False", found.stdout + found.stderr
