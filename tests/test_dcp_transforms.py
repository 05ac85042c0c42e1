"""optckpt.io.dcp.transforms: DCP folders that torch's writer compressed (``FileSystemWriter(...,
_extensions=[ZStandard()])``), read as torch reads them, with bounded decompression."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from checks import (
    assert_bitwise_equal,
    assert_same_bits,
    dcp_as_torch_reads_it,
    dcp_save_trained,
    flat_optimizer_state,
    run,
)

zstandard = pytest.importorskip("zstandard")
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """dcp.save of get_state_dict's model and AdamW (two steps) and a value, every entry
    written through torch's ZStandard extension."""
    folder = tmp_path_factory.mktemp("zstd") / "ckpt"
    dcp_save_trained(folder, (64, 48, 5), steps=2, batch=4, extra={"epoch": 2}, compress=True)
    return folder


def _torch_metadata(folder: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(folder)).read_metadata()


def test_every_entry_is_compressed(compressed: Path) -> None:
    infos = _torch_metadata(compressed).storage_data.values()
    assert infos and all(i.transform_descriptors == ["stream.zstd/1"] for i in infos)


def test_convert_equals_dcp_to_torch_save_bitwise(compressed: Path, tmp_path: Path) -> None:
    reference = dcp_as_torch_reads_it(compressed, tmp_path)
    result = run("convert", compressed, "-o", tmp_path / "out.pt", "--keying", "names")
    assert result.exit_code == 0, result.stderr
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert_same_bits(out["model"], reference["model"])
    assert_same_bits(flat_optimizer_state(out["optim"]), flat_optimizer_state(reference["optim"]))
    assert out["optim"]["param_groups"] == reference["optim"]["param_groups"]
    assert out["extra"] == reference["extra"] == {"epoch": 2}


def test_inspect_stats_reads_what_dcp_load_reads(compressed: Path) -> None:
    import torch.distributed.checkpoint as dcp

    from optckpt.inspect import tensor_stats

    result = run("inspect", compressed, "--json", "--stats")
    assert result.exit_code == 0, result.stderr
    [optim] = json.loads(result.stdout)["optimizers"]
    # torch's own reader, into a state dict of the saved shapes
    metadata = _torch_metadata(compressed)
    loaded = {
        key: torch.empty(entry.size, dtype=entry.properties.dtype)
        for key, entry in metadata.state_dict_metadata.items()
        if key.startswith("optim.state.")
    }
    dcp.load(loaded, checkpoint_id=str(compressed))
    params = {p["id"]: p for p in optim["params"]}
    assert params.keys() == {"0.weight", "0.bias", "2.weight", "2.bias"}
    for fqn, p in params.items():
        assert p["step"] == loaded[f"optim.state.{fqn}.step"].item() == 2
        for key in ("exp_avg", "exp_avg_sq"):
            expected = tensor_stats(loaded[f"optim.state.{fqn}.{key}"])
            assert p["stats"][key]["norm"] == expected.norm, (fqn, key)
            assert p["stats"][key]["max"] == expected.max, (fqn, key)


def test_inspect_without_stats_describes_it_without_torch(compressed: Path) -> None:
    from optckpt.inspect import inspect_checkpoint
    from optckpt.io.dcp.describe import describe_dcp

    assert describe_dcp(compressed) is not None
    both = [json.dumps(inspect_checkpoint(compressed, describe=d).to_json()) for d in (True, False)]
    assert both[0] == both[1]


