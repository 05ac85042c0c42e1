"""Move optimizer state to another device and dtype, following torch's casting policy.

``step`` stays where it is (a CPU float tensor, or a Python number) unless its group is
``fused`` or ``capturable``, whose kernels want it as float32 on the parameter's device —
the rule of ``Optimizer._process_value_according_to_param_policy``. ``dtype`` casts floating
state tensors, never ``step`` and never integer or bool tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from optckpt.chunks import check_bounded
from optckpt.devices import current_devices
from optckpt.errors import UnreadableCheckpointError, UsageError
from optckpt.io import load_checkpoint
from optckpt.io.pages import Releaser
from optckpt.io.torch_format import Deferred, can_defer
from optckpt.io.write import check_output, format_for, save_checkpoint
from optckpt.locate import select_optimizers, tensors_in

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def parse_device(text: str) -> torch.device:
    """Parse and check a device: it must exist on this machine (``meta`` always does).

    Raises:
        UsageError: not a device name, or a device this machine does not have.
    """
    try:
        device = torch.device(text)
    except RuntimeError as e:
        raise UsageError(f"--device {text!r} is not a device ({e})") from e
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, AttributeError) as e:
        raise UsageError(
            f"--device {text}: no such device on this machine ({str(e).splitlines()[0]})"
        ) from e
    return device


def parse_dtype(text: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; only floating dtypes.

    Raises:
        UsageError: any other name.
    """
    try:
        return DTYPES[text.removeprefix("torch.")]
    except KeyError:
        raise UsageError(f"--dtype {text!r}: choose one of {', '.join(DTYPES)}") from None


