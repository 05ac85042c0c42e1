"""move: the casting policy of torch's load_state_dict, applied to a file; the rest kept."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from checks import saved_devices, trained_adam
from torch import nn

from optckpt.errors import UsageError
from optckpt.move import move_checkpoint, move_state, parse_device, parse_dtype

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def _trained(fused_or_capturable: str | None = None) -> tuple[nn.Module, torch.optim.Adam]:
    kwargs = {fused_or_capturable: True} if fused_or_capturable else {}
    return trained_adam(lambda: nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), 2, **kwargs)


def test_dtype_casts_floating_state_but_never_step(tmp_path: Path) -> None:
    model, opt = _trained()
    src = tmp_path / "in.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 2}, src)
    move_checkpoint(src, tmp_path / "out.pt", device="cpu", dtype="bfloat16")
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    original = torch.load(src, weights_only=True)
    for pid, state in out["optimizer"]["state"].items():
        assert state["step"].dtype == torch.float32
        assert torch.equal(state["step"], original["optimizer"]["state"][pid]["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            assert state[key].dtype == torch.bfloat16
            assert torch.equal(state[key], original["optimizer"]["state"][pid][key].bfloat16())
    # the rest of the file is untouched
    assert out["epoch"] == 2
    assert all(
        torch.equal(out["model"][k], v) and v.dtype == torch.float32
        for k, v in original["model"].items()
    )
    assert out["optimizer"]["param_groups"] == original["optimizer"]["param_groups"]


def test_moved_state_loads_into_torch_like_the_original(tmp_path: Path) -> None:
    model, opt = _trained()
    src = tmp_path / "in.pt"
    torch.save(opt.state_dict(), src)
    move_checkpoint(src, tmp_path / "out.pt", device="cpu", dtype="float64")
    fresh = torch.optim.Adam(model.parameters(), lr=1e-2)
    fresh.load_state_dict(torch.load(tmp_path / "out.pt", weights_only=True))
    # torch casts state back to the float32 params on load: the values round-trip exactly
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            assert fresh.state[p][key].dtype == torch.float32
            assert torch.equal(fresh.state[p][key], opt.state[p][key])


def test_all_tensors_moves_model_weights_too(tmp_path: Path) -> None:
    model, opt = _trained()
    src = tmp_path / "in.pt"
    torch.save(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "ids": torch.arange(3)}, src
    )
    move_checkpoint(src, tmp_path / "out.pt", device="cpu", dtype="float16", all_tensors=True)
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert all(v.dtype == torch.float16 for v in out["model"].values())
    assert out["ids"].dtype == torch.int64  # integer tensors keep their dtype
    assert all(s["step"].dtype == torch.float32 for s in out["optimizer"]["state"].values())


@pytest.mark.parametrize("flag", ["capturable", "fused"])
def test_step_follows_the_state_when_fused_or_capturable(flag: str) -> None:
    _, opt = _trained()
    sd = opt.state_dict()
    sd["param_groups"][0][flag] = True
    moved = move_state(sd, torch.device("meta"))
    for state in moved["state"].values():
        assert state["step"].device.type == "meta" and state["step"].dtype == torch.float32
        assert state["exp_avg"].device.type == "meta"
    # without the flag, step stays on the CPU
    plain = move_state(opt.state_dict(), torch.device("meta"))
    assert all(s["step"].device.type == "cpu" for s in plain["state"].values())
    assert all(s["exp_avg"].device.type == "meta" for s in plain["state"].values())


def test_matches_torch_load_state_dict_casting_on_meta() -> None:
    """Moving state to a device is what torch's load does for params living there."""
    _, opt = _trained()
    sd = opt.state_dict()
    sd["param_groups"][0]["capturable"] = True
    meta_params = [
        torch.empty(p.shape, device="meta", requires_grad=True)
        for p in opt.param_groups[0]["params"]
    ]
    target = torch.optim.Adam(meta_params, capturable=True)
    target.load_state_dict(sd)
    moved = move_state(sd, torch.device("meta"))
    for pid, p in enumerate(meta_params):
        for key, value in target.state[p].items():
            assert moved["state"][pid][key].device == value.device
            assert moved["state"][pid][key].dtype == value.dtype


def test_input_is_not_modified(tmp_path: Path) -> None:
    src = FIXTURES / "cuda_adam.pt"
    before = src.read_bytes()
    move_checkpoint(src, tmp_path / "out.pt", device="cpu", dtype="bfloat16")
    assert src.read_bytes() == before


def test_cuda_checkpoint_moves_to_cpu_without_a_gpu(tmp_path: Path) -> None:
    move_checkpoint(FIXTURES / "cuda_adam.pt", tmp_path / "out.pt", device="cpu")
    from optckpt.io import load_checkpoint

    moved = load_checkpoint(tmp_path / "out.pt")
    assert saved_devices(moved)["/optimizer/state/0/exp_avg"] == "cpu"


