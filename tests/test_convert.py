"""convert: .pt <-> .safetensors round trips are exact; Adam <-> AdamW loads into torch unchanged."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from checks import (
    assert_bitwise_equal,
    assert_one_line_error,
    convert_without_torch,
    run,
    saved_devices,
    torch_zip_bytes,
    trained_adam,
)
from torch import nn

from optckpt.convert import convert_checkpoint, retarget
from optckpt.diff import diff_checkpoints
from optckpt.errors import IncompatibleStateError, UnreadableCheckpointError, UsageError
from optckpt.io import load_checkpoint
from optckpt.io.rewrite import Rewrite

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
FILES = [
    "adamw_train.pt",
    "adamw_train.safetensors",
    "sgd_momentum_bare.pt",
    "lightning.ckpt",
    "legacy_adam.pt",
    "cuda_adam.pt",
    "hf_trainer/checkpoint-2/optimizer.pt",
]


def same(a: Any, b: Any) -> bool:
    """Exact equality: same container types (an OrderedDict with the same attributes, its
    ``_metadata``), same keys in order, tensors bitwise with dtype."""
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(
                a.view(torch.uint8) if a.dtype.itemsize == 1 else a,
                b.view(torch.uint8) if b.dtype.itemsize == 1 else b,
            )
        )
    if isinstance(a, dict):
        return (
            type(b) is type(a)
            and getattr(a, "__dict__", {}) == getattr(b, "__dict__", {})
            and list(a) == list(b)
            and all(same(a[k], b[k]) for k in a)
        )
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _load(path: Path) -> Any:
    if path.suffix == ".safetensors":
        from optckpt.io import load_checkpoint

        return load_checkpoint(path).root
    return torch.load(path, weights_only=True, map_location="cpu")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", FILES)
def test_round_trip_is_exact(tmp_path: Path, name: str) -> None:
    source = FIXTURES / name
    before = _digest(source)
    there = tmp_path / ("there.pt" if source.suffix == ".safetensors" else "there.safetensors")
    back = tmp_path / ("back.safetensors" if source.suffix == ".safetensors" else "back.pt")
    convert_checkpoint(source, there)
    convert_checkpoint(there, back)
    assert same(_load(source), _load(back))
    for other in (there, back):
        report = diff_checkpoints(source, other)
        # saved devices too: a CUDA checkpoint's tensors stay tagged cuda:0 both ways
        assert report.ok, [d for p in report.pairs for d in p.differences]
    assert _digest(source) == before


def test_cuda_checkpoint_keeps_its_saved_devices_both_ways(tmp_path: Path) -> None:
    """safetensors records the devices (metadata ``optckpt.devices``); .pt writes them back."""
    source = load_checkpoint(FIXTURES / "cuda_adam.pt")
    convert_checkpoint(FIXTURES / "cuda_adam.pt", tmp_path / "there.safetensors")
    convert_checkpoint(tmp_path / "there.safetensors", tmp_path / "back.pt")
    expected = saved_devices(source)
    assert set(expected.values()) == {"cpu", "cuda:0"}  # the steps, and the rest
    for name in ("there.safetensors", "back.pt"):
        converted = load_checkpoint(tmp_path / name)
        assert saved_devices(converted) == expected, name
    # torch itself sees the tags: without CUDA, loading the result needs a map_location
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "back.pt", weights_only=True)


def test_exotic_values_survive(tmp_path: Path) -> None:
    w = torch.randn(4, 6)
    tree = {
        "model": {
            "w": w,
            "w_t": w.t(),
            "tied": w,
            "half": torch.randn(3).half(),
            "bf": torch.randn(3).bfloat16(),
        },
        "optimizer": {
            "state": {
                0: {
                    "step": torch.tensor(7.0),
                    "exp_avg": torch.randn(4, 6),
                    "count": torch.arange(3),
                },
                2: {"step": 5, "note": "kept", "nested": [torch.ones(2), (1, 2.5)]},
            },
            "param_groups": [
                {
                    "params": [0, 1],
                    "lr": torch.tensor(0.01),
                    "betas": (0.9, 0.95),
                    "eps": float("inf"),
                    "x": None,
                },
                {"params": [2], "lr": 1e-3, "betas": (0.8, 0.9), "eps": float("nan"), "x": True},
            ],
        },
        "epoch": 4,
        "scheduler": {"last_epoch": 3, "_last_lr": [0.1, 0.2], "dtype": torch.float16},
    }
    src = tmp_path / "src.pt"
    torch.save(tree, src)
    convert_checkpoint(src, tmp_path / "x.safetensors")
    convert_checkpoint(tmp_path / "x.safetensors", tmp_path / "back.pt")
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    nan = back["optimizer"]["param_groups"][1].pop("eps")
    tree["optimizer"]["param_groups"][1].pop("eps")
    assert nan != nan
    assert same(tree, back)
    # the same tensor twice stays one tensor; a view of it becomes its own tensor
    assert back["model"]["w"] is back["model"]["tied"]
    assert torch.equal(back["model"]["w_t"], w.t())


def _adam_pair() -> tuple[nn.Module, torch.optim.Adam]:
    return trained_adam(lambda: nn.Linear(4, 3), 3, weight_decay=0.1)


def test_adam_to_adamw_loads_into_torch_adamw_with_identical_state(tmp_path: Path) -> None:
    model, adam = _adam_pair()
    src = tmp_path / "adam.pt"
    torch.save({"optimizer": adam.state_dict()}, src)
    result = convert_checkpoint(src, tmp_path / "adamw.pt", optimizer="adamw")
    assert result.rewritten == ["optimizer"]
    converted = torch.load(tmp_path / "adamw.pt", weights_only=True)["optimizer"]
    adamw = torch.optim.AdamW(model.parameters())
    adamw.load_state_dict(converted)
    assert adamw.param_groups[0]["decoupled_weight_decay"] is True
    for p in model.parameters():
        for k, v in adam.state[p].items():
            assert torch.equal(adamw.state[p][k], v)
    # a step now decays the weights the AdamW way: same as a reference AdamW built that way
    reference = torch.optim.Adam(
        model.parameters(), lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True
    )
    reference.load_state_dict(adam.state_dict())
    reference.param_groups[0]["decoupled_weight_decay"] = True
    assert {k: v for k, v in adamw.param_groups[0].items() if k != "params"} == {
        k: v for k, v in reference.param_groups[0].items() if k != "params"
    }


def test_adamw_back_to_adam(tmp_path: Path) -> None:
    converted = retarget(
        torch.load(FIXTURES / "adamw_train.pt", weights_only=True)["optimizer"], "Adam"
    )
    assert all(g["decoupled_weight_decay"] is False for g in converted["param_groups"])


def test_incompatible_target_lists_compatible_ones(tmp_path: Path) -> None:
    with pytest.raises(IncompatibleStateError, match="compatible targets: AdamW"):
        convert_checkpoint(FIXTURES / "legacy_adam.pt", tmp_path / "x.pt", optimizer="sgd")
    with pytest.raises(IncompatibleStateError, match="compatible targets: none"):
        convert_checkpoint(FIXTURES / "sgd_momentum_bare.pt", tmp_path / "x.pt", optimizer="adam")
    assert list(tmp_path.iterdir()) == []


def test_refuses_folder_and_key_without_optimizer(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="folder"):
        convert_checkpoint(FIXTURES / "hf_trainer" / "checkpoint-2", tmp_path / "x.pt")
    with pytest.raises(UsageError, match="--optimizer"):
        convert_checkpoint(FIXTURES / "adamw_train.pt", tmp_path / "x.pt", key="optimizer")


# --------------------------------------------------------------------------- byte copies

_ALL = sorted(
    str(p.relative_to(FIXTURES))
    for p in FIXTURES.rglob("*")
    if p.suffix in (".pt", ".ckpt", ".safetensors") and p.name != "unsafe_namespace.pt"
)


@pytest.mark.parametrize("name", _ALL)
def test_to_safetensors_copies_bytes_and_writes_what_torch_path_writes(
    name: str, tmp_path: Path
) -> None:
    """Read without torch (tensors described, bytes copied from file to file) or through
    torch: the same file, byte for byte."""
    described, loaded = tmp_path / "d.safetensors", tmp_path / "t.safetensors"
    convert_checkpoint(FIXTURES / name, described, describe=True)
    convert_checkpoint(FIXTURES / name, loaded, describe=False)
    assert described.read_bytes() == loaded.read_bytes()


def test_views_that_are_not_contiguous_go_through_torch(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    src = tmp_path / "views.pt"
    # a transposed view, a slice inside a storage, and the whole storage
    torch.save({"t": base.t(), "rows": base[1:3], "all": base}, src)
    described, loaded = tmp_path / "d.safetensors", tmp_path / "t.safetensors"
    convert_checkpoint(src, described, describe=True)
    convert_checkpoint(src, loaded, describe=False)
    assert described.read_bytes() == loaded.read_bytes()
    back = load_checkpoint(described).root
    assert torch.equal(back["t"], base.t()) and torch.equal(back["rows"], base[1:3])


def test_contiguous_slices_are_copied_without_torch(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    src = tmp_path / "slices.pt"
    torch.save({"rows": base[1:3], "all": base, "step": torch.tensor(3.0)}, src)
    out = tmp_path / "out.safetensors"
    convert_without_torch(src, out)
    back = load_checkpoint(out).root
    assert torch.equal(back["rows"], base[1:3]) and torch.equal(back["all"], base)
    assert back["step"].item() == 3.0


@pytest.mark.parametrize("name", _ALL)
@pytest.mark.parametrize("copied", [False, True])
def test_to_pt_copies_bytes_and_writes_what_torch_save_writes(
    name: str, copied: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A .pt output from a described tree, without torch, is the torch path's file (which is
    torch.save's where nothing is placed on a device), byte for byte but for the
    serialization id; storages read in place (small ones) or copied in the kernel with
    their CRC32 from the checksum thread (``copied``: every one) alike."""
    if copied:
        monkeypatch.setattr("optckpt.io.zip_writer._SMALL", 0)
    described, loaded = tmp_path / "d.pt", tmp_path / "t.pt"
    convert_checkpoint(FIXTURES / name, described, describe=True)
    convert_checkpoint(FIXTURES / name, loaded, describe=False)
    assert torch_zip_bytes(described) == torch_zip_bytes(loaded)
    cpu = {"weights_only": True, "map_location": "cpu"}
    assert_bitwise_equal(torch.load(described, **cpu), torch.load(loaded, **cpu))


