"""Keeping a checkpoint's saved placement in step when a command replaces part of its tree.

A checkpoint saved from CUDA and read to the CPU remembers where each tensor was saved from,
by key path (:attr:`optckpt.io.Checkpoint.placement`); the writers record those devices
again. A command that swaps new tensors into the tree changes the placement of the paths it
replaces, here, so that a CUDA checkpoint comes out as it went in:

* ``move`` drops the placement of what it moved (:func:`forget_placement`): moved tensors
  record where they went;
* ``resume-step -o`` (the state it stepped) and ``remap`` (the state it carried, perhaps
  cast) give the new state the devices of the tensors it replaces
  (:func:`replace_placement`).

Everything is matched by key path, never by memory address: an address is reused as soon as
a tensor is freed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from optckpt.io import Checkpoint
from optckpt.locate import KeyPath, tensor_paths, value_at

_ABSENT = object()  # no counterpart in the old state dict


def forget_placement(checkpoint: Checkpoint, under: KeyPath = ()) -> None:
    """Drop the recorded devices of every tensor at or under ``under`` (``()``: all of them):
    those tensors are written as being where they are."""
    for key in [k for k in checkpoint.placement if k[: len(under)] == under]:
        del checkpoint.placement[key]


def replace_placement(
    checkpoint: Checkpoint,
    at: KeyPath,
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    *,
    ids: Mapping[Any, Any] | None = None,
    groups: Sequence[int | None] | None = None,
    param_devices: Mapping[Any, str] | None = None,
) -> None:
    """Record the devices ``new``'s tensors were saved from, once ``new`` replaces the
    optimizer state dict ``old`` at key path ``at`` of ``checkpoint``.

    Call it before the tree changes (``old`` is still where it was read). A tensor of
    ``new`` takes the saved device of its counterpart in ``old``: the tensor at the same path
    in the state of the same parameter (``ids`` maps each new ID to its old one; without it
    IDs are kept), or in the group it came from, for hyperparameters (``groups`` maps each new
    group index to an old one; without it indices are kept). A tensor without one takes the
    saved device of its parameter (``param_devices``, by new ID) or, without one, the device
    ``old``'s state was mostly saved from; except a ``step`` of a group neither fused nor
    capturable, which torch keeps on the CPU.

    Args:
        checkpoint: the checkpoint ``old`` was read from; its placement is updated.
        at: the key path of ``old`` in the checkpoint's tree.
        old: the optimizer state dict as read.
        new: the state dict that replaces it.
        ids: new parameter ID -> old parameter ID, where the IDs changed (``remap``).
        groups: new group index -> old group index (``None``: no old group), where the
            groups changed.
        param_devices: the saved device of each parameter, by ID in ``new``, where known.
    """
    placed = {}
    for rel, tensor in tensor_paths(old.get("state", {}), ("state",)):
        if rel[-1] != "step":
            placed[rel] = checkpoint.saved_device(at + rel, tensor)
    counts = Counter(d for d in placed.values() if d is not None)
    usual = counts.most_common(1)[0][0] if counts else "cpu"

    def saved(rel: KeyPath) -> str | None:
        """The saved device of ``old``'s tensor at ``rel``, if it has one there."""
        tensor = value_at(old, rel)
        if not isinstance(tensor, torch.Tensor):
            return None
        return checkpoint.saved_device(at + rel, tensor)

    devices: dict[KeyPath, tuple[str | None, Any]] = {}
    for index, group in enumerate(new.get("param_groups", [])):
        source = index if groups is None else groups[index]
        for key, value in group.items():
            if key == "params":
                continue
            for rel, tensor in tensor_paths(value, ("param_groups", index, key)):
                there = None if source is None else saved(("param_groups", source, *rel[2:]))
                devices[rel] = (there or usual, tensor)
    fused = fused_or_capturable(new)
    for pid, entry in new.get("state", {}).items():
        before = pid if ids is None else ids.get(pid, _ABSENT)
        device = (param_devices or {}).get(pid, usual)
        step = device if fused.get(pid, False) else "cpu"
        for rel, tensor in tensor_paths(entry, ("state", pid)):
            there = None if before is _ABSENT else saved(("state", before, *rel[2:]))
            devices[rel] = (there or (step if _is_step(rel[2:]) else device), tensor)

    forget_placement(checkpoint, at)
    for rel, (recorded, tensor) in devices.items():
        if recorded is not None and recorded != str(tensor.device):
            checkpoint.placement[at + rel] = recorded


def _is_step(inner: KeyPath) -> bool:
    """Whether a state tensor at ``inner`` (its path in a parameter's state) is a ``step``:
    the nearest key above it, as torch's casting policy reads keys, is ``step``."""
    return next((k for k in reversed(inner) if isinstance(k, str)), None) == "step"


def fused_or_capturable(state_dict: Mapping[str, Any]) -> dict[Any, bool]:
    """Each parameter ID's flag: its first group is ``fused`` or ``capturable``."""
    flags: dict[Any, bool] = {}
    for group in state_dict.get("param_groups", []):
        flag = bool(group.get("fused") or group.get("capturable"))
        for pid in group.get("params", []):
            flags.setdefault(pid, flag)
    return flags
