"""``move`` and ``remap`` of a DCP folder stream: each tensor is read (assembled from its
chunks), cast where the command casts it, and written one at a time, to a ``.pt`` file, a
safetensors file or a DCP folder (through torch's own writer).

Every result is compared with torch's own reading of the input folder
(``dcp_to_torch_save``), cast with torch's ``.to(dtype)``; a DCP output is read back by torch
too. That the streaming path is taken is asserted on behaviour: every tensor is made by its
placeholder when written, and no more than one made tensor holds memory at any time.
Folders come from ``torch.distributed.checkpoint.save`` in this process; sharded tensors
(FSDP2 on two ranks) are in ``tests/real/test_dcp_real.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from checks import (
    assert_same_bits,
    dcp_as_torch_reads_it,
    dcp_save_trained,
    flat_optimizer_state,
    track_assemblies,
)

from optckpt.io import load_checkpoint
from optckpt.move import move_checkpoint
from optckpt.remapping import remap_checkpoint

KINDS = {"pt": "out.pt", "safetensors": "out.safetensors", "dcp": "out/"}


# dcp.save without a process group warns that it assumes one process
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _save(folder: Path, *, compress: bool = False) -> None:
    """dcp.save of get_state_dict's model and AdamW after three steps, with an integer
    tensor and plain values beside them (``compress``: through torch's ZStandard)."""
    extra = {"ids": torch.arange(7), "epoch": 3}
    dcp_save_trained(folder, (4, 5, 3), steps=3, batch=2, extra=extra, compress=compress)


def _read_back(out: Path, kind: str, scratch: Path) -> Any:
    """The output as torch reads it (safetensors in optckpt's layout: optckpt's reader)."""
    if kind == "pt":
        return torch.load(out, weights_only=True)
    if kind == "dcp":
        return dcp_as_torch_reads_it(out, scratch)
    return load_checkpoint(out).root


def _cast(
    flat: dict[Any, torch.Tensor], dtype: torch.dtype, keep: frozenset[Any] = frozenset()
) -> Any:
    """``flat`` cast as torch's policy casts optimizer state: floating tensors to ``dtype``,
    never ``step`` nor the keys in ``keep``."""
    return {
        k: v if k[-1] == "step" or k in keep or not v.is_floating_point() else v.to(dtype=dtype)
        for k, v in flat.items()
    }


def _placeholders(reference: Any) -> int:
    """Tensors a DCP folder keeps as placeholders until written: those with dimensions."""
    count = 0

    def walk(node: Any) -> None:
        nonlocal count
        if isinstance(node, torch.Tensor):
            count += bool(node.dim()) and node.is_floating_point()
        elif isinstance(node, dict):
            for v in node.values():
                walk(v)

    walk(reference)
    return count


@pytest.mark.parametrize("all_tensors", [False, True], ids=["state", "all-tensors"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_move_dtype_streams_and_equals_torch_cast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, all_tensors: bool
) -> None:
    folder = tmp_path / "ckpt"
    _save(folder)
    reference = dcp_as_torch_reads_it(folder, tmp_path)
    made = track_assemblies(monkeypatch)
    out = tmp_path / KINDS[kind]
    move_checkpoint(
        folder, str(out) + ("/" if kind == "dcp" else ""), dtype="bfloat16",
        all_tensors=all_tensors,
    )  # fmt: skip
    back = _read_back(out, kind, tmp_path)
    want = _cast(flat_optimizer_state(reference["optim"]), torch.bfloat16)
    assert_same_bits(flat_optimizer_state(back["optim"]), want)
    model = {(k,): v for k, v in reference["model"].items()}
    want_model = _cast(model, torch.bfloat16) if all_tensors else model
    assert_same_bits({(k,): v for k, v in back["model"].items()}, want_model)
    assert torch.equal(back["extra"]["ids"], reference["extra"]["ids"])
    assert back["extra"]["epoch"] == 3
    # streamed: every tensor made by its placeholder when written, one alive at a time
    assert made.made == _placeholders(reference)
    assert made.most_alive == 1


@pytest.mark.parametrize("kind", list(KINDS))
def test_remap_streams_and_equals_torch_cast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """A layout that renames nothing, casts one parameter to bfloat16, drops one and adds a
    new one: carried state by name, the cast one's floating state cast, step kept."""
    folder = tmp_path / "ckpt"
    _save(folder)
    reference = dcp_as_torch_reads_it(folder, tmp_path)
    layout = {
        "params": {
            "0.weight": {"shape": [5, 4], "dtype": "bfloat16"},
            "0.bias": {"shape": [5], "dtype": "float32"},
            "2.weight": {"shape": [3, 5], "dtype": "float32"},
            "4.weight": {"shape": [2, 3], "dtype": "float32"},
        },
        "groups": [{"params": ["0.weight", "0.bias", "2.weight", "4.weight"]}],
    }
    (tmp_path / "layout.json").write_text(json.dumps(layout))
    made = track_assemblies(monkeypatch)
    out = tmp_path / KINDS[kind]
    result = remap_checkpoint(
        folder, tmp_path / "layout.json", str(out) + ("/" if kind == "dcp" else "")
    )
    assert result.plan.dropped == ["2.bias"] and result.plan.groups[0].new == ["4.weight"]
    back = _read_back(out, kind, tmp_path)
    flat = flat_optimizer_state(reference["optim"])
    kept = {k: v for k, v in flat.items() if k[0] != "2.bias"}
    want = _cast(kept, torch.bfloat16, keep=frozenset(k for k in kept if k[0] != "0.weight"))
    assert_same_bits(flat_optimizer_state(back["optim"]), want)
    assert_same_bits(
        {(k,): v for k, v in back["model"].items()},
        {(k,): v for k, v in reference["model"].items()},
    )
    assert made.made == _placeholders({"model": reference["model"], "state": kept})
    assert made.most_alive == 1


def test_move_to_another_device_reads_the_tensors(tmp_path: Path) -> None:
    """A move to a device other than the CPU reads every tensor and moves it: ``meta`` here
    (the only other device every machine has), kept as torch's ``.to`` makes it."""
    folder = tmp_path / "ckpt"
    _save(folder)
    reference = dcp_as_torch_reads_it(folder, tmp_path)
    move_checkpoint(folder, tmp_path / "meta.pt", device="meta")
    back = torch.load(tmp_path / "meta.pt", weights_only=True)
    for (fqn, key), value in flat_optimizer_state(back["optim"]).items():
        want = reference["optim"]["state"][fqn][key]
        if key == "step":
            assert torch.equal(value, want)
        else:
            assert value.device.type == "meta" and value.shape == want.shape


@pytest.mark.parametrize("compress", [False, True], ids=["stored", "zstd"])
def test_convert_dcp_to_dcp_streams_and_equals_torch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compress: bool
) -> None:
    """A DCP output from a DCP folder: torch's writer asks for each tensor in turn, and the
    one made before is freed then (a compressed chunk's too, decompressed into memory)."""
    from optckpt.convert import convert_checkpoint

    if compress:
        pytest.importorskip("zstandard")
    folder = tmp_path / "ckpt"
    _save(folder, compress=compress)
    reference = dcp_as_torch_reads_it(folder, tmp_path)
    made = track_assemblies(monkeypatch)
    convert_checkpoint(folder, f"{tmp_path / 'again'}/")
    back = dcp_as_torch_reads_it(tmp_path / "again", tmp_path)
    flat = flat_optimizer_state(reference["optim"])
    assert_same_bits(flat_optimizer_state(back["optim"]), flat)
    assert_same_bits(
        {(k,): v for k, v in back["model"].items()},
        {(k,): v for k, v in reference["model"].items()},
    )
    # each a view of its file (one process saved it whole): none holds memory of its own;
    # decompressed, each does, and is freed before the next
    assert made.made == _placeholders(reference) and made.most_alive == int(compress)
