"""Checkpoints saved by torch.optim on a real GPU: inspect, move, convert, diff, resume-step.

The CPU box tests CUDA checkpoints through ``fixtures/cuda_adam.pt``, written with patched
storage location tags. Here, where CUDA exists, torch.optim trains on the GPU and saves for
real (foreach, fused and capturable Adam: the last two keep ``step`` on the GPU), and every
command is checked against torch's own loading of the same file. The whole module is one skip
on a machine without CUDA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from checks import assert_bitwise_equal, saved_devices, tensors_by_path
from torch import nn

from optckpt.convert import convert_checkpoint
from optckpt.diff import diff_checkpoints
from optckpt.inspect import inspect_checkpoint
from optckpt.io import load_checkpoint
from optckpt.move import move_checkpoint
from optckpt.optim import Adam
from optckpt.resume import ResumeOptions, resume_step

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
IMPLS = {"foreach": {"foreach": True}, "fused": {"fused": True}, "capturable": {"capturable": True}}


def _model() -> nn.Module:
    """The model of ``fixtures/make_fixtures.py``'s ``cuda_tagged``."""
    torch.manual_seed(10)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 4))


def _train(model: nn.Module, optimizer: Any, steps: int, seed: int = 11) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        x = torch.randn(4, 8, generator=generator).cuda()
        model(x).pow(2).mean().backward()
        optimizer.step()


def _saved_on_cuda(path: Path, impl: str) -> tuple[nn.Module, torch.optim.Adam]:
    model = _model().cuda()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, **IMPLS[impl])
    _train(model, optimizer, 2)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    return model, optimizer


def test_the_tagged_fixture_is_what_a_gpu_saves(tmp_path: Path) -> None:
    """The CPU box's stand-in matches a real CUDA save: same tensors, saved devices and dtypes."""
    _saved_on_cuda(tmp_path / "real.pt", "foreach")
    real, tagged = load_checkpoint(tmp_path / "real.pt"), load_checkpoint(FIXTURES / "cuda_adam.pt")
    real_tensors, tagged_tensors = tensors_by_path(real.root), tensors_by_path(tagged.root)
    real_devices, tagged_devices = saved_devices(real), saved_devices(tagged)
    assert real_tensors.keys() == tagged_tensors.keys()
    for key, t in real_tensors.items():
        other = tagged_tensors[key]
        assert (t.dtype, t.shape) == (other.dtype, other.shape), key
        assert real_devices[key] == tagged_devices[key], key


def test_keeping_saved_devices_puts_state_on_the_gpu() -> None:
    checkpoint = load_checkpoint(FIXTURES / "cuda_adam.pt", map_location=None)
    for state in checkpoint.root["optimizer"]["state"].values():
        assert state["exp_avg"].is_cuda and state["exp_avg_sq"].is_cuda
        assert state["step"].device.type == "cpu"


@pytest.mark.parametrize("impl", list(IMPLS))
def test_inspect_reports_the_saved_devices(tmp_path: Path, impl: str) -> None:
    _saved_on_cuda(tmp_path / "in.pt", impl)
    (opt,) = inspect_checkpoint(tmp_path / "in.pt").optimizers
    step_device = "cpu" if impl == "foreach" else "cuda:0"
    for p in opt.params:
        assert p.state["exp_avg"].device == p.state["exp_avg_sq"].device == "cuda:0"
        assert p.state["step"].device == step_device


@pytest.mark.parametrize("impl", list(IMPLS))
def test_move_to_cpu_and_back_loads_like_torch(tmp_path: Path, impl: str) -> None:
    """CUDA -> CPU -> CUDA: values bitwise kept; each state tensor where torch's load puts it."""
    src, on_cpu, back = tmp_path / "in.pt", tmp_path / "cpu.pt", tmp_path / "back.pt"
    model, optimizer = _saved_on_cuda(src, impl)
    move_checkpoint(src, on_cpu, device="cpu")
    cpu = torch.load(on_cpu, weights_only=True, map_location=None)
    assert {t.device.type for t in tensors_by_path(cpu["optimizer"]).values()} == {"cpu"}
    assert all(t.is_cuda for t in cpu["model"].values())  # only the optimizer state moved
    assert_bitwise_equal(
        cpu["optimizer"], torch.load(src, weights_only=True, map_location="cpu")["optimizer"], "cpu"
    )

    move_checkpoint(on_cpu, back, device="cuda")
    moved = torch.load(back, weights_only=True, map_location=None)["optimizer"]
    reference = torch.optim.Adam(model.parameters(), lr=1e-3, **IMPLS[impl])
    reference.load_state_dict(cpu["optimizer"])  # torch's casting policy, from the CPU file
    expected = reference.state_dict()
    for pid, state in moved["state"].items():
        for key, value in state.items():
            ref = expected["state"][pid][key]
            assert (value.device, value.dtype) == (ref.device, ref.dtype), (pid, key)
    assert_bitwise_equal(moved, optimizer.state_dict(), "back on cuda")


