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
from optckpt.devices import forget_placement, fused_or_capturable
from optckpt.errors import UnreadableCheckpointError, UsageError
from optckpt.io.pages import Releaser
from optckpt.io.rewrite import plan_rewrite
from optckpt.io.torch_format import Deferred, can_defer
from optckpt.io.write import ProgressStart
from optckpt.locate import KeyPath, tensor_paths
from optckpt.statedict import cast_tree, key_of

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


Later = Callable[[torch.Tensor, torch.dtype | None], torch.Tensor | None]
"""A checkpoint's :meth:`~optckpt.io.Checkpoint.later`: for a placeholder whose tensor is
read only when written, one for its cast (itself for ``None``); ``None`` for a real tensor."""


def _moved(
    tensor: torch.Tensor,
    key: Any,
    device: torch.device | None,
    dtype: torch.dtype | None,
    placed: bool,
    on_read: Callable[[int], None] | None = None,
    lazy: bool = False,
    later: Later | None = None,
) -> Any:
    """One tensor moved by the casting policy of the module doc (``placed``: its group is
    fused or capturable); ``device`` ``None`` keeps it where it is. A placeholder (``later``;
    ``device`` ``None`` or the CPU) stays one, of the cast the policy makes."""
    where = tensor.device if device is None else device
    if later is not None and (device is None or device.type == "cpu"):
        if key == "step":
            cast = torch.float32 if placed else None
        else:
            cast = dtype if dtype is not None and tensor.is_floating_point() else None
        stand_in = later(tensor, cast)
        if stand_in is not None:
            return stand_in
    if key == "step":
        return tensor.to(device=where, dtype=torch.float32) if placed else tensor
    if dtype is not None and tensor.is_floating_point():
        if lazy and where.type == "cpu" and can_defer(tensor, dtype):
            # cast when written, so the cast copies are never all in memory at once
            return Deferred(tensor, dtype)
        moved = tensor.to(device=where, dtype=dtype)
    else:
        moved = tensor.to(device=where)
    if on_read is not None and moved is not tensor:
        on_read(tensor.numel() * tensor.element_size())
    return moved


def _where(prefix: str, path: KeyPath) -> str:
    """A tensor's place for a message: ``state.3.exp_avg``."""
    return ".".join([prefix, *map(str, path)]) if prefix else ".".join(map(str, path))


def _stays_placeholder(
    tensor: torch.Tensor, device: torch.device | None, later: Later | None
) -> bool:
    """Whether ``tensor`` is a placeholder that a move to ``device`` keeps one (its tensor
    read, and cast, when written)."""
    return (
        later is not None
        and (device is None or device.type == "cpu")
        and later(tensor, None) is not None
    )


def _check_movable(tensor: torch.Tensor, device: torch.device | None, where: str) -> None:
    """Refuse, before anything is copied, what a move cannot copy: a meta tensor (it has no
    data) to a real device, and a zero-stride view that claims far more than it holds (a
    cast or a device copy materialises every logical element)."""
    if tensor.device.type == "meta" and device is not None and device.type != "meta":
        raise UnreadableCheckpointError(
            f"{where} is a meta tensor: it has no data to move to {device}"
        )
    check_bounded(tensor, where)


def move_state(
    state_dict: Mapping[str, Any],
    device: torch.device | None,
    dtype: torch.dtype | None = None,
    *,
    on_read: Callable[[int], None] | None = None,
    lazy: bool = False,
    later: Later | None = None,
) -> dict[str, Any]:
    """A copy of an optimizer state dict with its state on ``device`` (and ``dtype``);
    ``device`` ``None`` keeps each tensor where it is (``step`` included: torch's policy
    moves it only to follow its parameter).

    Hyperparameters are left as they are (a Tensor ``lr`` stays where it was). ``on_read``
    is told the bytes of every tensor copied (to release memory-mapped input as it goes).
    With ``lazy``, a dtype cast on the CPU is left as a
    :class:`~optckpt.io.torch_format.Deferred`, made when the state is written. ``later``
    (the checkpoint's :meth:`~optckpt.io.Checkpoint.later`): with ``device`` ``None`` or
    the CPU, a placeholder of a DCP folder stays one, of the cast, read and cast only when
    written.

    Raises:
        UnreadableCheckpointError: a meta tensor (no data) to move to a real device, or a
            tensor that claims far more elements than its storage holds (zero strides).
    """
    placed = fused_or_capturable(state_dict)
    # every tensor checked before any is copied (a placeholder is read when written)
    for path, tensor in tensor_paths(state_dict["state"]):
        if not _stays_placeholder(tensor, device, later):
            _check_movable(tensor, device, _where("state", path))

    def mover(pid: Any) -> Callable[[torch.Tensor, KeyPath], Any]:
        flag = placed.get(pid, False)
        return lambda tensor, path: _moved(
            tensor, key_of(path), device, dtype, flag, on_read, lazy, later
        )

    state = {pid: cast_tree(value, mover(pid)) for pid, value in state_dict["state"].items()}
    return {**state_dict, "state": state}


@dataclass(frozen=True)
class MoveResult:
    """What :func:`move_checkpoint` did."""

    out: Path
    device: str | None  # None: every tensor stayed where it was (a --dtype-only move)
    dtype: str | None
    optimizers: list[str]
    all_tensors: bool
    kept_on: list[str] = field(default_factory=list)  # devices of tensors left where they were
    notes: list[str] = field(default_factory=list)  # which checkpoint-N of a folder was read


