"""Writing the checkpoint after a resume step (``-o``), through the rewrite pipeline
(:mod:`optckpt.io.rewrite`): the output checked before anything is read, then the stepped
state and weights swapped into the loaded tree, everything else kept, saved devices carried."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from optckpt.devices import replace_placement
from optckpt.io.rewrite import Output, prepare_output, save
from optckpt.io.write import ProgressStart
from optckpt.layout import model_state_path, tied
from optckpt.locate import tensors_in
from optckpt.names import is_name_keyed, to_name_keyed
from optckpt.resume.source import Source


def check_out(
    out: str | Path,
    path: Path,
    model: str | Path | None,
    from_layout: Any,
    *,
    force: bool,
    link: bool = False,
) -> Output:
    """The output, once :func:`~optckpt.io.rewrite.prepare_output` accepts it with every
    input named: the checkpoint (a file, a DCP folder, or a training folder, written as a
    folder of the same files, hard-linked with ``link``), ``model``, a ``from_layout`` file.

    Raises:
        UsageError: ``out`` is refused (see :func:`~optckpt.io.write.check_output`).
        UnwritableOutputError: the folder of ``out`` cannot be written.
    """
    return prepare_output(
        out,
        force=force,
        inputs=[model, from_layout],
        rewrites=path,
        command="resume-step",
        dcp=True,
        link=link,
    )


def check_storable_as(checkpoint: Any, output: Output) -> None:
    """Refuse now, not after the steps, tensors ``output`` cannot hold (safetensors lacks
    some dtypes).

    Raises:
        UsageError: names the first such tensor and its dtype.
    """
    output.refuse_unstorable((str(key), t.dtype) for key, t in tensors_in(checkpoint.root))


def write_checkpoint(
    source: Source,
    checkpoint: Any,
    stepped: Sequence[Any],
    output: Output,
    progress: ProgressStart | None = None,
) -> None:
    """Write ``checkpoint`` with the state of each stepped optimizer
    (:class:`~optckpt.resume.step.Stepped`: the optimizer, its parameters by ID, the state
    dict it came from and each ID's key in the model weights) and, when they came from it,
    weights. Each state keeps its keying."""
    loaded = source.weights(checkpoint)[0] if source.model is None else None
    weights = loaded if isinstance(loaded, dict) else {}  # this file's weights, stepped below
    at = model_state_path(checkpoint.root) or ()
    aliases = tied(weights)
    for one in stepped:
        _swap_in(checkpoint, one.found, one.optimizer, one.live, one.names, weights, at)
    for one in stepped:
        from_file = {pid: one.names[pid] for pid in one.live if one.names.get(pid) in weights}
        for pid, name in from_file.items():
            moved = one.live[pid].detach()
            for alias in (name, *aliases[name]):
                weights[alias] = moved  # tied weights stay tied (and keep their saved devices)
    save(
        output,
        checkpoint.root,
        placement=checkpoint.placement,
        sources=source.mapped,
        progress=progress,
    )


def _swap_in(
    checkpoint: Any,
    found: Any,
    ours: Any,
    live: Mapping[Any, torch.Tensor],
    names: Mapping[Any, str],
    weights: Mapping[str, torch.Tensor],
    at: tuple[Any, ...],
) -> None:
    """Put the stepped state of ``ours`` where ``found`` was read, saved devices carried."""
    new_state = ours.state_dict()
    if is_name_keyed(found.state_dict):  # name-keyed in, name-keyed out, under the same keys
        saved_ids = [pid for g in found.state_dict["param_groups"] for pid in g["params"]]
        new_ids = [pid for g in new_state["param_groups"] for pid in g["params"]]
        new_state = to_name_keyed(new_state, dict(zip(new_ids, saved_ids)), strip=False)
    # Groups stepped with capturable off on the CPU (uncapture) are saved as they came.
    for group, saved in zip(new_state["param_groups"], found.state_dict["param_groups"]):
        if "capturable" in saved:
            group["capturable"] = saved["capturable"]
    # Each stepped tensor records the device its input tensor was saved from (a CUDA
    # checkpoint comes out tagged cuda:0 as it went in); the rest of the file keeps its own.
    from_file = {pid: names[pid] for pid in live if names.get(pid) in weights}
    param_devices = {
        pid: device
        for pid, name in from_file.items()
        if (device := checkpoint.saved_device((*at, name), weights[name])) is not None
    }
    replace_placement(
        checkpoint, found.path, found.state_dict, new_state, param_devices=param_devices
    )
    # The loaded tree is ours to change (never written back): swap the stepped state in.
    found.state_dict.clear()
    found.state_dict.update(new_state)
