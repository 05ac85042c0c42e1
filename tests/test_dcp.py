"""optckpt.io.dcp: reading DCP folders safely (metadata, bytes entries, chunks, both key
flattenings), assembling sharded tensors, writing DCP folders with torch's writer.

Folders come from ``torch.distributed.checkpoint.save`` in this process (no process group),
or are built by :func:`write_folder` from torch's own metadata classes where a test needs
what one process cannot save (shards of one tensor in two files, no ``planner_data``). Real
multi-rank producers (FSDP2) are in ``tests/real/test_dcp_real.py``.
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from checks import (
    assert_same_bits,
    dcp_as_torch_reads_it,
    flat_optimizer_state,
    run,
    step_by_recipe,
)
from torch import nn

from optckpt.errors import UnreadableCheckpointError, UnsafeCheckpointError, UsageError
from optckpt.io.dcp import is_dcp, read_dcp, sharded_state_error
from optckpt.io.dcp.scan import BadPickle, scan
from optckpt.io.dcp.tensors import Assembled
from optckpt.io.dcp.writer import check_output_folder, name_keyed_tree, wants_dcp, write_dcp
from optckpt.io.write import save_checkpoint
from optckpt.names import is_name_keyed, name_parameters, to_name_keyed

# dcp.save without a process group warns that it assumes one process
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _trained(steps: int = 3, *, skip: bool = True) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.Linear(3, 2))
    model[0].bias.requires_grad_(False)  # frozen: in the groups, never any state
    optimizer = torch.optim.AdamW(
        [
            {"params": [model[0].weight, model[0].bias, model[2].weight], "weight_decay": 0.1},
            {"params": [model[2].bias, model[3].weight, model[3].bias], "weight_decay": 0.0},
        ],
        lr=1e-3,
    )
    for _ in range(steps):
        model(torch.randn(2, 4)).pow(2).sum().backward()
        if skip:
            model[3].weight.grad = None  # never stepped: no state
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def _save_real(folder: Path, *, flatten: bool) -> dict[str, Any]:
    """dcp.save of get_state_dict's model and optimizer, a scheduler and extra values."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model, optimizer = _trained()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    with warnings.catch_warnings():  # created after the optimizer stepped: it warns
        warnings.simplefilter("ignore")
        scheduler.step()
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    msd, osd = get_state_dict(model, optimizer, options=options)
    state = {
        "model": msd,
        "optim": osd,
        "scheduler": scheduler.state_dict(),
        "extra": {"epoch": 3, "note": "hi"},
    }
    dcp.save(state, checkpoint_id=str(folder))
    return state


@pytest.mark.parametrize("flatten", [False, True], ids=["default", "flattened"])
def test_read_equals_dcp_to_torch_save_by_name_and_bitwise(tmp_path: Path, flatten: bool) -> None:
    folder = tmp_path / "ckpt"
    saved = _save_real(folder, flatten=flatten)
    assert is_dcp(folder)
    checkpoint = read_dcp(folder)
    reference = dcp_as_torch_reads_it(folder, tmp_path)
    assert checkpoint.format == "dcp"
    root = checkpoint.root
    assert set(root) == {"model", "optim", "scheduler", "extra"}
    assert_same_bits(root["model"], reference["model"])
    assert_same_bits(flat_optimizer_state(root["optim"]), flat_optimizer_state(reference["optim"]))
    assert root["scheduler"] == reference["scheduler"]
    assert root["extra"] == {"epoch": 3, "note": "hi"}
    # name-keyed, as get_optimizer_state_dict returns it: the same groups, frozen and
    # never-stepped parameters listed without state
    optim = root["optim"]
    assert is_name_keyed(optim)
    assert [g["params"] for g in optim["param_groups"]] == [
        ["0.weight", "0.bias", "2.weight"],
        ["2.bias", "3.weight", "3.bias"],
    ]
    assert "0.bias" not in optim["state"] and "3.weight" not in optim["state"]
    assert [g["weight_decay"] for g in optim["param_groups"]] == [0.1, 0.0]
    assert optim["param_groups"][0]["lr"] == pytest.approx(1e-3)
    if not flatten:
        assert optim["param_groups"] == saved["optim"]["param_groups"]


