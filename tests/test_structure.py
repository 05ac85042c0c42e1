"""The torch-free structure readers (optckpt.io.structure, optckpt.described, optckpt.io.unpickle).

Every fixture goes through ``inspect`` twice, once read by torch and once described, and the
two reports must be the same JSON; ``optckpt inspect`` must not import torch; the dtype table,
the allow-list and ``item()`` are checked against the installed torch.
"""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import _weights_only_unpickler

from optckpt.described import DTYPES, DescribedTensor, is_tensor
from optckpt.errors import UnreadableCheckpointError
from optckpt.inspect import inspect_checkpoint
from optckpt.io.read import sniff
from optckpt.io.structure import describe_safetensors, describe_torch_zip
from optckpt.io.unpickle import STORAGE_CLASSES, TORCH_ZIP_NAMES
from optckpt.locate import tensor_paths

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
CHECKPOINTS = sorted(
    [p for p in FIXTURES.rglob("*") if p.suffix in (".pt", ".ckpt", ".safetensors")]
    + [FIXTURES / "hf_trainer" / "checkpoint-2"]
)
# torch refuses them, or they are a format the describing readers leave to torch
NOT_DESCRIBED = {"unsafe_namespace.pt", "legacy_adam.pt"}


def _report(path: Path, describe: bool) -> str:
    try:
        return json.dumps(inspect_checkpoint(path, describe=describe).to_json())
    except UnreadableCheckpointError as e:
        return f"{type(e).__name__}: {e}"


@pytest.mark.parametrize("path", CHECKPOINTS, ids=lambda p: str(p.relative_to(FIXTURES)))
def test_every_fixture_same_report_both_ways(path: Path) -> None:
    assert _report(path, describe=True) == _report(path, describe=False)


@pytest.mark.parametrize(
    "path",
    [p for p in CHECKPOINTS if p.is_file() and p.name not in NOT_DESCRIBED],
    ids=lambda p: str(p.relative_to(FIXTURES)),
)
def test_fixtures_are_described_not_loaded(path: Path) -> None:
    """The comparison above must compare the two readers, not torch with itself."""
    placement: dict[tuple[object, ...], str] = {}
    if sniff(path) == "torch":
        root = describe_torch_zip(path, placement)
    else:
        root = describe_safetensors(path)
    assert root is not None
    tensors = [t for _, t in tensor_paths(root)]
    assert all(isinstance(t, DescribedTensor) for t in tensors)
    assert tensors or path.name == "scheduler.pt"  # plain values only


_NO_TORCH = """
import contextlib, io, sys
from optckpt.cli.app import main
sys.argv = ["optckpt", "inspect", *sys.argv[1:]]
with contextlib.redirect_stdout(io.StringIO()):
    try:
        main()
    except SystemExit as e:
        assert e.code in (0, None), e.code
print("torch" in sys.modules)
"""


@pytest.mark.parametrize(
    "args",
    [
        ["adamw_train.pt", "--json"],
        ["adamw_train.pt"],
        ["cuda_adam.pt", "--json"],
        ["lightning.ckpt", "--json"],
        ["adamw_train.safetensors", "--json"],
        ["hf_trainer/checkpoint-2", "--json"],
        ["regenerated/lbfgs.pt", "--all"],
    ],
)
def test_inspect_imports_no_torch(args: list[str]) -> None:
    found = subprocess.run(
        [sys.executable, "-c", _NO_TORCH, *args],
        cwd=FIXTURES,
        capture_output=True,
        text=True,
        check=True,
    )
    assert found.stdout.strip() == "False", found.stdout + found.stderr


def test_stats_and_legacy_still_use_torch() -> None:
    found = subprocess.run(
        [sys.executable, "-c", _NO_TORCH, "legacy_adam.pt", "--json"],
        cwd=FIXTURES,
        capture_output=True,
        text=True,
        check=True,
    )
    assert found.stdout.strip() == "True"


def test_dtype_table_is_torchs() -> None:
    theirs = {
        str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)
    }
    assert set(DTYPES) == set(theirs)
    for name, ours in DTYPES.items():
        dtype = theirs[name]
        assert str(ours) == str(dtype)
        assert (ours.itemsize, ours.is_floating_point, ours.is_complex) == (
            dtype.itemsize,
            dtype.is_floating_point,
            dtype.is_complex,
        ), name


def test_storage_classes_hold_torchs_dtypes() -> None:
    for name, dtype in STORAGE_CLASSES.items():
        assert getattr(torch, name.removeprefix("torch.")).dtype == getattr(torch, dtype)


