"""DCP folders written by real producers, read by optckpt; folders optckpt writes, restored
by torch into FSDP2 on two ranks and into a plain model.

One run of two processes (gloo on the CPU, ``torch.multiprocessing`` spawn, ``file://``
rendezvous in ``tmp_path``) does all the multi-rank work, for every test of this module:

* FSDP2 (``fully_shard``) over a model whose first layer has 5 output rows (3 + 2 on two
  ranks), two AdamW steps, then ``get_state_dict`` + ``dcp.save`` with the default keys and
  with ``flatten_optimizer_state_dict=True``; the full state (``full_state_dict=True``) as
  reference; and ``torch.save(opt.state_dict())`` as FSDP2 users wrongly do (DTensors);
* the folder optckpt wrote from a one-process checkpoint, ``dcp.load`` + ``set_state_dict``
  into the FSDP2 model, its full state saved for comparison, then a step.

FSDP2 on gloo can abort at interpreter exit once the work is done ("terminate called without
an active exception"): workers end with ``os._exit(0)`` after writing their results.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from checks import (
    assert_same_bits,
    convert_without_torch,
    dcp_as_torch_reads_it,
    flat_optimizer_state,
    torch_zip_bytes,
    track_assemblies,
)
from torch import nn

from optckpt.errors import UnsafeCheckpointError
from optckpt.io import load_checkpoint
from optckpt.io.dcp import read_dcp
from optckpt.io.dcp.writer import name_keyed_tree, write_dcp
from optckpt.names import is_name_keyed, rekey

_TIMEOUT = 240  # seconds for the two-rank run


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


def _batch(rank: int) -> torch.Tensor:
    return torch.randn(2, 4, generator=torch.Generator().manual_seed(100 + rank))


def _worker(rank: int, world: int, folder: str) -> None:
    """One rank of the two-rank run (see the module doc)."""
    warnings.filterwarnings("ignore")
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )
    from torch.distributed.fsdp import fully_shard

    out = Path(folder)
    dist.init_process_group(
        "gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank, world_size=world
    )

    def sharded() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = _model()
        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
        return model, torch.optim.AdamW(model.parameters(), lr=0.01)

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model, optimizer = sharded()
    for _ in range(2):
        model(_batch(rank)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, flatten in (("fsdp_default", False), ("fsdp_flat", True)):
        options = StateDictOptions(flatten_optimizer_state_dict=flatten)
        msd, osd = get_state_dict(model, optimizer, options=options)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(out / name))
    msd, osd = get_state_dict(model, optimizer, options=full)
    if rank == 0:
        torch.save({"model": msd, "optim": osd}, out / "fsdp_full.pt")
        torch.save(optimizer.state_dict(), out / "dtensor.pt")

    # restore the folder optckpt wrote into a fresh FSDP2 model
    model, optimizer = sharded()
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optimizer": osd}
    dcp.load(state, checkpoint_id=str(out / "written"))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )
    msd, osd = get_state_dict(model, optimizer, options=full)
    if rank == 0:
        torch.save({"model": msd, "optim": osd}, out / "restored_full.pt")
    model(_batch(rank)).pow(2).sum().backward()
    optimizer.step()  # a step runs on the restored state
    dist.barrier()
    if rank == 0:
        (out / "done").write_text("ok")
    dist.barrier()
    os._exit(0)


def _one_process_checkpoint() -> tuple[nn.Module, torch.optim.Optimizer, dict[str, Any]]:
    """A plain model and AdamW (built from named_parameters: ID-keyed with param_names)."""
    model = _model()
    optimizer = torch.optim.AdamW(model.named_parameters(), lr=0.01)
    for step in range(3):
        model(_batch(step)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer, {"model": model.state_dict(), "optimizer": optimizer.state_dict()}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder the two-rank run wrote into."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("dcp_real")
    _, _, checkpoint = _one_process_checkpoint()
    torch.save(checkpoint, out / "one.pt")
    # what optckpt writes: the ID-keyed optimizer renamed to FQNs, torch's writer
    tree = load_checkpoint(out / "one.pt").root
    name_keyed_tree(tree, lambda sd: rekey(sd, "names"))
    write_dcp(tree, out / "written")

    context = mp.start_processes(
        _worker, args=(2, str(out)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + _TIMEOUT
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the two-rank run did not finish in {_TIMEOUT} s")
    assert (out / "done").read_text() == "ok"
    return out


@pytest.mark.parametrize("name", ["fsdp_default", "fsdp_flat"])
def test_fsdp2_folders_read_as_dcp_to_torch_save_reads_them(run: Path, name: str) -> None:
    reference = dcp_as_torch_reads_it(run / name, run)
    full = torch.load(run / "fsdp_full.pt", weights_only=True)
    for tensors in ("load", "lazy"):
        root = read_dcp(run / name, tensors=tensors).root  # type: ignore[arg-type]
        if tensors == "lazy":
            root = _made(root)
        assert_same_bits(root["model"], reference["model"])
        assert_same_bits(
            flat_optimizer_state(root["optim"]), flat_optimizer_state(reference["optim"])
        )
        assert_same_bits(
            flat_optimizer_state(root["optim"]), flat_optimizer_state(full["optim"])
        )  # the gathered state too
        assert is_name_keyed(root["optim"])
        assert [
            {k: v for k, v in g.items() if k != "params"} for g in root["optim"]["param_groups"]
        ] == [{k: v for k, v in g.items() if k != "params"} for g in full["optim"]["param_groups"]]
        assert root["optim"]["param_groups"][0]["params"] == [
            "0.weight",
            "0.bias",
            "2.weight",
            "2.bias",
        ]


def _made(node: Any) -> Any:
    from optckpt.io.dcp.tensors import Assembled

    if isinstance(node, Assembled):
        return node.materialize()
    if isinstance(node, dict):
        return {k: _made(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_made(v) for v in node]
    return node


def test_fsdp2_shards_are_uneven_and_step_is_stored_once(run: Path) -> None:
    layouts = read_dcp(run / "fsdp_default", tensors="meta").layouts
    weight = layouts["optim.state.0.weight.exp_avg"]
    assert weight.shape == (5, 4) and weight.chunks == 2
    assert weight.files == ["__0_0.distcp", "__1_0.distcp"]
    meta = read_dcp(run / "fsdp_default", tensors="meta").metadata
    assert meta is not None
    chunks = meta.entries["optim.state.0.weight.exp_avg"].chunks  # type: ignore[union-attr]
    assert [c.sizes for c in chunks] == [(3, 4), (2, 4)]
    step = layouts["optim.state.0.weight.step"]
    assert step.chunks == 1 and len(step.files) == 1  # replicated: one rank saved it


def test_written_folder_restores_into_fsdp2_on_two_ranks(run: Path) -> None:
    model, optimizer, _ = _one_process_checkpoint()
    restored = torch.load(run / "restored_full.pt", weights_only=True)
    names = dict(model.named_parameters())
    for name, param in names.items():
        assert torch.equal(restored["model"][name], param.detach()), name
        for key, value in optimizer.state[param].items():
            assert torch.equal(restored["optim"]["state"][name][key], value), (name, key)


def test_written_folder_restores_into_a_plain_model(run: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    model, optimizer, _ = _one_process_checkpoint()
    fresh = _model()
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.5)
    msd, osd = get_state_dict(fresh, fresh_optimizer)
    state = {"model": msd, "optimizer": osd}
    dcp.load(state, checkpoint_id=str(run / "written"))
    set_state_dict(
        fresh, fresh_optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
        for key, value in optimizer.state[p].items():
            assert torch.equal(value, fresh_optimizer.state[q][key]), key
    assert fresh_optimizer.param_groups[0]["lr"] == 0.01
    fresh(_batch(0)).pow(2).sum().backward()
    fresh_optimizer.step()


def test_fsdp2_state_dict_saved_with_torch_save_is_refused_with_advice(run: Path) -> None:
    with pytest.raises(UnsafeCheckpointError) as raised:
        load_checkpoint(run / "dtensor.pt")
    message = str(raised.value)
    assert "sharded" in message and "full_state_dict=True" in message
    assert "--allow-global" not in message


def test_move_and_remap_of_uneven_shards_stream_and_equal_torch_cast(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FSDP2's uneven shards, each tensor assembled, cast and written one at a time: equal
    to torch's own reading of the folder cast with ``.to``, whichever the output."""
    from optckpt.move import move_checkpoint
    from optckpt.remapping import remap_checkpoint

    folder = run / "fsdp_default"
    reference = dcp_as_torch_reads_it(folder, tmp_path)
    flat = flat_optimizer_state(reference["optim"])
    want = {k: v if k[1] == "step" else v.to(dtype=torch.bfloat16) for k, v in flat.items()}
    tensors = sum(1 for v in flat.values() if v.dim()) + len(reference["model"])

    made = track_assemblies(monkeypatch)
    move_checkpoint(folder, f"{tmp_path / 'moved'}/", dtype="bfloat16")
    moved = dcp_as_torch_reads_it(tmp_path / "moved", tmp_path)
    assert_same_bits(flat_optimizer_state(moved["optim"]), want)
    assert_same_bits(moved["model"], reference["model"])
    assert made.made == tensors and made.most_alive == 1

    layout = {
        "params": {n: {"shape": list(t.shape), "dtype": "bfloat16"} for n, t in reference["model"].items()},
        "groups": [{"params": list(reference["model"])}],
    }  # fmt: skip
    (tmp_path / "layout.json").write_text(__import__("json").dumps(layout))
    made = track_assemblies(monkeypatch)
    remap_checkpoint(folder, tmp_path / "layout.json", tmp_path / "remapped.pt")
    remapped = torch.load(tmp_path / "remapped.pt", weights_only=True)
    assert_same_bits(flat_optimizer_state(remapped["optim"]), want)
    assert made.made == tensors and made.most_alive == 1