def test_meta_mode_reads_no_tensor_data_but_steps(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    _save_real(folder, flatten=False)
    meta = read_dcp(folder, tensors="meta")
    loaded = read_dcp(folder)
    exp_avg = meta.root["optim"]["state"]["2.weight"]["exp_avg"]
    assert exp_avg.device.type == "meta" and exp_avg.shape == (3, 5)
    step = meta.root["optim"]["state"]["2.weight"]["step"]
    assert step.device.type == "cpu" and step.item() == 3  # 0-dim: read for the report
    assert torch.equal(meta.real(exp_avg), loaded.root["optim"]["state"]["2.weight"]["exp_avg"])
    layout = meta.layout_of(exp_avg)
    assert layout is not None and layout.chunks == 1 and layout.files == ["__0_0.distcp"]
    assert meta.saved_device(exp_avg) is None  # DCP records no device


# --------------------------------------------------------------------------- handmade folders


def write_folder(
    folder: Path,
    tensors: dict[str, list[tuple[tuple[int, ...], torch.Tensor, str]]],
    values: dict[str, tuple[Any, str]],
    *,
    sizes: dict[str, tuple[int, ...]] | None = None,
    planner_data: dict[str, tuple[Any, ...]] | None = None,
    metadata: Any = None,
) -> None:
    """A DCP folder as FileSystemWriter lays it out: each value and chunk a torch.save zip
    appended to its file, ``.metadata`` pickled from torch's own classes."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    folder.mkdir()
    blobs: dict[str, bytearray] = {}
    entries: dict[str, Any] = {}
    storage: dict[Any, Any] = {}

    def put(file: str, obj: Any) -> tuple[int, int]:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        data = blobs.setdefault(file, bytearray())
        offset = len(data)
        data += buffer.getvalue()
        return offset, len(data) - offset

    for key, (value, file) in values.items():
        entries[key] = BytesStorageMetadata()
        storage[MetadataIndex(key)] = _StorageInfo(file, *put(file, value))
    for key, chunks in tensors.items():
        chunk_meta = []
        for offsets, tensor, file in chunks:
            storage[MetadataIndex(key, torch.Size(offsets))] = _StorageInfo(
                file, *put(file, tensor.clone())
            )
            chunk_meta.append(ChunkStorageMetadata(torch.Size(offsets), tensor.shape))
        size = (sizes or {}).get(key) or tuple(
            max(o[d] + t.shape[d] for o, t, _ in chunks) for d in range(chunks[0][1].dim())
        )
        entries[key] = TensorStorageMetadata(
            TensorProperties(dtype=chunks[0][1].dtype), torch.Size(size), chunk_meta
        )
    for file, data in blobs.items():
        (folder / file).write_bytes(bytes(data))
    meta = metadata or Metadata(entries, planner_data, storage)
    (folder / ".metadata").write_bytes(pickle.dumps(meta))


def _sharded(folder: Path, *, planner: bool = True, flatten: bool = False) -> dict[str, Any]:
    """Two ranks' files: a 5-row weight sharded 3 + 2, its moments likewise, the replicated
    step saved once, in rank 1's file; a bias whole in rank 0's. Returns the whole tensors."""
    weight = torch.randn(5, 4)
    exp_avg, exp_avg_sq = torch.randn(5, 4), torch.rand(5, 4)
    bias = torch.randn(3)
    step = torch.tensor(7.0)

    def shards(t: torch.Tensor) -> list[tuple[tuple[int, ...], torch.Tensor, str]]:
        return [((0, 0), t[:3], "__0_0.distcp"), ((3, 0), t[3:], "__1_0.distcp")]

    state = "optim.state.enc.layer.weight"
    tensors = {
        "model.enc.layer.weight": shards(weight),
        "model.head.bias": [((0,), bias, "__0_0.distcp")],
        f"{state}.exp_avg": shards(exp_avg),
        f"{state}.exp_avg_sq": shards(exp_avg_sq),
        f"{state}.step": [((), step, "__1_0.distcp")],
    }
    hyper = {"lr": 0.01, "betas": (0.9, 0.999), "weight_decay": 0.0}
    if flatten:
        values = {
            f"optim.param_groups.{fqn}.{k}": (v, "__1_0.distcp")
            for fqn in ("enc.layer.weight", "head.bias")
            for k, v in hyper.items()
        }
    else:
        values = {f"optim.param_groups.0.{k}": (v, "__1_0.distcp") for k, v in hyper.items()}
        values["optim.param_groups.0.params"] = (["enc.layer.weight", "head.bias"], "__1_0.distcp")
    planner_data = None
    if planner:
        planner_data = {}
        for key in [*tensors, *values]:
            top, rest = key.split(".", 1)
            if flatten or top == "model":
                planner_data[key] = (top, rest)
            elif rest.startswith("state."):
                planner_data[key] = (
                    top,
                    "state",
                    rest[6:].rsplit(".", 1)[0],
                    rest.rsplit(".", 1)[1],
                )
            else:
                _, index, name = rest.split(".")
                planner_data[key] = (top, "param_groups", int(index), name)
    write_folder(folder, tensors, values, planner_data=planner_data)
    return {
        "weight": weight,
        "exp_avg": exp_avg,
        "exp_avg_sq": exp_avg_sq,
        "bias": bias,
        "step": step,
    }


@pytest.mark.parametrize("planner", [True, False], ids=["planner_data", "no_planner_data"])
@pytest.mark.parametrize("flatten", [False, True], ids=["default", "flattened"])
def test_uneven_shards_assembled_and_replicated_step_found(
    tmp_path: Path, planner: bool, flatten: bool
) -> None:
    whole = _sharded(tmp_path / "ckpt", planner=planner, flatten=flatten)
    for tensors in ("load", "meta", "lazy"):
        checkpoint = read_dcp(tmp_path / "ckpt", tensors=tensors)  # type: ignore[arg-type]
        root = checkpoint.root
        state = root["optim"]["state"]["enc.layer.weight"]

        def real(value: Any, checkpoint: Any = checkpoint) -> torch.Tensor:
            if isinstance(value, Assembled):
                return value.materialize()
            return checkpoint.real(value)

        assert torch.equal(real(root["model"]["enc.layer.weight"]), whole["weight"])
        assert torch.equal(real(root["model"]["head.bias"]), whole["bias"])
        assert torch.equal(real(state["exp_avg"]), whole["exp_avg"])
        assert torch.equal(real(state["exp_avg_sq"]), whole["exp_avg_sq"])
        assert torch.equal(real(state["step"]), whole["step"])
        groups = root["optim"]["param_groups"]
        assert groups == [
            {"lr": 0.01, "betas": (0.9, 0.999), "weight_decay": 0.0,
             "params": ["enc.layer.weight", "head.bias"]}
        ]  # fmt: skip
    layout = read_dcp(tmp_path / "ckpt", tensors="meta").layouts["model.enc.layer.weight"]
    assert layout.chunks == 2 and layout.files == ["__0_0.distcp", "__1_0.distcp"]


def test_lazy_assembly_streams_into_torch_and_safetensors_files(tmp_path: Path) -> None:
    whole = _sharded(tmp_path / "ckpt")
    checkpoint = read_dcp(tmp_path / "ckpt", tensors="lazy")
    assert isinstance(checkpoint.root["optim"]["state"]["enc.layer.weight"]["exp_avg"], Assembled)
    save_checkpoint(checkpoint.root, tmp_path / "out.pt", "pt", sources=checkpoint.sources)
    back = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.equal(back["optim"]["state"]["enc.layer.weight"]["exp_avg"], whole["exp_avg"])
    assert torch.equal(back["model"]["enc.layer.weight"], whole["weight"])
    checkpoint = read_dcp(tmp_path / "ckpt", tensors="lazy")
    save_checkpoint(checkpoint.root, tmp_path / "out.st", "safetensors", sources=checkpoint.sources)
    from optckpt.io.safetensors_format import read_safetensors

    back = read_safetensors(tmp_path / "out.st")
    assert torch.equal(
        back["optim"]["state"]["enc.layer.weight"]["exp_avg_sq"], whole["exp_avg_sq"]
    )


# --------------------------------------------------------------------------- unsafe input


class _Evil:
    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.canary}",))


def test_metadata_with_code_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    write_folder(tmp_path / "ckpt", {}, {"x": (1, "__0_0.distcp")})
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps({"a": _Evil(canary)}))
    with pytest.raises(UnsafeCheckpointError) as raised:
        read_dcp(tmp_path / "ckpt", allow_globals=[])
    assert "posix.system" in str(raised.value) and "run code" in str(raised.value)
    assert raised.value.unsafe_globals == ["posix.system"]
    assert not canary.exists()


def test_code_deep_inside_real_metadata_is_refused(tmp_path: Path) -> None:
    from torch.distributed.checkpoint.metadata import Metadata

    canary = tmp_path / "canary"
    write_folder(tmp_path / "ckpt", {}, {}, metadata=Metadata({"x": _Evil(canary)}))  # type: ignore[dict-item]
    with pytest.raises(UnsafeCheckpointError, match=r"posix\.system"):
        read_dcp(tmp_path / "ckpt")
    assert not canary.exists()


def test_value_with_code_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    write_folder(tmp_path / "ckpt", {}, {"extra.x": (_Evil(canary), "__0_0.distcp")})
    with pytest.raises(UnsafeCheckpointError, match=r"posix\.system"):
        read_dcp(tmp_path / "ckpt")
    assert not canary.exists()


def test_other_globals_are_refused_unless_allowed(tmp_path: Path) -> None:
    from collections import OrderedDict

    from torch.distributed.checkpoint.metadata import Metadata

    folder = tmp_path / "ckpt"
    # planner_data as an OrderedDict: a global outside the allow-list, harmless if allowed
    write_folder(folder, {}, {}, metadata=Metadata({}, OrderedDict(), {}))
    with pytest.raises(UnsafeCheckpointError) as raised:
        read_dcp(folder)
    assert "--allow-global collections.OrderedDict" in str(raised.value)
    assert read_dcp(folder, allow_globals=["collections.OrderedDict"]).root == {}
    with pytest.raises(UsageError, match="never lets a checkpoint call it"):
        read_dcp(folder, allow_globals=["os.system"])


def test_nesting_that_would_crash_the_unpickler_is_refused(tmp_path: Path) -> None:
    deep = b"\x80\x04" + b")" + b"\x85" * 100_000 + b"K\x01\x86}\x94(h\x00K\x01u."
    with pytest.raises(BadPickle, match="levels deep"):
        scan(deep)
    write_folder(tmp_path / "ckpt", {}, {})
    (tmp_path / "ckpt" / ".metadata").write_bytes(
        b"\x80\x04}(" + b")" + b"\x85" * 100_000 + b"K\x01u."
    )
    with pytest.raises(UnreadableCheckpointError, match="levels deep"):
        read_dcp(tmp_path / "ckpt")


def test_scan_names_globals_of_stack_global_exactly() -> None:
    from torch.distributed.checkpoint.metadata import Metadata

    assert scan(pickle.dumps(Metadata({}), protocol=4)) == [
        "torch.distributed.checkpoint.metadata.Metadata"
    ]


def _break(folder: Path, key: str, **changes: Any) -> None:
    """Rewrite where .metadata says ``key``'s first chunk is."""
    import dataclasses

    from torch.distributed.checkpoint.filesystem import _StorageInfo

    meta = pickle.loads((folder / ".metadata").read_bytes())
    index = next(i for i in meta.storage_data if i.fqn == key)
    info: _StorageInfo = meta.storage_data[index]
    meta.storage_data[index] = dataclasses.replace(info, **changes)
    (folder / ".metadata").write_bytes(pickle.dumps(meta))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"relative_path": "../outside.distcp"}, "not a file of the folder"),
        ({"relative_path": "__9_0.distcp"}, "is missing"),
        ({"offset": 10**9}, "truncated"),
        ({"offset": 1}, "not a torch.save zip"),
        ({"length": 100}, "corrupt torch.save zip"),
        ({"transform_descriptors": ["stream.zstd"]}, "storage extension"),
    ],
)
def test_bad_storage_references_are_refused(tmp_path: Path, change: Any, message: str) -> None:
    folder = tmp_path / "ckpt"
    _sharded(folder)
    (tmp_path / "outside.distcp").write_bytes(b"secret")
    _break(folder, "model.enc.layer.weight", **change)
    with pytest.raises(UnreadableCheckpointError, match=message):
        read_dcp(folder)