def _every_kind_of_tensor() -> dict[str, Any]:
    """What torch.save writes through each rebuild: views, shared storage, parameters, the
    dtypes of _rebuild_tensor_v2 and _v3, empty and 0-dim tensors, an OrderedDict with
    attributes (a module's state_dict)."""
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = nn.Linear(3, 2).state_dict()
    tree: dict[str, Any] = {
        "t": base.t(), "rows": base[1:3], "all": base, "again": base,
        "param": nn.Parameter(torch.ones(3)), "frozen": nn.Parameter(torch.ones(2), False),
        "empty": torch.empty(0, 5), "scalar": torch.tensor(2.5, dtype=torch.float64),
        "state": state, "nested": [(torch.zeros(2, dtype=torch.int8), 3), {"x": None}],
        "big": torch.randn(700, 700, generator=torch.Generator().manual_seed(0)),
    }  # fmt: skip
    tree["big_rows"] = tree["big"][100:]  # a view into a storage copied in the kernel
    for dtype in (torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.int16,
                  torch.uint8, torch.bool, torch.complex64, torch.complex128, torch.uint16,
                  torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2):  # fmt: skip
        tree[str(dtype)] = torch.arange(6).reshape(2, 3).to(dtype)[:, 1:]
    return tree


def test_to_pt_without_torch_writes_every_kind_of_tensor_as_torch_save(tmp_path: Path) -> None:
    src = tmp_path / "src.pt"
    tree = _every_kind_of_tensor()
    torch.save(tree, src)
    reference = tmp_path / "reference.pt"
    with reference.open("wb") as f:  # to a file object, torch names the zip's folder "archive"
        torch.save(torch.load(src, weights_only=True), f)
    out = tmp_path / "out.pt"
    convert_checkpoint(src, out)
    assert torch_zip_bytes(out) == torch_zip_bytes(reference)
    back = torch.load(out, weights_only=True)
    assert_bitwise_equal(back, tree)
    assert back["again"].untyped_storage().data_ptr() == back["all"].untyped_storage().data_ptr()
    assert back["t"].stride() == (1, 6) and back["rows"].storage_offset() == 6
    assert isinstance(back["param"], nn.Parameter) and back["param"].requires_grad
    assert not back["frozen"].requires_grad
    assert back["state"]._metadata == tree["state"]._metadata


