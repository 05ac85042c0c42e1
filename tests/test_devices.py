"""Saved devices through the commands that make new tensors: resume-step -o, remap, convert.

Inputs are "CUDA checkpoints" written on the CPU box: real torch.optim state saved with
location tags (``save_torch(..., placement=...)``, the mechanism the writers use: devices by
key path), every tensor tagged ``cuda:0`` except the ``step``s torch keeps on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from checks import saved_devices as devices_of

from optckpt.convert import convert_checkpoint
from optckpt.io import load_checkpoint
from optckpt.io.torch_format import save_torch
from optckpt.locate import tensor_paths
from optckpt.remapping import remap_checkpoint
from optckpt.resume import ResumeOptions, resume_step

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def save_tagged(tree: Any, path: Path, cpu_steps: bool = True) -> Path:
    """Write ``tree`` as if saved on cuda:0 (``step``s on the CPU unless ``cpu_steps`` is off)."""
    devices = {
        key: "cpu" if cpu_steps and key[-1] == "step" else "cuda:0" for key, _ in tensor_paths(tree)
    }
    save_torch(tree, path, placement=devices)
    return path


def saved_devices(path: Path) -> dict[str, str | None]:
    return devices_of(load_checkpoint(path))


def adam_checkpoint(**options: Any) -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(5, 3)).square().sum().backward()
    model[1].bias.grad = None  # a parameter with no state yet
    optimizer.step()
    state = optimizer.state_dict()
    state["param_groups"][0].update(options)
    return {"model": model.state_dict(), "optimizer": state}


def test_resume_output_keeps_capturable_and_its_devices(tmp_path: Path) -> None:
    """Stepped on the CPU with capturable off, written back with capturable on, on cuda:0."""
    checkpoint = adam_checkpoint(capturable=True)
    src = save_tagged(checkpoint, tmp_path / "in.pt", cpu_steps=False)  # capturable: on device
    report = resume_step(src, ResumeOptions(out=tmp_path / "out.pt"))
    assert report.ok, report.checks
    out = torch.load(tmp_path / "out.pt", weights_only=True, map_location="cpu")
    assert out["optimizer"]["param_groups"][0]["capturable"] is True
    devices = saved_devices(tmp_path / "out.pt")
    assert set(devices.values()) == {"cuda:0"}, devices
    assert "/optimizer/state/3/exp_avg" in devices  # the state made by this step


def test_resume_output_tags_state_made_by_the_step(tmp_path: Path) -> None:
    """A parameter without state gets it on the step: moments on cuda:0, step on the CPU."""
    src = save_tagged(adam_checkpoint(), tmp_path / "in.pt")
    assert 3 not in torch.load(src, weights_only=True, map_location="cpu")["optimizer"]["state"]
    assert resume_step(src, ResumeOptions(out=tmp_path / "out.pt")).ok
    devices = saved_devices(tmp_path / "out.pt")
    for pid in range(4):
        assert devices[f"/optimizer/state/{pid}/exp_avg"] == "cuda:0"
        assert devices[f"/optimizer/state/{pid}/step"] == "cpu"
    assert {devices[f"/model/{k}"] for k in ("0.weight", "1.bias")} == {"cuda:0"}


def test_resume_output_keeps_a_tensor_lr_and_list_state_on_their_devices(tmp_path: Path) -> None:
    """LBFGS keeps lists of tensors (their new entries too); a Tensor lr keeps its device."""
    tree = torch.load(FIXTURES / "regenerated/lbfgs.pt", weights_only=True)
    tree["optimizer"]["param_groups"][0]["lr"] = torch.tensor(
        tree["optimizer"]["param_groups"][0]["lr"]
    )
    src = save_tagged(tree, tmp_path / "in.pt")
    before = saved_devices(src)
    assert resume_step(src, ResumeOptions(steps=2, out=tmp_path / "out.pt")).ok
    after = saved_devices(tmp_path / "out.pt")
    assert len(after) > len(before)  # the history lists grew
    assert set(after.values()) == {"cuda:0"}, after


def test_remap_cast_state_keeps_the_saved_device(tmp_path: Path) -> None:
    layout = json.loads((FIXTURES / "layouts/toy.json").read_text())
    layout["params"]["0.weight"]["dtype"] = "bfloat16"  # ID 0 of the regenerated Adam
    (tmp_path / "bf16.json").write_text(json.dumps(layout))
    tree = torch.load(FIXTURES / "regenerated/adam.pt", weights_only=True)
    src = save_tagged(tree, tmp_path / "in.pt")
    for name in ("out.pt", "out.safetensors"):
        remap_checkpoint(src, tmp_path / "bf16.json", tmp_path / name)
        out = load_checkpoint(tmp_path / name)
        cast = out.root["optimizer"]["state"][0]["exp_avg"]
        assert cast.dtype == torch.bfloat16
        assert saved_devices(tmp_path / name) == saved_devices(src)


def test_empty_tensors_keep_their_own_saved_devices(tmp_path: Path) -> None:
    """Devices are keyed by key path, not by storage address: an empty tensor (no address)
    keeps its own saved device and never lends it to another empty tensor."""
    tree = {"a": torch.zeros(0), "b": torch.zeros(0), "w": torch.ones(2)}
    save_torch(tree, tmp_path / "in.pt", placement={("a",): "cuda:0", ("w",): "cuda:0"})
    convert_checkpoint(tmp_path / "in.pt", tmp_path / "x.safetensors")
    convert_checkpoint(tmp_path / "x.safetensors", tmp_path / "y.pt")
    for name in ("in.pt", "x.safetensors", "y.pt"):
        expected = {"/a": "cuda:0", "/b": "cpu", "/w": "cuda:0"}
        assert saved_devices(tmp_path / name) == expected, name


def test_a_storage_shared_by_a_moved_tensor_records_where_it_is(tmp_path: Path) -> None:
    """One storage is one record of a torch file: when the tensors on it disagree (one was
    moved, one kept), it records the CPU, where it is."""
    w = torch.ones(3)
    tree = {"model": {"w": w}, "state": {"w": w}}
    save_torch(tree, tmp_path / "in.pt", placement={("model", "w"): "cuda:0"})
    assert set(saved_devices(tmp_path / "in.pt").values()) == {"cpu"}
    save_torch(
        tree, tmp_path / "in.pt", placement={("model", "w"): "cuda:0", ("state", "w"): "cuda:0"}
    )
    assert set(saved_devices(tmp_path / "in.pt").values()) == {"cuda:0"}


def _split_over_two_gpus(checkpoint: dict[str, Any]) -> dict[tuple[object, ...], str]:
    """The saved devices of :func:`adam_checkpoint` as if its model were split over two GPUs:
    layer 1 (parameter IDs 2, 3) and its state on cuda:1, layer 0 on cuda:0, steps on the CPU."""
    devices: dict[tuple[object, ...], str] = {
        ("model", name): "cuda:1" if name.startswith("1.") else "cuda:0"
        for name in checkpoint["model"]
    }
    for pid, state in checkpoint["optimizer"]["state"].items():
        for key in state:
            device = "cuda:1" if pid >= 2 else "cuda:0"
            devices["optimizer", "state", pid, key] = "cpu" if key == "step" else device
    return devices


def test_resume_output_puts_new_state_with_its_parameter(tmp_path: Path) -> None:
    """State made by the step takes its parameter's saved device: cuda:1 for the second layer
    of a model split over two GPUs, cuda:0 for the first; also when no state existed at all."""
    for with_state in (False, True):
        checkpoint = adam_checkpoint()
        if not with_state:
            checkpoint["optimizer"]["state"] = {}
        devices = _split_over_two_gpus(checkpoint)
        src = tmp_path / f"in{with_state}.pt"
        save_torch(checkpoint, src, placement=devices)
        out = tmp_path / f"out{with_state}.pt"
        assert resume_step(src, ResumeOptions(out=out)).ok
        got = saved_devices(out)
        for pid in range(4):
            expected = "cuda:1" if pid >= 2 else "cuda:0"
            assert got[f"/optimizer/state/{pid}/exp_avg"] == expected, (with_state, pid)
            assert got[f"/optimizer/state/{pid}/step"] == "cpu"


def test_move_dtype_keeps_the_device_of_a_weight_the_state_shares(tmp_path: Path) -> None:
    """The state's cast copy moves; the model weight it shared storage with does not."""
    from optckpt.move import move_checkpoint

    w = torch.ones(3)
    tree = {
        "model": {"w": w},
        "optimizer": {
            "state": {0: {"master": w, "step": torch.tensor(1.0)}},
            "param_groups": [{"lr": 0.1, "params": [0]}],
        },
    }
    src = save_tagged(tree, tmp_path / "in.pt")
    result = move_checkpoint(src, tmp_path / "out.pt", device="cpu", dtype="float64")
    devices = saved_devices(tmp_path / "out.pt")
    assert devices["/model/w"] == "cuda:0"
    assert devices["/optimizer/state/0/master"] == "cpu"
    assert result.kept_on == ["cuda:0"]


