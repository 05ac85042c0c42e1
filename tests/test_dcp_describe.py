"""convert of a hostile DCP folder to safetensors: the torch-free path (``describe_dcp`` with
``data``) writes what the torch path writes, byte for byte, or fails as it does, with
nothing at ``-o``."""

from __future__ import annotations

import dataclasses
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from checks import assert_one_line_error, run
from test_dcp import _sharded, write_folder

from optckpt.convert import convert_checkpoint
from optckpt.errors import UnreadableCheckpointError
from optckpt.io.dcp.describe import describe_dcp

WEIGHT = "model.enc.layer.weight"


def _optimizer_folder(folder: Path, chunks: list[Any], rows: int) -> None:
    """A DCP folder of one parameter ``w`` whose ``exp_avg`` of ``rows`` x 2 is ``chunks``."""
    write_folder(
        folder,
        {
            "model.w": [((0, 0), torch.randn(rows, 2), "a.distcp")],
            "optim.state.w.exp_avg": chunks,
            "optim.state.w.step": [((), torch.tensor(3.0), "a.distcp")],
        },
        {
            "optim.param_groups.0.lr": (0.01, "a.distcp"),
            "optim.param_groups.0.params": (["w"], "a.distcp"),
        },
        sizes={"optim.state.w.exp_avg": (rows, 2)},
    )


def test_overlapping_chunks_past_the_pairwise_check_are_written_as_the_torch_path_does(
    tmp_path: Path,
) -> None:
    # 4097 one-row chunks (past check_chunks' pairwise overlap check) whose sizes add up to
    # the tensor, two at row 0 and none at the last row: joined in order they would shift
    # every row by one; the torch path zero-fills and puts each chunk in its place
    n = 4097
    rows = torch.arange(n * 2, dtype=torch.float32).reshape(n, 2)
    chunks = [((i, 0), rows[i : i + 1], "a.distcp") for i in range(n - 1)]
    chunks.append(((0, 0), rows[n - 1 :], "a.distcp"))
    folder = tmp_path / "ckpt"
    _optimizer_folder(folder, chunks, n)
    assert describe_dcp(folder, data=True) is None
    described, loaded = tmp_path / "d.safetensors", tmp_path / "t.safetensors"
    convert_checkpoint(folder, described)
    convert_checkpoint(folder, loaded, describe=False)
    assert described.read_bytes() == loaded.read_bytes()


def test_chunks_sharing_a_range_are_written_as_the_torch_path_does(tmp_path: Path) -> None:
    # exp_avg's first chunk pointed at the weight's (same shape): both read the same bytes
    folder = tmp_path / "ckpt"
    _sharded(folder)
    meta = pickle.loads((folder / ".metadata").read_bytes())
    weight = next(v for i, v in meta.storage_data.items() if i.fqn == WEIGHT)
    _edit_storage(folder, "optim.state.enc.layer.weight.exp_avg", offset=weight.offset)
    assert describe_dcp(folder, data=True) is not None
    described, loaded = tmp_path / "d.safetensors", tmp_path / "t.safetensors"
    convert_checkpoint(folder, described)
    convert_checkpoint(folder, loaded, describe=False)
    assert described.read_bytes() == loaded.read_bytes()


def _edit_storage(folder: Path, key: str, index: int = 0, **changes: Any) -> None:
    """Change where ``.metadata`` says ``key``'s ``index``-th chunk is."""
    meta = pickle.loads((folder / ".metadata").read_bytes())
    found = [i for i in meta.storage_data if i.fqn == key][index]
    meta.storage_data[found] = dataclasses.replace(meta.storage_data[found], **changes)
    (folder / ".metadata").write_bytes(pickle.dumps(meta))


def _truncate(folder: Path) -> None:
    data = (folder / "__0_0.distcp").read_bytes()
    (folder / "__0_0.distcp").write_bytes(data[: len(data) // 2])


def _replace(make: Callable[[Path], None]) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        (folder / "__0_0.distcp").unlink()
        make(folder / "__0_0.distcp")

    return change


def _outside(folder: Path) -> None:
    (folder.parent / "x.distcp").write_bytes((folder / "__0_0.distcp").read_bytes())
    _edit_storage(folder, WEIGHT, relative_path="../x.distcp")


def _metadata_dtype(folder: Path) -> None:
    meta = pickle.loads((folder / ".metadata").read_bytes())
    meta.state_dict_metadata[WEIGHT].properties.dtype = torch.float64
    (folder / ".metadata").write_bytes(pickle.dumps(meta))


HOSTILE = {
    "range_past_the_end": (lambda f: _edit_storage(f, WEIGHT, offset=10**6), "truncated"),
    "range_of_a_value": (lambda f: _edit_storage(f, WEIGHT, 1, offset=0), "not one tensor"),
    "truncated_file": (_truncate, "truncated"),
    "symlink_to_dev_zero": (_replace(lambda p: os.symlink("/dev/zero", p)), "missing"),
    "fifo": (_replace(os.mkfifo), "missing"),
    "dotdot": (_outside, "not a file of the folder"),
    "metadata_dtype": (_metadata_dtype, "float64"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_folder_fails_on_both_paths_alike_leaving_nothing(
    tmp_path: Path, name: str
) -> None:
    change, message = HOSTILE[name]
    folder = tmp_path / "ckpt"
    _sharded(folder)
    change(folder)
    out = tmp_path / "out.safetensors"
    with pytest.raises(UnreadableCheckpointError, match=message) as torch_path:
        convert_checkpoint(folder, out, describe=False)
    assert describe_dcp(folder, data=True) is None  # left to the torch path, which refuses
    result = run("convert", folder, "-o", out)
    assert result.exit_code == 3
    assert_one_line_error(result.stderr, str(torch_path.value))
    assert not out.exists() and sorted(os.listdir(tmp_path)) == sorted(
        ["ckpt", *(["x.distcp"] if name == "dotdot" else [])]
    )


@pytest.mark.parametrize(
    "second",
    [
        pytest.param(lambda t: t.double(), id="chunk_dtype"),
        pytest.param(lambda t: t.reshape(-1), id="chunk_shape"),
    ],
)
def test_a_chunk_that_is_not_its_metadata_fails_on_both_paths(
    tmp_path: Path, second: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    t = torch.arange(8, dtype=torch.float32).reshape(4, 2)
    folder = tmp_path / "ckpt"
    _optimizer_folder(folder, [((0, 0), t[:2], "a.distcp"), ((2, 0), second(t[2:]), "b")], 4)
    meta = pickle.loads((folder / ".metadata").read_bytes())
    chunks = meta.state_dict_metadata["optim.state.w.exp_avg"].chunks
    chunks[1] = dataclasses.replace(chunks[1], sizes=torch.Size((2, 2)))
    (folder / ".metadata").write_bytes(pickle.dumps(meta))
    out = tmp_path / "out.safetensors"
    with pytest.raises(UnreadableCheckpointError, match="the chunk at") as torch_path:
        convert_checkpoint(folder, out, describe=False)
    result = run("convert", folder, "-o", out)
    assert result.exit_code == 3
    assert_one_line_error(result.stderr, str(torch_path.value))
    assert not out.exists()