def _hostile(compressed: Path, tmp_path: Path, payload_bytes: int) -> tuple[Path, str]:
    """A copy of the folder whose chunk of ``optim.state.2.bias.exp_avg`` (5 floats) is a zstd
    stream of ``payload_bytes`` zeros, its ``.metadata`` (torch's own classes) pointing at it."""
    import shutil

    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import MetadataIndex

    folder = tmp_path / "hostile"
    shutil.copytree(compressed, folder)
    key = "optim.state.2.bias.exp_avg"
    metadata = _torch_metadata(folder)
    index = MetadataIndex(key, torch.Size([0]))
    info = metadata.storage_data[index]
    compressor = zstandard.ZstdCompressor().compressobj()
    zeros = bytes(1 << 24)
    bomb = b"".join(compressor.compress(zeros) for _ in range(payload_bytes >> 24))
    bomb += compressor.flush()
    target = folder / info.relative_path
    with target.open("ab") as f:
        offset = f.tell()
        f.write(bomb)
    metadata.storage_data[index] = _StorageInfo(
        info.relative_path, offset, len(bomb), info.transform_descriptors
    )
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    return folder, key


_RUN = """
import resource, sys
from optckpt.cli.app import main
sys.argv = ["optckpt", *sys.argv[1:]]
try:
    main()
except SystemExit as e:
    print("rss_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
    raise
"""


def test_a_chunk_that_decompresses_past_its_size_is_refused_in_bounded_memory(
    compressed: Path, tmp_path: Path
) -> None:
    folder, key = _hostile(compressed, tmp_path, 1 << 30)  # 1 GiB of zeros, ~32 KiB stored
    assert (folder / ".metadata").stat().st_size < 1 << 20
    for args in (["inspect", folder, "--stats"], ["convert", folder, "-o", tmp_path / "o.pt"]):
        found = subprocess.run(
            [sys.executable, "-c", _RUN, *map(str, args)], capture_output=True, text=True
        )
        lines = found.stderr.splitlines()
        assert found.returncode == 3, found.stderr
        assert lines[0].startswith("error: ") and key in lines[0]
        assert "decompresses to more than" in lines[0]
        rss = int(lines[-1].split()[1]) * 1024
        assert rss < 600 * 2**20, rss  # torch's import and the folder, not the 1 GiB
    assert not (tmp_path / "o.pt").exists()


def test_without_zstandard_exit_3_naming_the_package(compressed: Path) -> None:
    code = "import sys; sys.modules['zstandard'] = None\n" + _RUN
    for args in (["inspect", compressed], ["inspect", compressed, "--stats"]):
        found = subprocess.run(
            [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True
        )
        assert found.returncode == 3, found.stderr
        [line, _rss] = found.stderr.splitlines()
        assert line.startswith("error: ") and "pip install zstandard" in line


def test_compressed_folder_converts_to_safetensors_through_torch(
    compressed: Path, tmp_path: Path
) -> None:
    # compressed chunks cannot be copied file to file: the describing reader leaves the
    # folder to the torch path, and convert writes the same file either way
    from optckpt.convert import convert_checkpoint
    from optckpt.io.dcp.describe import describe_dcp

    assert describe_dcp(compressed, data=True) is None
    described, loaded = tmp_path / "d.safetensors", tmp_path / "t.safetensors"
    convert_checkpoint(compressed, described)
    convert_checkpoint(compressed, loaded, describe=False)
    assert described.read_bytes() == loaded.read_bytes()


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_a_tensor_in_a_compressed_value_is_written_from_its_decompressed_bytes(
    fmt: str, tmp_path: Path
) -> None:
    """A 0-dim tensor inside a value (a tuple, pickled whole) of a compressed folder is
    described in the value's decompressed bytes: the torch-free writers read it there, not
    at the same offset of the file, where the bytes are compressed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._extension import ZStandard

    from optckpt.io.dcp.describe import describe_dcp
    from optckpt.io.read import load_checkpoint
    from optckpt.io.write import save_checkpoint

    folder = tmp_path / "ckpt"
    writer = dcp.FileSystemWriter(str(folder), _extensions=[ZStandard()])
    dcp.save({"extra": (torch.tensor(3.25), "x")}, storage_writer=writer)
    described = describe_dcp(folder, data=True)
    assert described is not None
    out = tmp_path / f"out.{fmt}"
    save_checkpoint(described.root, out, fmt)
    reference = dcp_as_torch_reads_it(folder, tmp_path)
    assert_bitwise_equal(load_checkpoint(out).root["extra"], reference["extra"])