def test_to_pt_imports_no_torch(tmp_path: Path) -> None:
    src = tmp_path / "src.pt"
    tree = _every_kind_of_tensor()
    torch.save(tree, src)
    out = tmp_path / "out.pt"
    convert_without_torch(src, out)
    assert_bitwise_equal(torch.load(out, weights_only=True), tree)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("size", [1000, 300_000])
def test_an_input_cut_short_while_it_is_copied_is_refused(
    suffix: str, size: int, tmp_path: Path
) -> None:
    """A file cut short while it is copied is an unreadable input, and nothing is left
    behind: reading its mapping past the new end would kill the process with SIGBUS,
    leaving the temporary output. Small storages are read in place; large ones copied in
    the kernel, checksummed in a second thread."""
    src = tmp_path / "src.pt"
    torch.save({"a": torch.ones(size), "b": torch.ones(size)}, src)

    def progress(total: int) -> Any:
        return lambda n: os.truncate(src, min(3000, src.stat().st_size))

    with pytest.raises(UnreadableCheckpointError, match=r"src\.pt: changed while being copied"):
        convert_checkpoint(src, tmp_path / f"out{suffix}", progress=progress)
    assert list(tmp_path.iterdir()) == [src]


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("renamed", [True, False])
def test_an_input_saved_over_after_it_was_read_is_refused(
    suffix: str, renamed: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trainer saving its next checkpoint over the input after it was read, renamed over
    it before the copy or saved in place during the copy: the bytes copied from the path
    would be the new file's under the old tree (a file that loads, with other values), so
    it is refused, and nothing is left behind."""
    src = tmp_path / "src.pt"
    torch.save({"a": torch.full((300_000,), 1.0), "b": torch.full((300_000,), 1.0)}, src)
    saved = []

    def save_next(path: Path) -> None:
        if not saved:
            torch.save(
                {"a": torch.full((300_000,), 2.0), "b": torch.ones(300_000), "step": 2}, path
            )
            saved.append(path)

    save = Rewrite.save

    def rename_next_then_save(self: Rewrite, *args: Any) -> None:
        save_next(tmp_path / "next.pt")
        os.replace(tmp_path / "next.pt", src)
        save(self, *args)

    def progress(total: int) -> Any:
        return lambda n: save_next(src)

    if renamed:
        monkeypatch.setattr(Rewrite, "save", rename_next_then_save)
    # saved in place, the checksum thread may meet the file while torch.save has it emptied
    changed = "since it was read" if renamed else "(since it was read|while being copied)"
    with pytest.raises(UnreadableCheckpointError, match=rf"src\.pt: changed {changed}"):
        convert_checkpoint(src, tmp_path / f"out{suffix}", progress=progress)
    assert list(tmp_path.iterdir()) == [src]


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_sparse_tensors_convert_to_pt_and_are_refused_by_safetensors(tmp_path: Path) -> None:
    """A sparse tensor has no storage: a .pt keeps it (torch pickles its parts), safetensors
    cannot hold it (exit 2, nothing written) -- both crashed before (exit 70)."""
    src = tmp_path / "sparse.pt"
    tree = {"s": torch.eye(3).to_sparse(), "c": torch.eye(2).to_sparse_csr(), "d": torch.ones(2)}
    torch.save(tree, src)
    out = tmp_path / "out.pt"
    convert_checkpoint(src, out)
    back = torch.load(out, weights_only=True)
    assert back["s"].layout == torch.sparse_coo and back["c"].layout == torch.sparse_csr
    assert torch.equal(back["s"].to_dense(), tree["s"].to_dense())
    assert torch.equal(back["c"].to_dense(), tree["c"].to_dense())
    result = run("convert", src, "-o", tmp_path / "out.safetensors")
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, "cannot store s in safetensors: a sparse_coo tensor")
    assert not (tmp_path / "out.safetensors").exists()