@pytest.mark.parametrize("impl", list(IMPLS))
def test_dtype_only_move_keeps_every_tensor_on_its_gpu(tmp_path: Path, impl: str) -> None:
    """move --dtype without --device: each tensor where torch saved it (fused and capturable
    steps on the GPU too), the optimizer's floating state cast, steps and weights as saved."""
    src, out = tmp_path / "in.pt", tmp_path / "bf16.pt"
    _saved_on_cuda(src, impl)
    move_checkpoint(src, out, dtype="bfloat16")
    original = tensors_by_path(torch.load(src, weights_only=True, map_location=None))
    moved = tensors_by_path(torch.load(out, weights_only=True, map_location=None))
    assert moved.keys() == original.keys()
    for key, before in original.items():
        cast = key.startswith("/optimizer/state/") and not key.endswith("/step")
        want = before.to(torch.bfloat16) if cast and before.is_floating_point() else before
        after = moved[key]
        assert (after.device, after.dtype) == (before.device, want.dtype), key
        assert torch.equal(after, want), key


@pytest.mark.parametrize("impl", list(IMPLS))
def test_convert_round_trip_keeps_cuda_devices(tmp_path: Path, impl: str) -> None:
    src = tmp_path / "in.pt"
    _saved_on_cuda(src, impl)
    convert_checkpoint(src, tmp_path / "c.safetensors")
    convert_checkpoint(tmp_path / "c.safetensors", tmp_path / "back.pt")
    assert diff_checkpoints(src, tmp_path / "back.pt").ok
    original = torch.load(src, weights_only=True, map_location=None)
    back = torch.load(tmp_path / "back.pt", weights_only=True, map_location=None)
    assert_bitwise_equal(back, original, "round trip")
    for key, t in tensors_by_path(original).items():
        assert tensors_by_path(back)[key].device == t.device, key


@pytest.mark.parametrize("impl", list(IMPLS))
def test_resume_step_passes_with_check_torch(tmp_path: Path, impl: str) -> None:
    src = tmp_path / "in.pt"
    _saved_on_cuda(src, impl)
    report = resume_step(src, ResumeOptions(check_torch=True, steps=2, out=tmp_path / "out.pt"))
    failed = [c for c in report.checks if not c.ok]
    assert report.ok, failed
    assert {c.name for c in report.checks} >= {"loads", "matches_torch"}


@pytest.mark.parametrize("impl", list(IMPLS))
def test_bundled_adam_resumes_a_gpu_checkpoint_like_torch(tmp_path: Path, impl: str) -> None:
    """Load the saved state into ours and torch's on the GPU, take steps: bit-identical."""
    src = tmp_path / "in.pt"
    _saved_on_cuda(src, impl)
    runs = []
    for cls in (Adam, torch.optim.Adam):
        # A fresh load for each: both load_state_dicts keep the loaded tensors (no copy when
        # device and dtype already fit), so steps write into them.
        saved = torch.load(src, weights_only=True, map_location=None)
        model = _model().cuda()
        model.load_state_dict(saved["model"])
        optimizer = cls(model.parameters(), lr=1e-3, **IMPLS[impl])
        optimizer.load_state_dict(saved["optimizer"])
        _train(model, optimizer, 3, seed=12)
        runs.append((model, optimizer))
    (ours_model, ours), (theirs_model, theirs) = runs
    assert_bitwise_equal(ours_model.state_dict(), theirs_model.state_dict(), "weights")
    assert_bitwise_equal(ours.state_dict(), theirs.state_dict(), "state")
