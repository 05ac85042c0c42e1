"""optckpt.io: safe reading of every fixture, checked against ``torch.load`` itself.

The truth for a torch file is ``torch.load(path, weights_only=True, map_location="cpu")`` of
the same file; for the CUDA-tagged file it is the recipe in ``fixtures/make_fixtures.py``
(storages of 4 bytes tagged ``cpu``, every other one ``cuda:0``); for the safetensors layout it
is the tree written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import struct
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from checks import saved_devices, tensors_of
from safetensors.torch import load_file

from optckpt.errors import (
    ExitCode,
    OptckptError,
    UnreadableCheckpointError,
    UnsafeCheckpointError,
    UsageError,
)
from optckpt.io import load_checkpoint
from optckpt.io.safetensors_format import TREE_KEY, read_safetensors, write_safetensors
from optckpt.locate import tensor_paths

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
HF_FOLDER = FIXTURES / "hf_trainer" / "checkpoint-2"

# fixture -> (format, file that torch.load reads for the truth, key of it in the root)
READABLE = {
    "adamw_train.pt": ("torch", "adamw_train.pt", None),
    "sgd_momentum_bare.pt": ("torch", "sgd_momentum_bare.pt", None),
    "lightning.ckpt": ("torch", "lightning.ckpt", None),
    "legacy_adam.pt": ("torch-legacy", "legacy_adam.pt", None),
    "cuda_adam.pt": ("torch", "cuda_adam.pt", None),
    "hf_trainer/checkpoint-2": ("torch", "hf_trainer/checkpoint-2/optimizer.pt", "optimizer.pt"),
}
ZIP_FILES = ["adamw_train.pt", "sgd_momentum_bare.pt", "lightning.ckpt", "cuda_adam.pt"]
ALL_INPUTS = [*READABLE, "adamw_train.safetensors", "unsafe_namespace.pt"]


def truth(relative: str, **kwargs: Any) -> Any:
    return torch.load(FIXTURES / relative, weights_only=True, map_location="cpu", **kwargs)


def assert_same(a: Any, b: Any, where: str = "root") -> None:
    """Deep equality that tells tuples from lists, ints from bools, and compares tensors bitwise."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device), where
        as_bytes = [t.detach().reshape(-1).contiguous().view(torch.uint8) for t in (a, b)]
        assert torch.equal(*as_bytes), where
    elif isinstance(a, Mapping):
        # torch.load gives OrderedDict for a model state dict; any mapping with the same
        # items in the same order is the same checkpoint.
        assert isinstance(b, Mapping), where
        assert list(a) == list(b), where
        for k in a:
            assert type(k) is type(next(x for x in b if x == k)), f"{where}: key {k!r}"
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}.{i}")
    elif isinstance(a, float):
        assert type(b) is float, where
        assert (math.isnan(a) and math.isnan(b)) or struct.pack("<d", a) == struct.pack("<d", b), (
            where
        )
    else:
        assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
        assert a == b, where


def assert_one_line_unreadable(error: OptckptError, path: Path) -> None:
    assert isinstance(error, UnreadableCheckpointError)
    assert error.exit_code == ExitCode.UNREADABLE == 3
    message = str(error)
    assert message and "\n" not in message
    assert str(path) in message