@pytest.mark.parametrize("all_tensors", [False, True])
def test_what_does_not_move_keeps_its_saved_device(tmp_path: Path, all_tensors: bool) -> None:
    """Moving a CUDA checkpoint's optimizer state leaves the model weights tagged cuda:0."""
    move_checkpoint(
        FIXTURES / "cuda_adam.pt", tmp_path / "out.pt", device="cpu", all_tensors=all_tensors
    )
    from optckpt.io import load_checkpoint

    devices = saved_devices(load_checkpoint(tmp_path / "out.pt"))
    weights = {d for key, d in devices.items() if key.startswith("/model/")}
    assert weights == ({"cpu"} if all_tensors else {"cuda:0"})
    state = {d for key, d in devices.items() if key.startswith("/optimizer/state/")}
    assert state == {"cpu"}


@pytest.mark.parametrize(("all_tensors", "suffix"), [(False, ".pt"), (True, ".safetensors")])
def test_dtype_without_device_casts_where_each_tensor_was_saved(
    tmp_path: Path, all_tensors: bool, suffix: str
) -> None:
    """A CUDA checkpoint cast without --device: every tensor keeps its saved device, floating
    state takes the dtype (the weights too with --all-tensors), step keeps its own."""
    src = FIXTURES / "cuda_adam.pt"
    out = tmp_path / f"out{suffix}"
    result = move_checkpoint(src, out, dtype="bfloat16", all_tensors=all_tensors)
    assert (result.device, result.kept_on) == (None, [])
    from optckpt.io import load_checkpoint

    assert saved_devices(load_checkpoint(out)) == saved_devices(load_checkpoint(src))
    original = torch.load(src, weights_only=True, map_location="cpu")
    moved = load_checkpoint(out).root
    for pid, state in original["optimizer"]["state"].items():
        for key, value in state.items():
            want = value if key == "step" else value.bfloat16()
            assert moved["optimizer"]["state"][pid][key].dtype == want.dtype
            assert torch.equal(moved["optimizer"]["state"][pid][key], want)
    for name, value in original["model"].items():
        want = value.bfloat16() if all_tensors and value.is_floating_point() else value
        assert moved["model"][name].dtype == want.dtype and torch.equal(moved["model"][name], want)


def test_move_needs_a_device_or_a_dtype(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--device, --dtype or both"):
        move_checkpoint(FIXTURES / "adamw_train.pt", tmp_path / "o.pt")
    assert list(tmp_path.iterdir()) == []


def test_bad_device_and_dtype_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not a device"):
        parse_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no such device"):
            move_checkpoint(FIXTURES / "adamw_train.pt", tmp_path / "o.pt", device="cuda")
    with pytest.raises(UsageError, match="bfloat16"):
        parse_dtype("int8")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_moves_to_cuda(tmp_path: Path) -> None:
    move_checkpoint(FIXTURES / "adamw_train.pt", tmp_path / "o.pt", device="cuda")
    out = torch.load(tmp_path / "o.pt", weights_only=True, map_location=None)
    state = out["optimizer"]["state"][0]
    assert state["exp_avg"].is_cuda and not state["step"].is_cuda


@pytest.mark.parametrize("all_tensors", [False, True])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float64"])
def test_streamed_casts_write_what_torch_save_of_the_cast_tree_writes(
    tmp_path: Path, dtype: str, all_tensors: bool
) -> None:
    """move casts each tensor only when it is written; the file is still torch.save's."""
    import io

    model, opt = _trained()
    src = tmp_path / "in.pt"
    tree = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 2}
    torch.save(tree, src)
    move_checkpoint(src, tmp_path / "out.pt", device="cpu", dtype=dtype, all_tensors=all_tensors)
    # the same cast done eagerly on the loaded tree, then torch.save
    loaded = torch.load(src, weights_only=True)
    torch_dtype = parse_dtype(dtype)
    loaded["optimizer"] = move_state(loaded["optimizer"], torch.device("cpu"), torch_dtype)
    if all_tensors:  # the model state dict stays an OrderedDict with its _metadata
        cast = OrderedDict((k, v.to(torch_dtype)) for k, v in loaded["model"].items())
        cast._metadata = loaded["model"]._metadata  # type: ignore[attr-defined]
        loaded["model"] = cast
    buffer = io.BytesIO()
    torch.save(loaded, buffer)
    assert (tmp_path / "out.pt").read_bytes() == buffer.getvalue()


def test_move_to_safetensors_casts_too(tmp_path: Path) -> None:
    model, opt = _trained()
    src = tmp_path / "in.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, src)
    move_checkpoint(src, tmp_path / "out.safetensors", device="cpu", dtype="float16")
    from optckpt.io import load_checkpoint

    out = load_checkpoint(tmp_path / "out.safetensors").root
    original = torch.load(src, weights_only=True)
    for pid, state in out["optimizer"]["state"].items():
        assert state["step"].dtype == torch.float32
        assert torch.equal(state["exp_avg"], original["optimizer"]["state"][pid]["exp_avg"].half())
    assert all(torch.equal(out["model"][k], v) for k, v in original["model"].items())
