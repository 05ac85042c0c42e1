"""The devices a rewritten optimizer state dict records when it is written.

A checkpoint saved from CUDA and read to the CPU remembers where each storage was saved
(:attr:`optckpt.io.Checkpoint.saved_devices`, by storage address); the writers tag each
storage with that device again. Commands that make new tensors (``resume-step -o`` steps
the state, ``remap`` casts it) use :func:`carry_devices` so that the new tensors record the
device of the ones they replace, and a CUDA checkpoint comes out as it went in.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch

from optckpt.io import Checkpoint
from optckpt.locate import tensors_in


def current_devices(checkpoint: Checkpoint) -> dict[int, str]:
    """The saved device of every tensor the checkpoint's tree holds now, by storage address.

    Taken before the tree is changed, so that no address belongs to a storage already freed
    (whose memory a new tensor may have taken). Empty storages (address 0) are left out.
    """
    devices = {}
    for _, tensor in tensors_in(checkpoint.root):
        address = tensor.untyped_storage().data_ptr()
        if address:
            devices[address] = checkpoint.saved_device(tensor)
    return devices


def carry_devices(
    checkpoint: Checkpoint,
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    *,
    same_ids: bool,
    param_devices: Mapping[Any, str] | None = None,
) -> dict[int, str]:
    """The devices to write ``checkpoint`` with once ``new`` replaces ``old`` in it.

    Call it before the tree is changed: it starts from :func:`current_devices` and adds
    ``new``'s tensors.

    A tensor of ``new`` takes the saved device of its counterpart in ``old``: the tensor at
    the same key path of the same parameter ID (``same_ids``, when ``new`` keeps ``old``'s
    IDs) or of the same group index, for hyperparameters. A tensor without one keeps the
    device of its storage if ``old`` held it; else the saved device of its parameter (from
    ``param_devices``, by ID) or, without one, the device ``old``'s state was mostly saved
    from, except a ``step`` of a group neither fused nor capturable, which torch keeps on
    the CPU.

    Args:
        checkpoint: the checkpoint ``old`` was read from.
        old: the optimizer state dict as read.
        new: the state dict that replaces it.
        same_ids: whether a parameter ID means the same parameter in both.
        param_devices: the saved device of each parameter, by ID in ``new``, where known.

    Returns:
        Storage address -> device, for :func:`optckpt.io.write.save_checkpoint`.
    """
    devices = current_devices(checkpoint)
    counts = Counter(
        checkpoint.saved_device(t)
        for key, t in tensors_in(old.get("state", {}))
        if key != "step" and t.untyped_storage().data_ptr()
    )
    usual = counts.most_common(1)[0][0] if counts else "cpu"
    old_groups = list(old.get("param_groups", []))
    old_state = old.get("state", {}) if same_ids else {}
    placed: dict[Any, bool] = {}
    for index, group in enumerate(new.get("param_groups", [])):
        flag = bool(group.get("fused") or group.get("capturable"))
        for pid in group.get("params", []):
            placed.setdefault(pid, flag)
        saved = old_groups[index] if index < len(old_groups) else {}
        for key, value in group.items():
            if key != "params":
                _pair(checkpoint, devices, value, saved.get(key), usual, key)
    for pid, entry in new.get("state", {}).items():
        device = (param_devices or {}).get(pid, usual)
        step_default = device if placed.get(pid, False) else "cpu"
        _pair(checkpoint, devices, entry, old_state.get(pid), device, None, step_default)
    return devices


def _pair(
    checkpoint: Checkpoint,
    devices: dict[int, str],
    new: Any,
    old: Any,
    usual: str,
    key: Any,
    step_default: str | None = None,
) -> None:
    if isinstance(new, torch.Tensor):
        address = new.untyped_storage().data_ptr()
        if not address:
            return
        if isinstance(old, torch.Tensor):
            devices[address] = checkpoint.saved_device(old)
        elif address not in devices:
            devices[address] = step_default if key == "step" and step_default else usual
    elif isinstance(new, Mapping):
        for k, v in new.items():
            counterpart = old.get(k) if isinstance(old, Mapping) else None
            _pair(checkpoint, devices, v, counterpart, usual, k, step_default)
    elif isinstance(new, (list, tuple)):
        olds = old if isinstance(old, (list, tuple)) else ()
        for i, v in enumerate(new):
            _pair(
                checkpoint, devices, v, olds[i] if i < len(olds) else None, usual, key, step_default
            )