@pytest.fixture
def torch_load_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Record the keyword arguments of every ``torch.load`` call (it still runs)."""
    calls: list[dict[str, Any]] = []
    real = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


# --------------------------------------------------------------------------- reading fixtures


@pytest.mark.parametrize("relative", list(READABLE))
def test_fixture_root_equals_torch_load(relative: str) -> None:
    expected_format, truth_file, member = READABLE[relative]
    checkpoint = load_checkpoint(FIXTURES / relative)
    assert checkpoint.format == expected_format
    root = checkpoint.root if member is None else checkpoint.root[member]
    assert_same(truth(truth_file), root)


def test_folder_reads_only_its_optimizer_file_and_lists_the_rest() -> None:
    checkpoint = load_checkpoint(HF_FOLDER)
    on_disk = sorted(p.name for p in HF_FOLDER.iterdir())
    assert checkpoint.members == on_disk
    assert list(checkpoint.root) == ["optimizer.pt"]
    assert checkpoint.size == sum((HF_FOLDER / n).stat().st_size for n in on_disk)


def test_safetensors_fixture_equals_the_torch_file_of_the_same_recipe() -> None:
    # make_fixtures.py writes adamw_train.pt and adamw_train.safetensors from the same run.
    checkpoint = load_checkpoint(FIXTURES / "adamw_train.safetensors")
    assert checkpoint.format == "safetensors"
    assert_same(truth("adamw_train.pt"), checkpoint.root)


def _mapped_regions(path: Path) -> list[tuple[int, int]]:
    real = os.path.realpath(path)
    regions = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == real:
            low, high = (int(x, 16) for x in parts[0].split("-"))
            regions.append((low, high))
    return regions


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc/self/maps")
@pytest.mark.parametrize("name", [*ZIP_FILES, "adamw_train.safetensors"])
def test_tensors_are_views_of_the_mapped_file(name: str) -> None:
    path = FIXTURES / name
    checkpoint = load_checkpoint(path)
    regions = _mapped_regions(path)
    assert regions, "the file is not memory-mapped"
    tensors = [t for t in tensors_of(checkpoint.root) if t.numel()]
    assert tensors
    for t in tensors:
        assert any(low <= t.data_ptr() < high for low, high in regions), (
            "tensor copied out of the file"
        )


def test_zip_files_load_with_mmap_and_legacy_without(
    torch_load_calls: list[dict[str, Any]],
) -> None:
    load_checkpoint(FIXTURES / "adamw_train.pt")
    load_checkpoint(FIXTURES / "legacy_adam.pt")  # the legacy format cannot be mmapped
    assert [c.get("mmap") for c in torch_load_calls] == [True, False]


def test_saved_device_follows_the_location_tags_of_the_recipe() -> None:
    checkpoint = load_checkpoint(FIXTURES / "cuda_adam.pt")
    tensors = list(tensor_paths(checkpoint.root))
    assert tensors
    for path, t in tensors:
        assert t.device.type == "cpu"  # mapped to the CPU, the default map_location
        expected = "cpu" if t.untyped_storage().nbytes() == 4 else "cuda:0"
        assert checkpoint.saved_device(path, t) == expected
    state = checkpoint.root["optimizer"]["state"]
    for key, expected in (("exp_avg", "cuda:0"), ("exp_avg_sq", "cuda:0"), ("step", "cpu")):
        devices = {
            checkpoint.saved_device(("optimizer", "state", pid, key), s[key])
            for pid, s in state.items()
        }
        assert devices == {expected}, key


def test_saved_devices_are_keyed_by_key_path() -> None:
    """Only the tensors saved from another device are listed, each under its key path."""
    checkpoint = load_checkpoint(FIXTURES / "cuda_adam.pt")
    assert checkpoint.placement
    assert set(checkpoint.placement.values()) == {"cuda:0"}
    assert ("optimizer", "state", 0, "exp_avg") in checkpoint.placement
    assert ("optimizer", "state", 0, "step") not in checkpoint.placement  # on the CPU


@pytest.mark.parametrize(
    "relative", ["adamw_train.pt", "legacy_adam.pt", "adamw_train.safetensors"]
)
def test_saved_device_is_cpu_for_cpu_checkpoints(relative: str) -> None:
    checkpoint = load_checkpoint(FIXTURES / relative)
    assert set(saved_devices(checkpoint).values()) == {"cpu"}
    assert checkpoint.placement == {}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_keeping_cuda_devices_without_cuda_is_unreadable() -> None:
    path = FIXTURES / "cuda_adam.pt"
    with pytest.raises(UnreadableCheckpointError) as info:
        load_checkpoint(path, map_location=None)
    assert_one_line_unreadable(info.value, path)


# --------------------------------------------------------------------------- unsafe pickles


def test_unsafe_pickle_is_refused_with_the_globals_it_needs() -> None:
    path = FIXTURES / "unsafe_namespace.pt"
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint(path)
    error = info.value
    assert error.exit_code == 3
    assert error.unsafe_globals == ["argparse.Namespace"]
    assert "argparse.Namespace" in str(error) and "\n" not in str(error)


def test_unsafe_pickle_stays_refused_when_torch_is_told_to_drop_weights_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # torch honours this variable only where weights_only was not passed explicitly.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(FIXTURES / "unsafe_namespace.pt")


def test_allowed_global_loads_the_unsafe_file() -> None:
    checkpoint = load_checkpoint(
        FIXTURES / "unsafe_namespace.pt", allow_globals=["argparse.Namespace"]
    )
    with torch.serialization.safe_globals([argparse.Namespace]):
        expected = truth("unsafe_namespace.pt")
    assert isinstance(checkpoint.root["hparams"], argparse.Namespace)
    assert checkpoint.root["hparams"] == argparse.Namespace(lr=0.1, batch_size=32)
    assert_same(expected["optimizer"], checkpoint.root["optimizer"])
    assert_same(expected["model"], checkpoint.root["model"])


@pytest.mark.parametrize(
    "name", ["Namespace", "argparse.NoSuchThing", "no_such_module_xyz.Thing", ""]
)
def test_bad_allow_global_is_a_usage_error(name: str) -> None:
    with pytest.raises(UsageError) as info:
        load_checkpoint(FIXTURES / "unsafe_namespace.pt", allow_globals=[name])
    assert info.value.exit_code == ExitCode.USAGE == 2
    assert "\n" not in str(info.value)


def test_nothing_ever_loads_without_weights_only(
    tmp_path: Path, torch_load_calls: list[dict[str, Any]]
) -> None:
    inputs = [FIXTURES / name for name in ALL_INPUTS]
    cut = tmp_path / "cut.pt"
    cut.write_bytes((FIXTURES / "legacy_adam.pt").read_bytes()[:1000])
    for path in [*inputs, cut]:
        with contextlib.suppress(UnreadableCheckpointError):
            load_checkpoint(path)
    load_checkpoint(FIXTURES / "unsafe_namespace.pt", allow_globals=["argparse.Namespace"])
    assert len(torch_load_calls) >= len(inputs)
    assert all(c.get("weights_only") is True for c in torch_load_calls), torch_load_calls


# --------------------------------------------------------------------------- unreadable input


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _unreadable(path: Path) -> None:
    with pytest.raises(UnreadableCheckpointError) as info:
        load_checkpoint(path)
    assert_one_line_unreadable(info.value, path)


def test_missing_path(tmp_path: Path) -> None:
    _unreadable(tmp_path / "nope.pt")


def test_empty_file(tmp_path: Path) -> None:
    _unreadable(_write(tmp_path, "empty.pt", b""))


def test_random_bytes(tmp_path: Path) -> None:
    _unreadable(_write(tmp_path, "noise.pt", random.Random(0).randbytes(4096)))


def test_text_file(tmp_path: Path) -> None:
    _unreadable(_write(tmp_path, "notes.txt", b"epoch 3: loss 0.25\n" * 20))


def test_json_file_is_not_taken_for_safetensors(tmp_path: Path) -> None:
    _unreadable(
        _write(tmp_path, "trainer_state.json", (HF_FOLDER / "trainer_state.json").read_bytes())
    )


def test_folder_without_optimizer_file(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-7"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((HF_FOLDER / "model.safetensors").read_bytes())
    (folder / "trainer_state.json").write_text("{}")
    with pytest.raises(UnreadableCheckpointError) as info:
        load_checkpoint(folder)
    assert_one_line_unreadable(info.value, folder)
    assert "model.safetensors" in str(info.value)


def test_empty_folder(tmp_path: Path) -> None:
    _unreadable(tmp_path)


def test_folder_with_a_truncated_optimizer_file(tmp_path: Path) -> None:
    (tmp_path / "optimizer.pt").write_bytes((HF_FOLDER / "optimizer.pt").read_bytes()[:3000])
    with pytest.raises(UnreadableCheckpointError) as info:
        load_checkpoint(tmp_path)
    assert "\n" not in str(info.value)


def _cut_points(size: int) -> list[int]:
    # Fixed points where the legacy pickle once broke mid-opcode, and fractions of the size.
    fixed = {1, 4, 9, 16, 18, 28, 30, 64, 500, 1192}
    relative = {size // 4, size // 2, 3 * size // 4, size - 22, size - 2, size - 1}
    return sorted(p for p in fixed | relative if 0 < p < size)


@pytest.mark.parametrize("name", ["adamw_train.pt", "legacy_adam.pt", "adamw_train.safetensors"])
def test_truncated_files_at_chosen_points(tmp_path: Path, name: str) -> None:
    data = (FIXTURES / name).read_bytes()
    for cut in _cut_points(len(data)):
        _unreadable(_write(tmp_path, f"{cut}-{name}", data[:cut]))


@pytest.mark.parametrize(("name", "stride"), [("legacy_adam.pt", 11), ("sgd_momentum_bare.pt", 23)])
def test_truncated_files_at_every_stride(tmp_path: Path, name: str, stride: int) -> None:
    data = (FIXTURES / name).read_bytes()
    path = tmp_path / name
    for cut in range(1, len(data), stride):
        path.write_bytes(data[:cut])
        _unreadable(path)


def test_truncated_safetensors_says_truncated(tmp_path: Path) -> None:
    data = (FIXTURES / "adamw_train.safetensors").read_bytes()
    for cut in (9, 100, len(data) // 2, len(data) - 1):
        path = _write(tmp_path, f"{cut}.safetensors", data[:cut])
        with pytest.raises(UnreadableCheckpointError) as info:
            load_checkpoint(path)
        assert "truncated safetensors" in str(info.value).replace(str(path), "")


@pytest.mark.parametrize("name", ["adamw_train.pt", "legacy_adam.pt"])
def test_corrupt_bytes_never_escape_as_a_traceback(tmp_path: Path, name: str) -> None:
    """A byte changed anywhere either still loads or is one UnreadableCheckpointError."""
    data = (FIXTURES / name).read_bytes()
    rng = random.Random(1)
    path = tmp_path / name
    with warnings.catch_warnings():
        # torch warns about odd pickle protocols in mangled files; not under test here.
        warnings.simplefilter("ignore")
        for _ in range(300):
            changed = bytearray(data)
            changed[rng.randrange(len(data))] = rng.randrange(256)
            path.write_bytes(bytes(changed))
            try:
                load_checkpoint(path)
            except UnreadableCheckpointError as e:
                assert "\n" not in str(e)


# --------------------------------------------------------------------------- safetensors layout


def _tree() -> dict[Any, Any]:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    shared = torch.randn(5)
    return {
        "nested": {"a": {"b": [1, 2.5, "x", {"c": torch.ones(2)}]}},
        "int_keys": {0: "zero", 7: torch.tensor([1, 2]), -1: None},
        "mixed_keys": {0: 1, "a": 2, True: 3, None: 4, (1, 2): 5},
        "tuple": (1, (2, 3), [], ()),
        "list": [1, [2, 3], (), []],
        "none": None,
        "bools": [True, False],
        "floats": [float("nan"), float("inf"), float("-inf"), -0.0, 1e-300, 0.1],
        "big_int": 2**70,
        "dtypes": [torch.bfloat16, torch.float16, torch.int64, torch.bool],
        "device": torch.device("cpu"),
        "bf16": torch.randn(3, 2).to(torch.bfloat16),
        "f16": torch.randn(4).to(torch.float16),
        "f64": torch.randn(2, dtype=torch.float64),
        "i64": torch.tensor([2**62, -1, 0]),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "int_scalar": torch.tensor(7),
        "nan_tensor": torch.tensor([float("nan"), float("-inf"), 1.0]),
        "empty": torch.empty(0, 3),
        "same_a": shared,
        "same_b": shared,
        "view_row": base[0],
        "view_rest": base[1:],
        "transposed": base.t(),
        "strided": base[:, ::2],
        "tag_lookalike": {"__tensor__": "not a tensor"},
        "tuple_lookalike": {"__tuple__": [1, 2]},
        "dotted.key": torch.zeros(2),
        "dotted": {"key": torch.ones(2)},
        "": "empty key",
    }


def test_safetensors_round_trip_is_exact(tmp_path: Path) -> None:
    tree = _tree()
    path = tmp_path / "tree.safetensors"
    write_safetensors(tree, path)
    back = read_safetensors(path)
    assert_same(tree, back)
    assert back["same_a"] is back["same_b"]
    assert load_checkpoint(path).format == "safetensors"
    assert_same(tree, load_checkpoint(path).root)


def test_safetensors_round_trip_does_not_touch_the_tree(tmp_path: Path) -> None:
    tree = _tree()
    before = {k: (v.clone(), v.stride()) for k, v in tree.items() if isinstance(v, torch.Tensor)}
    write_safetensors(tree, tmp_path / "tree.safetensors")
    for k, (value, stride) in before.items():
        assert tree[k].stride() == stride
        assert_same(value, tree[k])
    assert tree["same_a"] is tree["same_b"]


def test_safetensors_file_is_readable_by_safetensors_itself(tmp_path: Path) -> None:
    tree = _tree()
    path = tmp_path / "tree.safetensors"
    write_safetensors(tree, path)
    plain = load_file(str(path))
    assert len(plain) == len({id(t) for t in tensors_of(tree)})  # the shared tensor once
    for key, value in tree.items():
        if isinstance(value, torch.Tensor) and key != "same_b":
            assert_same(value.contiguous(), plain[key])
    assert_same(tree["nested"]["a"]["b"][3]["c"], plain["nested.a.b.3.c"])
    assert_same(tree["int_keys"][7], plain["int_keys.7"])
    # "dotted.key" and dotted -> key share a readable name; the second gets a suffix.
    assert_same(tree["dotted"]["key"], plain["dotted.key#2"])


def _named_optimizer(named: bool) -> tuple[torch.nn.Module, dict[str, Any]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    params = list(model.named_parameters()) if named else list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=0.01)
    model(torch.randn(5, 3)).square().mean().backward()
    optimizer.step()
    return model, optimizer.state_dict()


def test_safetensors_names_optimizer_state_by_param_name(tmp_path: Path) -> None:
    model, state_dict = _named_optimizer(named=True)
    path = tmp_path / "ckpt.safetensors"
    write_safetensors({"model": model.state_dict(), "optimizer": state_dict}, path)
    plain = load_file(str(path))
    for name, param in model.named_parameters():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert f"optimizer.state.{name}.{key}" in plain
        assert plain[f"optimizer.state.{name}.exp_avg"].shape == param.shape
        assert f"model.{name}" in plain
    back = read_safetensors(path)
    assert_same(state_dict, back["optimizer"])


def test_safetensors_names_bare_state_by_id(tmp_path: Path) -> None:
    _, state_dict = _named_optimizer(named=False)
    path = tmp_path / "bare.safetensors"
    write_safetensors(state_dict, path)
    plain = load_file(str(path))
    expected = {f"state.{pid}.{key}" for pid, s in state_dict["state"].items() for key in s}
    assert set(plain) == expected
    for pid, s in state_dict["state"].items():
        for key, value in s.items():
            assert_same(value, plain[f"state.{pid}.{key}"])
    assert_same(state_dict, read_safetensors(path))


def _valid_file(tmp_path: Path) -> tuple[Path, bytes, int]:
    path = tmp_path / "ok.safetensors"
    write_safetensors({"a": torch.arange(4.0), "b": [1, (2, 3)]}, path)
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return path, data, length


def _header(data: bytes, length: int) -> dict[str, Any]:
    return json.loads(data[8 : 8 + length])


def _with_header(header: dict[str, Any], data: bytes, length: int) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + length :]


def test_corrupt_safetensors_header_json(tmp_path: Path) -> None:
    _, data, length = _valid_file(tmp_path)
    garbled = data[:9] + b"\xff" * (length - 1) + data[8 + length :]
    _unreadable(_write(tmp_path, "garbled.safetensors", garbled))


def test_safetensors_header_longer_than_the_file(tmp_path: Path) -> None:
    _, data, _ = _valid_file(tmp_path)
    _unreadable(_write(tmp_path, "long.safetensors", struct.pack("<Q", len(data)) + data[8:]))


def test_safetensors_entry_without_offsets(tmp_path: Path) -> None:
    _, data, length = _valid_file(tmp_path)
    header = _header(data, length)
    name = next(k for k in header if k != "__metadata__")
    del header[name]["data_offsets"]
    _unreadable(_write(tmp_path, "entry.safetensors", _with_header(header, data, length)))


def test_safetensors_entry_with_wrong_size(tmp_path: Path) -> None:
    _, data, length = _valid_file(tmp_path)
    header = _header(data, length)
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [5]
    _unreadable(_write(tmp_path, "size.safetensors", _with_header(header, data, length)))


def test_safetensors_tree_naming_a_missing_tensor(tmp_path: Path) -> None:
    _, data, length = _valid_file(tmp_path)
    header = _header(data, length)
    header["__metadata__"][TREE_KEY] = json.dumps({"a": {"__tensor__": "nowhere"}})
    _unreadable(_write(tmp_path, "tree.safetensors", _with_header(header, data, length)))


def test_safetensors_tree_that_is_not_json(tmp_path: Path) -> None:
    _, data, length = _valid_file(tmp_path)
    header = _header(data, length)
    header["__metadata__"][TREE_KEY] = "{not json"
    _unreadable(_write(tmp_path, "tree.safetensors", _with_header(header, data, length)))


def test_plain_safetensors_file_reads_as_its_tensors(tmp_path: Path) -> None:
    checkpoint = load_checkpoint(HF_FOLDER / "model.safetensors")
    assert checkpoint.format == "safetensors"
    assert_same(load_file(str(HF_FOLDER / "model.safetensors")), checkpoint.root)