@pytest.mark.parametrize("name", ["fsdp_default", "fsdp_flat", "written"])
def test_fsdp2_folders_inspected_without_torch_as_with_it(run: Path, name: str) -> None:
    """inspect without --stats describes the folder (no torch): the same report as read by
    torch (tests/test_structure.py runs the one-process producers)."""
    import json

    from optckpt.described import DescribedTensor
    from optckpt.inspect import inspect_checkpoint
    from optckpt.io.dcp.describe import describe_dcp
    from optckpt.locate import tensor_paths

    described = describe_dcp(run / name)
    assert described is not None
    assert all(isinstance(t, DescribedTensor) for _, t in tensor_paths(described.root))
    both = [json.dumps(inspect_checkpoint(run / name, describe=d).to_json()) for d in (True, False)]
    assert both[0] == both[1]


@pytest.mark.parametrize("name", ["fsdp_default", "fsdp_flat"])
def test_inspect_shows_each_tensors_chunks_as_torchs_metadata_says(run: Path, name: str) -> None:
    """``dcp.layouts`` in --json and the sharded-tensor table, against torch's own reading of
    ``.metadata`` (FileSystemReader.read_metadata)."""
    import json

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata
    from typer.testing import CliRunner

    from optckpt.cli.app import app

    metadata = FileSystemReader(str(run / name)).read_metadata()
    expected = {}
    for key, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):
            continue
        files = [
            metadata.storage_data[MetadataIndex(key, c.offsets)].relative_path for c in entry.chunks
        ]
        expected[key] = {
            "key": key,
            "shape": list(entry.size),
            "dtype": str(entry.properties.dtype).removeprefix("torch."),
            "files": list(dict.fromkeys(files)),
            "chunks": [
                {"offsets": list(c.offsets), "sizes": list(c.sizes), "file": f}
                for c, f in zip(entry.chunks, files)
            ],
        }
    result = CliRunner().invoke(app, ["inspect", str(run / name), "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)["dcp"]
    assert {t["key"]: t for t in report["layouts"]} == expected
    sharded = {k: t for k, t in expected.items() if len(t["chunks"]) > 1}
    assert report["sharded"] == len(sharded) > 0
    assert report["tensors"] == len(expected)
    # FSDP2 shards dimension 0 with torch.chunk: 5 rows are 3 + 2
    weight = expected["optim.state.0.weight.exp_avg"]
    assert [c["sizes"] for c in weight["chunks"]] == [[3, 4], [2, 4]]

    text = CliRunner().invoke(app, ["inspect", str(run / name), "--all"])
    assert text.exit_code == 0, text.stderr
    rows = [line.split() for line in text.stdout.splitlines()]
    for key, t in sharded.items():
        [row] = [r for r in rows if r and r[0] == key]
        split = "+".join(str(c["sizes"][0]) for c in t["chunks"])
        assert row[1:6] == [
            "│", "[" + ",".join(map(str, t["shape"])) + "]", "│", "f32", "│"
        ] and f"0: {split}" in " ".join(row), row  # fmt: skip
    unsharded = [k for k, t in expected.items() if len(t["chunks"]) == 1]
    assert unsharded and not any(r and r[0] in unsharded for r in rows)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("name", ["fsdp_default", "fsdp_flat"])
def test_fsdp2_folders_convert_to_files_without_torch(
    run: Path, name: str, suffix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Uneven row shards are copied chunk by chunk from the .distcp files, in a process that
    never imports torch; the file is the torch path's, byte for byte (a .pt file's
    serialization id aside), and its values are dcp_to_torch_save's."""
    from optckpt.convert import convert_checkpoint
    from optckpt.io.dcp.describe import describe_dcp

    described, loaded = tmp_path / f"d{suffix}", tmp_path / f"t{suffix}"
    convert_without_torch(run / name, described)
    convert_checkpoint(run / name, loaded, describe=False)
    if suffix == ".pt":
        assert torch_zip_bytes(described) == torch_zip_bytes(loaded)
        # the row chunks copied in the kernel, their CRC32s from the checksum thread
        monkeypatch.setattr("optckpt.io.zip_writer._SMALL", 0)
        copied = tmp_path / "copied.pt"
        convert_checkpoint(run / name, copied)
        assert torch_zip_bytes(copied) == torch_zip_bytes(loaded)
    else:
        assert described.read_bytes() == loaded.read_bytes()

    reference = dcp_as_torch_reads_it(run / name, tmp_path)
    named = tmp_path / f"names{suffix}"
    convert_checkpoint(run / name, named, keying="names")
    back = load_checkpoint(named).root
    assert_same_bits(back["model"], reference["model"])
    assert_same_bits(flat_optimizer_state(back["optim"]), flat_optimizer_state(reference["optim"]))
    # the description of a sharded tensor reads its bytes across both files
    folder = describe_dcp(run / name, data=True)
    assert folder is not None
    weight = folder.root["optim"]["state"]["0.weight"]["exp_avg"]
    assert [p.file.name for p in weight.storage.parts] == ["__0_0.distcp", "__1_0.distcp"]
    expected = flat_optimizer_state(reference["optim"])[("0.weight", "exp_avg")]
    assert torch.equal(weight.to_torch(), expected)
    # the ID-keyed file loads into torch.optim and takes a step
    ids = load_checkpoint(described).root
    model = _model()
    model.load_state_dict(ids["model"])
    optimizer = torch.optim.AdamW(model.parameters())
    optimizer.load_state_dict(ids["optim"])
    names = {p: n for n, p in model.named_parameters()}
    assert_same_bits(
        {(names[p], k): v for p, st in optimizer.state.items() for k, v in st.items()},
        flat_optimizer_state(reference["optim"]),
    )
    before = {p: float(st["step"]) for p, st in optimizer.state.items()}
    model(_batch(0)).pow(2).sum().backward()
    optimizer.step()
    assert {p: float(st["step"]) for p, st in optimizer.state.items()} == {
        p: step + 1 for p, step in before.items()
    }