def _move(
    value: Any,
    key: Any,
    device: torch.device,
    dtype: torch.dtype | None,
    placed: bool,
    on_read: Callable[[int], None] | None = None,
    lazy: bool = False,
    where: str = "a tensor",
) -> Any:
    if isinstance(value, torch.Tensor):
        _check_movable(value, device, where)
        if key == "step":
            return value.to(device=device, dtype=torch.float32) if placed else value
        if dtype is not None and value.is_floating_point():
            if lazy and device.type == "cpu" and can_defer(value, dtype):
                # cast when written, so the cast copies are never all in memory at once
                return Deferred(value, dtype)
            moved = value.to(device=device, dtype=dtype)
        else:
            moved = value.to(device=device)
        if on_read is not None and moved is not value:
            on_read(value.numel() * value.element_size())
        return moved
    if isinstance(value, Mapping):
        return {
            k: _move(v, k, device, dtype, placed, on_read, lazy, f"{where}.{k}")
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        items = [
            _move(v, None, device, dtype, placed, on_read, lazy, f"{where}.{i}")
            for i, v in enumerate(value)
        ]
        return items if isinstance(value, list) else tuple(items)
    return value


def _check_movable(tensor: torch.Tensor, device: torch.device, where: str) -> None:
    """Refuse, before anything is copied, what a move cannot copy: a meta tensor (it has no
    data) to a real device, and a zero-stride view that claims far more than it holds (a
    cast or a device copy materialises every logical element)."""
    if tensor.device.type == "meta" and device.type != "meta":
        raise UnreadableCheckpointError(
            f"{where} is a meta tensor: it has no data to move to {device}"
        )
    check_bounded(tensor, where)


def move_state(
    state_dict: Mapping[str, Any],
    device: torch.device,
    dtype: torch.dtype | None = None,
    *,
    on_read: Callable[[int], None] | None = None,
    lazy: bool = False,
) -> dict[str, Any]:
    """A copy of an optimizer state dict with its state on ``device`` (and ``dtype``).

    Hyperparameters are left as they are (a Tensor ``lr`` stays where it was). ``on_read``
    is told the bytes of every tensor copied (to release memory-mapped input as it goes).
    With ``lazy``, a dtype cast on the CPU is left as a
    :class:`~optckpt.io.torch_format.Deferred`, made when the state is written.

    Raises:
        UnreadableCheckpointError: a meta tensor (no data) to move to a real device, or a
            tensor that claims far more elements than its storage holds (zero strides).
    """
    placed: dict[Any, bool] = {}
    for group in state_dict["param_groups"]:
        flag = bool(group.get("fused") or group.get("capturable"))
        for pid in group["params"]:
            placed.setdefault(pid, flag)
    state = {
        pid: _move(
            value, None, device, dtype, placed.get(pid, False), on_read, lazy, f"state.{pid}"
        )
        for pid, value in state_dict["state"].items()
    }
    return {**state_dict, "state": state}


def move_all(
    node: Any, device: torch.device, dtype: torch.dtype | None, *, lazy: bool = False
) -> Any:
    """Every tensor of a tree (outside optimizer state) to ``device``; floating ones to ``dtype``.

    ``lazy`` as for :func:`move_state`.
    """
    return _move(node, None, device, dtype, False, lazy=lazy)


@dataclass(frozen=True)
class MoveResult:
    """What :func:`move_checkpoint` did."""

    out: Path
    device: str
    dtype: str | None
    optimizers: list[str]
    all_tensors: bool
    kept_on: list[str] = field(default_factory=list)  # devices of tensors left where they were


def move_checkpoint(
    path: str | Path,
    out: str | Path,
    *,
    device: str,
    dtype: str | None = None,
    key: str | None = None,
    all_tensors: bool = False,
    force: bool = False,
    allow_globals: Iterable[str] = (),
    progress: Callable[[int], None] | None = None,
) -> MoveResult:
    """Write ``path`` to ``out`` with its optimizer state moved to ``device`` / ``dtype``.

    Everything else in the file is kept as it was, unless ``all_tensors``: then every tensor
    moves too (model weights take ``dtype`` as well, when floating).

    Raises:
        UsageError: a bad device, dtype or output path.
        UnreadableCheckpointError: the input cannot be read, holds no valid optimizer state,
            or holds tensors that cannot be moved (see :func:`move_state`).
    """
    path, out = Path(path), Path(out)
    target = format_for(out)
    torch_device = parse_device(device)
    torch_dtype = parse_dtype(dtype) if dtype is not None else None
    check_output(out, [path], force=force)
    if path.is_dir():
        raise UsageError(
            f"{path} is a folder; move the optimizer file in it (e.g. {path}/optimizer.pt)"
        )
    checkpoint = load_checkpoint(path, allow_globals=allow_globals)
    found = select_optimizers(checkpoint.root, key)
    releaser = Releaser(checkpoint.sources)
    # What stays records the device it was saved from (a CUDA checkpoint's model weights stay
    # tagged cuda:0); what moves records where it went.
    kept_devices = {} if all_tensors else current_devices(checkpoint)
    moved = {
        id(f.state_dict): move_state(
            f.state_dict, torch_device, torch_dtype, on_read=releaser.read, lazy=True
        )
        for f in found
    }
    for state_dict in moved.values():  # casts made when written are new storages anyway
        for _, tensor in tensors_in(state_dict["state"]):
            kept_devices.pop(tensor.untyped_storage().data_ptr(), None)
    # The loaded tree is ours (the file is mapped copy-on-write): swap the moved state in.
    for f in found:
        f.state_dict["state"] = moved[id(f.state_dict)]["state"]
    root = checkpoint.root
    if all_tensors:
        root = _move_outside(root, torch_device, torch_dtype, set(moved))
    save_checkpoint(
        root,
        out,
        target,
        progress=progress,
        sources=checkpoint.sources,
        saved_devices=kept_devices,
    )
    return MoveResult(
        out=out,
        device=str(torch_device),
        dtype=None if torch_dtype is None else str(torch_dtype).removeprefix("torch."),
        optimizers=[f.key for f in found],
        all_tensors=all_tensors,
        kept_on=sorted(
            {kept_devices.get(t.untyped_storage().data_ptr(), "cpu") for _, t in tensors_in(root)}
            - {"cpu", str(torch_device)}
        ),
    )


def _move_outside(
    node: Any, device: torch.device, dtype: torch.dtype | None, done: set[int]
) -> Any:
    """Move every tensor but the optimizer states already moved (their dicts' ids in ``done``)."""
    if id(node) in done:
        return node
    if isinstance(node, Mapping):
        return {k: _move_outside(v, device, dtype, done) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        items = [_move_outside(v, device, dtype, done) for v in node]
        return items if isinstance(node, list) else tuple(items)
    return move_all(node, device, dtype, lazy=True)
