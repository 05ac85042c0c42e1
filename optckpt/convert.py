"""Convert a checkpoint between torch and safetensors files, between Adam and AdamW, and
between ID-keyed and name-keyed optimizer state dicts (``--keying``).

The whole checkpoint is kept: model weights, epoch, scheduler state, every optimizer
hyperparameter, ``param_names``, Python-number ``step``s. The round trip
``.pt -> .safetensors -> .pt`` gives back equal objects, tensors bitwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optckpt.errors import IncompatibleStateError, UsageError
from optckpt.io import Checkpoint, load_checkpoint
from optckpt.io.dcp import DcpCheckpoint, is_dcp, read_dcp
from optckpt.io.dcp.writer import check_output_folder, name_keyed_tree, wants_dcp, write_dcp
from optckpt.io.write import check_output, format_for, save_checkpoint
from optckpt.layout import model_state_of
from optckpt.locate import check_optimizers, select_optimizers
from optckpt.names import KEYINGS, rekey
from optckpt.optim.guess import guess_optimizer

# Optimizers whose state dicts differ only in group flags, and the flags that make one the
# other. In torch >= 2.6 AdamW is Adam with decoupled_weight_decay=True: same state keys,
# same update, so flipping the flag is the whole conversion. The weight_decay value is kept;
# note that it means L2 regularisation for Adam and decoupled decay for AdamW.
COMPATIBLE: dict[str, dict[str, dict[str, Any]]] = {
    "Adam": {"AdamW": {"decoupled_weight_decay": True}},
    "AdamW": {"Adam": {"decoupled_weight_decay": False}},
}


@dataclass(frozen=True)
class ConvertResult:
    """What :func:`convert_checkpoint` did."""

    source: Path
    out: Path
    source_format: str
    target_format: str
    rewritten: list[str]  # key paths of optimizer state dicts given a new optimizer class
    rekeyed: list[str] = field(default_factory=list)  # key paths given the --keying asked for
    keying: str | None = None  # the keying they were given (DCP: ids in, names out)


def _canonical(name: str) -> str:
    for known in COMPATIBLE:
        if known.lower() == name.lower():
            return known
    return name


def retarget(state_dict: dict[str, Any], target: str) -> dict[str, Any]:
    """A copy of ``state_dict`` whose groups make ``torch.optim.<target>`` load it unchanged.

    Raises:
        IncompatibleStateError: the state dict's optimizer cannot become ``target``; the
            message lists the targets it can become.
    """
    target = _canonical(target)
    guess = guess_optimizer(state_dict)
    source = guess.name
    if source == target:
        return state_dict
    flags = COMPATIBLE.get(source or "", {}).get(target)
    if flags is None:
        targets = ", ".join(COMPATIBLE.get(source or "", {})) or "none"
        raise IncompatibleStateError(
            f"cannot convert {source or 'unrecognised optimizer'} state to {target}; "
            f"compatible targets: {targets}"
        )
    groups = [{**g, **flags} for g in state_dict["param_groups"]]
    return {**state_dict, "param_groups": groups}


def convert_checkpoint(
    path: str | Path,
    out: str | Path,
    *,
    to: str | None = None,
    optimizer: str | None = None,
    key: str | None = None,
    force: bool = False,
    allow_globals: Iterable[str] = (),
    progress: Callable[[int], None] | None = None,
    keying: str | None = None,
) -> ConvertResult:
    """Write ``path`` to ``out`` in another format (and, optionally, for another optimizer).

    Args:
        path: the checkpoint file, or a DCP folder.
        out: the output file; its extension picks the format unless ``to`` is given. A
            DCP folder when ``to`` is ``"dcp"``, or ``out`` ends in ``/`` or is a folder.
        to: ``"pt"``, ``"safetensors"`` or ``"dcp"``.
        optimizer: rewrite the optimizer state dicts (all, or the one at ``key``) for this
            torch optimizer class (Adam <-> AdamW).
        key: key path of the optimizer state dict ``optimizer`` and ``keying`` apply to.
        force: replace ``out`` if it exists.
        allow_globals: globals to allow while unpickling.
        progress: byte-count callback while writing.
        keying: ``"ids"`` or ``"names"``: rewrite the optimizer state dicts (all, or the one at
            ``key``) in that keying (:func:`optckpt.names.rekey`): ``ids`` for
            ``Optimizer.load_state_dict``, ``names`` (FQN-keyed) for
            ``set_optimizer_state_dict``. A DCP folder is read as ``ids`` unless asked
            otherwise, and written as ``names`` (as DCP keeps optimizer state).

    Raises:
        UsageError: bad output path or format, a folder input, ``key`` without ``optimizer``
            or ``keying``, parameters that cannot be named for ``keying="names"``.
        IncompatibleStateError: an optimizer that cannot become ``optimizer``.
        UnreadableCheckpointError: the input cannot be read, or holds an optimizer state dict
            that is not a valid one (:func:`~optckpt.locate.check_optimizers`).
    """
    to_dcp = wants_dcp(out, to)  # before Path() drops a trailing "/"
    path, out = Path(path), Path(out)
    if to_dcp:
        target = "dcp"
        check_output_folder(out, [path], force=force)
    else:
        target = format_for(out, to)
        check_output(out, [path], force=force)
    from_dcp = is_dcp(path)
    if path.is_dir() and not from_dcp:
        raise UsageError(
            f"{path} is a folder; convert the optimizer file in it (e.g. {path}/optimizer.pt)"
        )
    if key is not None and optimizer is None and keying is None:
        raise UsageError(
            "--key only picks the state dict --optimizer or --keying rewrites; give one of them"
        )
    if keying is not None and keying not in KEYINGS:
        raise UsageError(f"--keying {keying!r}: expected ids or names")
    if to_dcp and keying == "ids":
        raise UsageError(
            "--keying ids: a DCP checkpoint keeps optimizer state keyed by parameter names "
            "(set_optimizer_state_dict loads it); write a .pt or .safetensors file for IDs"
        )
    if from_dcp and not to_dcp and keying is None:
        keying = "ids"  # what Optimizer.load_state_dict takes; --keying names keeps the FQNs
    checkpoint: Checkpoint
    if from_dcp:  # tensors are placeholders until written (below)
        checkpoint = read_dcp(path, allow_globals=allow_globals, tensors="meta")
    else:
        checkpoint = load_checkpoint(path, allow_globals=allow_globals)
    # Everything is carried over as it is, but an optimizer state dict that no optimizer
    # could load is refused here, as every other command refuses it, not written on.
    check_optimizers(checkpoint.root)
    rewritten = []
    if optimizer is not None:
        for located in select_optimizers(checkpoint.root, key):
            new = retarget(located.state_dict, optimizer)
            if new is not located.state_dict:
                # The loaded tree is ours (the file is mapped copy-on-write): edit it in place.
                located.state_dict["param_groups"] = new["param_groups"]
                rewritten.append(located.key)
    rekeyed = []
    if keying is not None:
        for located in select_optimizers(checkpoint.root, key):
            keyed = rekey(
                located.state_dict,
                keying,
                model_state=model_state_of(checkpoint),
                where=str(path),
            )
            if keyed is not located.state_dict:
                located.state_dict.clear()
                located.state_dict.update(keyed)
                rekeyed.append(located.key)
    if isinstance(checkpoint, DcpCheckpoint):
        # A file writer makes each tensor only when it writes it (a sharded one assembled
        # then), so memory stays at the largest tensor; torch's DCP writer takes tensors.
        checkpoint.root = checkpoint.resolved(checkpoint.root, lazy=not to_dcp)
    if to_dcp:
        model_state = model_state_of(checkpoint)
        named = name_keyed_tree(
            checkpoint.root,
            lambda sd: rekey(sd, "names", model_state=model_state, where=str(path)),
        )
        rekeyed += [k for k in named if k not in rekeyed]
        write_dcp(checkpoint.root, out)
    else:
        save_checkpoint(
            checkpoint.root,
            out,
            target,
            progress=progress,
            sources=checkpoint.sources,
            saved_devices=checkpoint.saved_devices,
        )
    return ConvertResult(
        source=path,
        out=out,
        source_format=checkpoint.format,
        target_format=target,
        rewritten=rewritten,
        rekeyed=rekeyed,
        keying="names" if to_dcp else keying,
    )