@pytest.mark.parametrize(
    ("chunks", "message"),
    [
        pytest.param([((0, 0), 2), ((2, 0), 1)], "chunks hold 6 elements", id="gap"),
        pytest.param([((0, 0), 3), ((2, 0), 1)], "overlap", id="overlap"),
        pytest.param([((3, 0), 2)], "outside the tensor", id="outside"),
    ],
)
def test_chunks_that_do_not_tile_their_tensor_are_refused(
    tmp_path: Path, chunks: list[tuple[tuple[int, int], int]], message: str
) -> None:
    # a (4, 2) tensor saved as chunks of `rows` rows of ones at `offset`
    t = torch.ones(4, 2)
    saved = [(offset, t[:rows], "a.distcp") for offset, rows in chunks]
    write_folder(tmp_path / "ckpt", {"w": saved}, {}, sizes={"w": (4, 2)})
    with pytest.raises(UnreadableCheckpointError, match=message):
        read_dcp(tmp_path / "ckpt", tensors="meta")


def test_a_chunk_that_is_not_its_metadata_is_refused(tmp_path: Path) -> None:
    write_folder(tmp_path / "ckpt", {"w": [((0,), torch.ones(3), "a.distcp")]}, {})
    meta = pickle.loads((tmp_path / "ckpt" / ".metadata").read_bytes())
    meta.state_dict_metadata["w"].properties.dtype = torch.float64
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(UnreadableCheckpointError, match=r"holds a torch.float32 tensor"):
        read_dcp(tmp_path / "ckpt")