def move_checkpoint(
    path: str | Path,
    out: str | Path,
    *,
    device: str | None = None,
    dtype: str | None = None,
    key: str | None = None,
    all_tensors: bool = False,
    fmt: str | None = None,
    force: bool = False,
    link: bool = False,
    allow_globals: Iterable[str] = (),
    progress: ProgressStart | None = None,
) -> MoveResult:
    """Write ``path`` to ``out`` with its optimizer state moved to ``device`` / ``dtype``.

    At least one of the two is given. Without ``device`` every tensor stays on the device it
    was saved from (a CUDA checkpoint stays tagged ``cuda:0``) and only ``dtype`` changes.
    Everything else in the file is kept as it was, unless ``all_tensors``: then every tensor
    outside the optimizer state dicts moves too (model weights take ``dtype`` as well, when
    floating). ``progress`` is told the bytes to write when writing starts; the callback it
    returns is told each write.

    A DCP folder is read too, and written when ``fmt`` is ``"dcp"`` or ``out`` ends in ``/``
    or is a folder (as ``convert`` decides), from a DCP folder only and with device ``cpu``:
    DCP records no device. The optimizer state keeps its keying (a DCP folder's names). A
    training folder is written as a folder whose other files are copies, or with ``link``
    hard links (:mod:`optckpt.io.folder_writer`).

    Raises:
        UsageError: neither ``device`` nor ``dtype``; a bad device, dtype or output path; a
            DCP output from a file, or to a device other than ``cpu``.
        UnreadableCheckpointError: the input cannot be read, holds no valid optimizer state,
            or holds tensors that cannot be moved (see :func:`move_state`).
    """
    if device is None and dtype is None:
        raise UsageError("move needs --device, --dtype or both")
    torch_device = parse_device(device) if device is not None else None
    torch_dtype = parse_dtype(dtype) if dtype is not None else None
    job = plan_rewrite(
        path,
        out,
        command="move",
        force=force,
        kind=fmt,
        key=key,
        allow_globals=allow_globals,
        link=link,
    )
    job.refuse_file_to_dcp("move")
    assert job.output is not None  # not a dry run
    if all_tensors and job.output.kind == "folder":
        raise UsageError(
            "--all-tensors moves every tensor of one file; a folder's model weights are files "
            f"of their own (move {path}/model.safetensors -o ... on its own)"
        )
    if job.output.kind == "dcp" and torch_device is not None and torch_device.type != "cpu":
        raise UsageError(
            f"--device {torch_device}: a DCP folder records no device (dcp.load puts tensors "
            "where the model's are); give --device cpu, with --dtype to cast"
        )
    # A DCP folder's tensors are read when written, cast then (one at a time), unless they
    # go to another device than the CPU: then they are read now and moved.
    on_cpu = torch_device is None or torch_device.type == "cpu"
    checkpoint = job.load(read=not on_cpu)
    found = job.select(checkpoint)
    releaser = Releaser(checkpoint.sources)
    moved = [
        move_state(
            f.state_dict,
            torch_device,
            torch_dtype,
            on_read=releaser.read,
            lazy=True,
            later=checkpoint.later,
        )
        for f in found
    ]
    # The loaded tree is ours (the file is mapped copy-on-write): swap the moved state in.
    # What moved records where it went; what stays, the device it was saved from (a CUDA
    # checkpoint's model weights stay tagged cuda:0), as does all of it without a device.
    for located, state_dict in zip(found, moved, strict=True):
        located.state_dict["state"] = state_dict["state"]
        if torch_device is not None:
            forget_placement(checkpoint, (*located.path, "state"))
    if all_tensors:
        checkpoint.root = _move_outside(
            checkpoint.root, [f.path for f in found], torch_device, torch_dtype, checkpoint.later
        )
        if torch_device is not None:
            forget_placement(checkpoint)
    job.save(checkpoint, progress)
    saved_on = {checkpoint.placement.get(p, "cpu") for p, _ in tensor_paths(checkpoint.root)}
    return MoveResult(
        out=Path(out),
        device=None if torch_device is None else str(torch_device),
        dtype=None if torch_dtype is None else str(torch_dtype).removeprefix("torch."),
        optimizers=[f.key for f in found],
        all_tensors=all_tensors,
        # without a device nothing moved: nothing was left behind either
        kept_on=[] if torch_device is None else sorted(saved_on - {"cpu", str(torch_device)}),
        notes=checkpoint.notes(),
    )


def _move_outside(
    root: Any,
    done: list[KeyPath],
    device: torch.device | None,
    dtype: torch.dtype | None,
    later: Later | None = None,
) -> Any:
    """Every tensor of the tree moved, but those of the optimizer state dicts at ``done``
    (their state moved already, their hyperparameters kept). Outside optimizer state no key
    is a ``step``: every tensor there moves, and floating ones take ``dtype``."""

    def outside(path: KeyPath) -> bool:
        return not any(path[: len(d)] == d for d in done)

    for path, tensor in tensor_paths(root):
        if outside(path) and not _stays_placeholder(tensor, device, later):
            _check_movable(tensor, device, _where("", path))
    return cast_tree(
        root,
        lambda tensor, path: (
            _moved(tensor, None, device, dtype, False, lazy=True, later=later)
            if outside(path)
            else tensor
        ),
        keep_types=True,  # a model state dict stays an OrderedDict with its _metadata
    )