def test_remap_state_keeps_its_own_device_by_name(tmp_path: Path) -> None:
    """A model split over two GPUs, remapped to a layout that lists the parameters in reverse
    and casts one to bfloat16: each parameter's state keeps the device it was saved from,
    found by name (the old ID at the new one's place), cast or not."""
    checkpoint = adam_checkpoint()
    devices = _split_over_two_gpus(checkpoint)
    src = tmp_path / "in.pt"
    save_torch(checkpoint, src, placement=devices)
    names = ["1.bias", "1.weight", "0.bias", "0.weight"]
    params = {n: {"shape": list(checkpoint["model"][n].shape)} for n in names}
    params["0.weight"]["dtype"] = "bfloat16"
    (tmp_path / "reversed.json").write_text(
        json.dumps({"params": params, "groups": [{"params": names, "lr": 0.01}]})
    )
    remap_checkpoint(src, tmp_path / "reversed.json", tmp_path / "out.pt")
    got = saved_devices(tmp_path / "out.pt")
    assert load_checkpoint(tmp_path / "out.pt").root["optimizer"]["state"][3]["exp_avg"].dtype == (
        torch.bfloat16
    )
    for new_pid, name in enumerate(names):
        if name == "1.bias":  # no state before the remap, none after
            assert f"/optimizer/state/{new_pid}/exp_avg" not in got
            continue
        expected = "cuda:1" if name.startswith("1.") else "cuda:0"
        assert got[f"/optimizer/state/{new_pid}/exp_avg"] == expected, name
        assert got[f"/optimizer/state/{new_pid}/step"] == "cpu", name
    assert {got[f"/model/{n}"] for n in names} == {"cuda:0", "cuda:1"}  # the weights as they were