def test_table_is_inside_torchs_allow_list() -> None:
    assert not TORCH_ZIP_NAMES - set(_weights_only_unpickler._get_allowed_globals())


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("dtype", [d for d in DTYPES.values() if d.format], ids=lambda d: d.name)
def test_item_reads_what_torch_reads(tmp_path: Path, dtype: object) -> None:
    torch_dtype = getattr(torch, str(dtype).removeprefix("torch."))
    values = torch.tensor([0.0, -1.5, 3.25e-3, 7.0, 1e30, -2.0]).to(torch.float64)
    if torch_dtype == torch.bool:
        source = torch.tensor([True, False, True, True, False, True])
    elif torch_dtype.is_complex:
        source = torch.complex(values, -values).to(torch_dtype)
    elif torch_dtype.is_floating_point:
        source = values.to(torch_dtype)
    else:
        source = torch.tensor([0, 1, 2, 3, 5, 100]).to(torch_dtype)
    # 0-dim views at offsets and a one-element slice: the storage is shared
    tree = {"scalars": [source[i] for i in range(6)], "one": source[3:4]}
    path = tmp_path / "x.pt"
    torch.save(tree, path)
    described = describe_torch_zip(path, {})
    assert described is not None
    loaded = torch.load(path, weights_only=True)
    for ours, theirs in zip(
        [*described["scalars"], described["one"]], [*loaded["scalars"], loaded["one"]]
    ):
        assert is_tensor(ours)
        value, expected = ours.item(), theirs.item()
        assert type(value) is type(expected) and (value == expected or value != value), (
            value,
            expected,
        )


def test_tied_weights_share_one_storage(tmp_path: Path) -> None:
    weight = torch.randn(4, 3)
    path = tmp_path / "tied.pt"
    torch.save({"a": weight, "b": weight, "c": weight[1:]}, path)
    root = describe_torch_zip(path, {})
    assert root is not None
    assert root["a"].untyped_storage() is root["b"].untyped_storage()
    assert (root["c"].storage_offset(), root["c"].shape) == (3, (3, 3))


def test_saved_devices_recorded_like_torch(tmp_path: Path) -> None:
    path = FIXTURES / "cuda_adam.pt"
    ours: dict[tuple[object, ...], str] = {}
    assert describe_torch_zip(path, ours) is not None
    from optckpt.io import load_checkpoint

    assert ours == load_checkpoint(path).placement and ours


def _repickled(path: Path, tmp_path: Path, data: bytes) -> Path:
    """``path`` with its data.pkl replaced (CRC recomputed by zipfile)."""
    out = tmp_path / "changed.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            content = data if info.filename.endswith("/data.pkl") else src.read(info)
            dst.writestr(info, content)
    return out


def test_what_the_table_lacks_goes_to_torch(tmp_path: Path) -> None:
    path = tmp_path / "size.pt"
    torch.save({"state": {}, "param_groups": [{"params": [], "shape": torch.Size([2])}]}, path)
    assert describe_torch_zip(path, {}) is None  # torch.Size: not in the table
    assert _report(path, describe=True) == _report(path, describe=False)


def test_build_on_a_dtype_is_left_to_torch(tmp_path: Path) -> None:
    """A pickle that BUILDs on a global (torch refuses) must not change optckpt's table."""
    buf = io.BytesIO()
    buf.write(b"\x80\x02ctorch\nfloat32\n}X\x08\x00\x00\x00itemsizeK\x07sb.")
    path = tmp_path / "base.pt"
    torch.save({}, path)
    changed = _repickled(path, tmp_path, buf.getvalue())
    with pytest.raises(pickle.UnpicklingError):
        torch.load(changed, weights_only=True)
    assert describe_torch_zip(changed, {}) is None
    assert DTYPES["float32"].itemsize == 4


def test_storage_record_of_another_size_goes_to_torch(tmp_path: Path) -> None:
    path = tmp_path / "base.pt"
    torch.save({"t": torch.zeros(4)}, path)
    with zipfile.ZipFile(path) as z:
        data = z.read("base/data.pkl")
    # claim 8 elements where the record holds 4
    changed = _repickled(path, tmp_path, data.replace(b"K\x04", b"K\x08", 1))
    assert describe_torch_zip(changed, {}) is None


def test_a_reference_cycle_is_refused_as_torch_path_refuses_it(tmp_path: Path) -> None:
    """The described tree is checked before anything walks it (a cycle never ends a walk)."""
    cyclic: list[object] = []
    cyclic.append(cyclic)
    path = tmp_path / "cycle.pt"
    torch.save({"state": {}, "param_groups": [], "loop": cyclic}, path)
    with pytest.raises(UnreadableCheckpointError) as described:
        describe_torch_zip(path, {})
    assert "reference cycle" in str(described.value)
    assert _report(path, describe=True) == _report(path, describe=False)