def test_sharded_state_error() -> None:
    names = ["torch.distributed.tensor.DTensor", "torch.distributed.device_mesh.DeviceMesh"]
    error = sharded_state_error(Path("x.pt"), names)
    assert error is not None and error.unsafe_globals == names
    message = str(error)
    assert "DTensor" in message and "full_state_dict=True" in message and "DCP" in message
    assert "--allow-global" not in message
    assert sharded_state_error(Path("x.pt"), ["collections.OrderedDict"]) is None


# --------------------------------------------------------------------------- writing


def test_written_folder_restores_with_dcp_load_and_set_state_dict(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    # every trainable parameter stepped: set_state_dict wants state for each
    model, optimizer = _trained(skip=False)
    tree = {"model": model.state_dict(), "optim": optimizer.state_dict(), "epoch": 3}
    names = {id(p): n for n, p in model.named_parameters()}
    ids = {pid: names[id(p)] for g in optimizer.param_groups for pid, p in zip(
        [i for g2 in optimizer.state_dict()["param_groups"] for i in g2["params"]],
        [p for g2 in optimizer.param_groups for p in g2["params"]],
    )}  # fmt: skip
    assert name_keyed_tree(tree, lambda sd: to_name_keyed(sd, ids)) == ["optim"]
    out = tmp_path / "out"
    check_output_folder(out, [], force=False)
    write_dcp(tree, out)
    assert is_dcp(out) and [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary left

    fresh, fresh_optimizer = _trained(steps=1, skip=False)
    msd, osd = get_state_dict(fresh, fresh_optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(out))
    set_state_dict(
        fresh, fresh_optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name
        for key, value in optimizer.state[p].items():
            assert torch.equal(value, fresh_optimizer.state[q][key]), (name, key)
    fresh(torch.randn(2, 4)).sum().backward()
    fresh_optimizer.step()  # a step runs
    assert read_dcp(out).root["epoch"] == 3


def test_write_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed.checkpoint as dcp

    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dcp, "save", broken)
    with pytest.raises(OSError, match="No space left"):
        write_dcp({"x": torch.ones(2)}, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_output_folder_checks(tmp_path: Path) -> None:
    _sharded(tmp_path / "ckpt")
    (tmp_path / "empty").mkdir()
    check_output_folder(tmp_path / "empty", [], force=False)
    with pytest.raises(UsageError, match="--force"):
        check_output_folder(tmp_path / "ckpt", [], force=False)
    check_output_folder(tmp_path / "ckpt", [], force=True)
    with pytest.raises(UsageError, match="holds the input"):
        check_output_folder(tmp_path, [tmp_path / "in.pt"], force=True)
    with pytest.raises(UsageError, match="inside the input folder"):
        check_output_folder(tmp_path / "ckpt" / "x", [tmp_path / "ckpt"], force=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(UsageError, match="no DCP checkpoint"):
        check_output_folder(tmp_path / "other", [], force=True)
    assert wants_dcp("out/", None) and wants_dcp(str(tmp_path / "empty"), None)
    assert wants_dcp("out.pt", "dcp") and not wants_dcp("out.pt", None)


def test_replacing_a_dcp_folder_with_force(tmp_path: Path) -> None:
    _sharded(tmp_path / "ckpt")
    write_dcp({"x": torch.arange(3)}, tmp_path / "ckpt")
    assert torch.equal(read_dcp(tmp_path / "ckpt").root["x"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_names_of_an_id_keyed_optimizer_come_from_the_naming_engine() -> None:
    model, _ = _trained()
    sd = torch.optim.AdamW(model.named_parameters()).state_dict()
    named = to_name_keyed(sd, name_parameters(sd).names)
    assert named["param_groups"][0]["params"][:2] == ["0.weight", "0.bias"]


def test_load_checkpoint_reads_dcp_folders(tmp_path: Path) -> None:
    from optckpt.io import load_checkpoint

    whole = _sharded(tmp_path / "ckpt")
    checkpoint = load_checkpoint(tmp_path / "ckpt")
    assert checkpoint.format == "dcp"
    state = checkpoint.root["optim"]["state"]["enc.layer.weight"]
    assert torch.equal(state["exp_avg"], whole["exp_avg"])
    assert torch.equal(state["step"], whole["step"])


# --------------------------------------------------------------------------- commands


def test_inspect_reads_the_metadata_and_values_only(tmp_path: Path) -> None:
    import json

    folder = tmp_path / "ckpt"
    _save_real(folder, flatten=False)
    result = run("inspect", folder, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["format"] == "dcp"
    [optim] = report["optimizers"]
    assert optim["key"] == "optim" and optim["optimizer"] == "AdamW"
    assert optim["names_source"] == "keys"
    params = {p["id"]: p for p in optim["params"]}
    assert params["0.weight"]["name"] == "0.weight" and params["0.weight"]["group"] == 0
    exp_avg = params["0.weight"]["state"]["exp_avg"]
    assert exp_avg["shape"] == [5, 4] and exp_avg["dtype"] == "float32"
    assert exp_avg["device"] is None  # DCP records no device
    assert params["0.weight"]["step"] == 3
    assert params["0.bias"]["state"] == {}  # frozen
    stats = run("inspect", folder, "--json", "--stats")
    assert stats.exit_code == 0, stats.stderr
    got = {p["id"]: p for p in json.loads(stats.stdout)["optimizers"][0]["params"]}
    expected = read_dcp(folder).root["optim"]["state"]["2.weight"]["exp_avg"]
    assert got["2.weight"]["stats"]["exp_avg"]["norm"] == pytest.approx(float(expected.norm()))
    text = run("inspect", folder)
    assert text.exit_code == 0, text.stderr
    assert "dcp" in text.stdout and "2.weight" in text.stdout


def test_unsafe_folder_exits_3_on_one_line(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    write_folder(tmp_path / "ckpt", {}, {})
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps([_Evil(canary)]))
    for command in (["inspect"], ["inspect", "--stats"], ["diff", tmp_path / "ckpt"]):
        result = run(command[0], tmp_path / "ckpt", *command[1:])
        assert result.exit_code == 3, result.stderr
        assert result.stderr.count("\n") == 1 and "posix.system" in result.stderr
    result = run("convert", tmp_path / "ckpt", "-o", tmp_path / "out.pt")
    assert result.exit_code == 3 and not (tmp_path / "out.pt").exists()
    assert not canary.exists()


def test_convert_dcp_to_files_and_back_by_name(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    _save_real(folder, flatten=True)
    original = read_dcp(folder).root
    result = run("convert", folder, "-o", tmp_path / "ids.pt")
    assert result.exit_code == 0, result.stderr
    ids = torch.load(tmp_path / "ids.pt", weights_only=True)
    # ID-keyed with param_names by default: Optimizer.load_state_dict takes it
    assert ids["optim"]["param_groups"][0]["params"] == [0, 1, 2]
    assert ids["optim"]["param_groups"][1]["param_names"] == ["2.bias", "3.weight", "3.bias"]
    assert torch.equal(
        ids["optim"]["state"][2]["exp_avg"], original["optim"]["state"]["2.weight"]["exp_avg"]
    )
    _, optimizer = _trained()
    optimizer.load_state_dict(ids["optim"])
    result = run("convert", folder, "-o", tmp_path / "names.safetensors", "--keying", "names")
    assert result.exit_code == 0, result.stderr
    from optckpt.io import load_checkpoint

    names = load_checkpoint(tmp_path / "names.safetensors").root
    assert is_name_keyed(names["optim"])
    assert_same_bits(flat_optimizer_state(names["optim"]), flat_optimizer_state(original["optim"]))

    # back to DCP: an -o that ends in "/", and --to dcp
    result = run("convert", tmp_path / "ids.pt", "-o", f"{tmp_path / 'again'}/")
    assert result.exit_code == 0, result.stderr
    again = read_dcp(tmp_path / "again").root
    assert is_name_keyed(again["optim"])
    assert_same_bits(flat_optimizer_state(again["optim"]), flat_optimizer_state(original["optim"]))
    assert_same_bits(again["model"], original["model"])
    result = run(
        "convert", tmp_path / "names.safetensors", "-o", tmp_path / "again2", "--to", "dcp"
    )
    assert result.exit_code == 0, result.stderr
    assert is_dcp(tmp_path / "again2")

    # diff by name: DCP against DCP, and against the ID-keyed file
    for other in (tmp_path / "again", tmp_path / "ids.pt", tmp_path / "names.safetensors"):
        result = run("diff", folder, other)
        assert result.exit_code == 0, (other, result.stdout, result.stderr)


def test_convert_refuses_ids_keying_for_dcp(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    _save_real(folder, flatten=False)
    result = run("convert", folder, "-o", f"{tmp_path / 'out'}/", "--keying", "ids")
    assert result.exit_code == 2
    assert not (tmp_path / "out").exists()


def test_an_id_keyed_optimizer_saved_as_it_is_keeps_int_ids(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    _, optimizer = _trained()
    dcp.save({"optim": optimizer.state_dict()}, checkpoint_id=str(tmp_path / "ckpt"))
    optim = read_dcp(tmp_path / "ckpt").root["optim"]
    assert sorted(optim["state"]) == [0, 2, 3, 5]  # frozen 1 and never-stepped 4: no state
    assert optim["param_groups"][1]["params"] == [3, 4, 5]
    for pid, state in optimizer.state_dict()["state"].items():
        assert torch.equal(optim["state"][pid]["exp_avg"], state["exp_avg"])
    _, fresh = _trained(steps=1)
    fresh.load_state_dict(optim)


def _save_all_stepped(folder: Path) -> tuple[nn.Module, torch.optim.Optimizer]:
    """dcp.save of get_state_dict's model and optimizer, every trainable parameter stepped
    (set_optimizer_state_dict wants state for each)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optimizer = _trained(skip=False)
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(folder))
    return model, optimizer


def _load_into(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, *, partial: bool = False
) -> None:
    """What a trainer does: dcp.load into get_state_dict's dicts, then set_optimizer_state_dict
    with strict=False."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_optimizer_state_dict,
    )

    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(
        state, checkpoint_id=str(folder), planner=DefaultLoadPlanner(allow_partial_load=partial)
    )
    set_optimizer_state_dict(
        model, optimizer, state["optim"], options=StateDictOptions(strict=False)
    )


def _cast(flat: dict[Any, torch.Tensor], dtype: torch.dtype) -> dict[Any, torch.Tensor]:
    """``flat`` as move casts it: floating state to ``dtype``, ``step`` kept."""
    return {k: v if k[1] == "step" else v.to(dtype) for k, v in flat.items()}


def test_move_casts_a_dcp_folder_to_dcp_and_to_a_file(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    _save_all_stepped(folder)
    original = flat_optimizer_state(read_dcp(folder).root["optim"])
    expected = _cast(original, torch.bfloat16)

    # DCP -> DCP: an -o that ends in "/"
    result = run(
        "move", folder, "--device", "cpu", "--dtype", "bfloat16", "-o", f"{tmp_path / 'bf16'}/"
    )
    assert result.exit_code == 0, result.stderr
    moved = read_dcp(tmp_path / "bf16").root
    assert is_name_keyed(moved["optim"])
    assert_same_bits(flat_optimizer_state(moved["optim"]), expected)
    model, optimizer = _trained(steps=1, skip=False)
    _load_into(tmp_path / "bf16", model, optimizer)
    for name, p in model.named_parameters():
        for key, value in optimizer.state[p].items():
            want = expected[(name, key)]
            assert torch.equal(value, want.to(value.dtype)), (name, key)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()  # a step runs

    # DCP -> .pt: name-keyed as the folder was; Optimizer.load_state_dict takes it
    result = run(
        "move", folder, "--device", "cpu", "--dtype", "bfloat16", "-o", tmp_path / "bf16.pt"
    )
    assert result.exit_code == 0, result.stderr
    saved = torch.load(tmp_path / "bf16.pt", weights_only=True)
    assert_same_bits(flat_optimizer_state(saved["optim"]), expected)
    model, optimizer = _trained(steps=1, skip=False)
    optimizer.load_state_dict(saved["optim"])
    for name, p in model.named_parameters():
        for key, value in optimizer.state[p].items():
            assert torch.equal(value, expected[(name, key)].to(value.dtype)), (name, key)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()

    # --format dcp; a device DCP cannot record, and a DCP output from a file, are refused
    result = run("move", folder, "--device", "cpu", "-o", tmp_path / "f", "--format", "dcp")
    assert result.exit_code == 0, result.stderr
    assert is_dcp(tmp_path / "f")
    result = run("move", folder, "--device", "meta", "-o", f"{tmp_path / 'meta'}/")
    assert result.exit_code == 2 and "records no device" in result.stderr
    result = run("move", tmp_path / "bf16.pt", "--device", "cpu", "-o", f"{tmp_path / 'x'}/")
    assert result.exit_code == 2 and "optckpt convert" in result.stderr
    assert not (tmp_path / "meta").exists() and not (tmp_path / "x").exists()


def test_remap_a_dcp_folder_to_a_layout_with_an_added_parameter(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    old_model, _ = _save_all_stepped(folder)
    original = flat_optimizer_state(read_dcp(folder).root["optim"])

    def grown() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = nn.Sequential(*_trained(steps=0)[0], nn.Linear(2, 2))  # adds 4.weight, 4.bias
        model[0].bias.requires_grad_(False)
        optimizer = torch.optim.AdamW(
            [
                {"params": [model[0].weight, model[0].bias, model[2].weight], "weight_decay": 0.1},
                {"params": list(model[2].parameters())[1:] + list(model[3].parameters())
                 + list(model[4].parameters()), "weight_decay": 0.0},
            ],
            lr=1e-3,
        )  # fmt: skip
        return model, optimizer

    model, optimizer = grown()
    names = {id(p): n for n, p in model.named_parameters()}
    layout = {
        "params": {n: {"shape": list(p.shape)} for n, p in model.named_parameters()},
        "groups": [{"params": [names[id(p)] for p in g["params"]]} for g in optimizer.param_groups],
    }
    (tmp_path / "layout.json").write_text(__import__("json").dumps(layout))
    result = run("remap", folder, "--to", tmp_path / "layout.json", "-o", f"{tmp_path / 'out'}/")
    assert result.exit_code == 0, result.stderr
    out = read_dcp(tmp_path / "out").root
    assert is_name_keyed(out["optim"])
    assert_same_bits(flat_optimizer_state(out["optim"]), original)  # carried bitwise, by name
    assert_same_bits(out["model"], dict(read_dcp(folder).root["model"]))
    # the grown model takes it: the new parameter's state is the optimizer's fresh one
    with torch.no_grad():
        for p, q in zip(old_model.parameters(), model.parameters()):
            q.copy_(p)
    _load_into(tmp_path / "out", model, optimizer, partial=True)
    for name, p in model.named_parameters():
        for key, value in optimizer.state[p].items():
            if name.startswith("4."):
                continue
            assert torch.equal(value, original[(name, key)]), (name, key)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()


def test_resume_step_on_a_dcp_folder(tmp_path: Path) -> None:
    import json

    folder = tmp_path / "ckpt"
    _save_all_stepped(folder)
    # names from the state's keys, parameters from the folder's model entries
    result = run("resume-step", folder, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert [g["num_params"] for g in report["groups"]] == [3, 3]
    assert all(check["ok"] for check in report["checks"]), report["checks"]


@pytest.mark.parametrize("out", ["after.pt", "after/"], ids=["file", "dcp"])
def test_resume_step_output_of_a_dcp_folder_resumes_in_torch(tmp_path: Path, out: str) -> None:
    """resume-step -o writes the stepped state: a file (-o x.pt) or a DCP folder (-o x/),
    equal to the same steps taken by torch.optim on the folder as torch loads it, and torch
    loads it back (Optimizer.load_state_dict; dcp.load + set_optimizer_state_dict) and steps."""
    folder = tmp_path / "ckpt"
    _save_all_stepped(folder)
    target = f"{tmp_path}/{out}"  # as typed: a Path would drop the "/"
    result = run("resume-step", folder, "--steps", "2", "--seed", "3", "-o", target)
    assert result.exit_code == 0, result.stderr
    # the same two steps with torch.optim, by the documented recipe
    model, optimizer = _trained(steps=0, skip=False)
    _load_into(folder, model, optimizer)
    step_by_recipe(optimizer, steps=2, seed=3)
    names = {p: n for n, p in model.named_parameters()}
    expected = {(names[p], k): v for p, st in optimizer.state.items() for k, v in st.items()}

    fresh, fresh_optimizer = _trained(steps=0, skip=False)
    if out.endswith("/"):
        assert is_dcp(tmp_path / "after")
        _load_into(tmp_path / "after", fresh, fresh_optimizer)
    else:
        written = torch.load(target, weights_only=True)
        assert is_name_keyed(written["optim"])
        fresh.load_state_dict(written["model"])
        fresh_optimizer.load_state_dict(written["optim"])
    fresh_names = {p: n for n, p in fresh.named_parameters()}
    got = {(fresh_names[p], k): v for p, st in fresh_optimizer.state.items() for k, v in st.items()}
    if out.endswith("/"):
        # the recipe steps the frozen 0.bias too (it is in a group), and the folder holds its
        # state; torch's set_optimizer_state_dict restores state only for parameters that
        # require grad (state_dict.py, _split_optim_state_dict)
        assert ("0.bias", "step") in flat_optimizer_state(
            read_dcp(tmp_path / "after").root["optim"]
        )
        expected = {k: v for k, v in expected.items() if k[0] != "0.bias"}
    assert_same_bits(got, expected)
    assert_same_bits(dict(fresh.state_dict()), dict(model.state_dict()))
    fresh(torch.randn(2, 4)).pow(2).sum().backward()
    fresh_optimizer.step()


def test_inspect_stats_releases_the_pages_of_files_mapped_while_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 0's file holds tensor chunks only: it is first mapped when --stats reads them,
    after the releaser was made, and its pages are released all the same."""
    import optckpt.inspect
    from optckpt.inspect import inspect_checkpoint

    _sharded(tmp_path / "ckpt")
    released: list[set[str]] = []
    monkeypatch.setattr(optckpt.inspect, "_RELEASE_EVERY", 1)
    monkeypatch.setattr(
        "optckpt.io.pages.release", lambda files: released.append({Path(f).name for f in files})
    )
    report = inspect_checkpoint(tmp_path / "ckpt", stats=True)
    assert report.optimizers[0].params[0].stats  # values were read
    assert released and released[-1] == {"__0_0.distcp", "__1_0.distcp"}