# --------------------------------------------------------------------------- DCP folders


def _text(path: Path, describe: bool, capsys: pytest.CaptureFixture[str]) -> str:
    """What ``optckpt inspect PATH --all`` prints, with the folder read one way or the other."""
    from optckpt.cli.inspect_cmd import render
    from optckpt.cli.render import print_notes

    capsys.readouterr()
    report = inspect_checkpoint(path, describe=describe)
    render(report, show_all=True)
    print_notes(report.notes)
    return capsys.readouterr().out


def _save_tensor_lr(folder: Path) -> None:
    """Two groups whose lr is the same 0-dim tensor, saved flattened: regrouping compares
    the tensors by value (one group comes back)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    optimizer = torch.optim.Adam(
        [{"params": model[0].parameters()}, {"params": model[1].parameters()}],
        lr=torch.tensor(0.01),
    )
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    msd, osd = get_state_dict(model, optimizer, options=options)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(folder))


@pytest.fixture(scope="module")
def dcp_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every DCP producer of tests/test_dcp.py (real dcp.save in this process, and the
    two-file folders built from torch's metadata classes), and a few that the describing
    reader leaves to torch."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from test_dcp import _save_real, _sharded, _trained

    root = tmp_path_factory.mktemp("dcp")
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    _save_real(root / "default", flatten=False)
    _save_real(root / "flattened", flatten=True)
    _, optimizer = _trained()
    dcp.save({"optim": optimizer.state_dict()}, checkpoint_id=str(root / "id_keyed"))
    for planner in (True, False):
        for flatten in (False, True):
            _sharded(root / f"sharded_{planner}_{flatten}", planner=planner, flatten=flatten)
    _save_tensor_lr(root / "tensor_lr")
    # left to torch: a value naming torch.Size; a missing file
    _, optimizer = _trained()
    extra = {"shape": torch.Size([2, 3])}
    dcp.save({"optim": optimizer.state_dict(), "extra": extra}, checkpoint_id=str(root / "size"))
    _save_real(root / "missing", flatten=False)
    (root / "missing" / "__0_0.distcp").unlink()
    return {p.name: p for p in root.iterdir()}


DCP_DESCRIBED = [
    "default", "flattened", "id_keyed", "tensor_lr",
    *(f"sharded_{p}_{f}" for p in (True, False) for f in (False, True)),
]  # fmt: skip
DCP_TO_TORCH = ["size", "missing"]


@pytest.mark.parametrize("name", DCP_DESCRIBED + DCP_TO_TORCH)
def test_every_dcp_folder_same_report_both_ways(
    dcp_folders: dict[str, Path], name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from optckpt.io.dcp.describe import describe_dcp

    folder = dcp_folders[name]
    described = describe_dcp(folder)
    assert (described is not None) == (name in DCP_DESCRIBED)
    if described is not None:  # compares the two readers, not torch with itself
        tensors = [t for _, t in tensor_paths(described.root)]
        assert tensors and all(isinstance(t, DescribedTensor) for t in tensors)
    assert _report(folder, describe=True) == _report(folder, describe=False)
    if name != "missing":
        assert _text(folder, True, capsys) == _text(folder, False, capsys)


def test_flattened_tensor_lr_groups_rebuilt_by_value(dcp_folders: dict[str, Path]) -> None:
    report = inspect_checkpoint(dcp_folders["tensor_lr"], describe=True).to_json()
    [optim] = report["optimizers"]
    assert len(optim["param_groups"]) == 1  # both groups' lr tensors are equal
    assert optim["param_groups"][0]["num_params"] == 4


@pytest.mark.parametrize("args", [["default", "--json"], ["sharded_True_True"], ["flattened"]])
def test_inspect_of_a_dcp_folder_imports_no_torch(
    dcp_folders: dict[str, Path], args: list[str]
) -> None:
    found = subprocess.run(
        [sys.executable, "-c", _NO_TORCH, str(dcp_folders[args[0]]), *args[1:]],
        capture_output=True,
        text=True,
        check=True,
    )
    assert found.stdout.strip() == "False", found.stdout + found.stderr


def test_dcp_dtype_globals_are_torchs_names_and_aliases() -> None:
    from optckpt.described import DType
    from optckpt.io.dcp.unpickle import METADATA_GLOBALS, TENSOR_GLOBALS

    theirs = {
        f"torch.{name}": str(dtype)
        for name in dir(torch)
        if isinstance(dtype := getattr(torch, name), torch.dtype)
    }
    for table in (METADATA_GLOBALS, TENSOR_GLOBALS):
        assert {k: str(v) for k, v in table.items() if isinstance(v, DType)} == theirs
