"""Convert a checkpoint between torch and safetensors files, between Adam and AdamW, and
between ID-keyed and name-keyed optimizer state dicts (``--keying``).

The whole checkpoint is kept: model weights, epoch, scheduler state, every optimizer
hyperparameter, ``param_names``, Python-number ``step``s. The round trip
``.pt -> .safetensors -> .pt`` gives back equal objects, tensors bitwise.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optckpt.errors import IncompatibleStateError, UsageError
from optckpt.io.dcp import is_dcp
from optckpt.io.dcp.writer import name_keyed_tree
from optckpt.io.rewrite import plan_rewrite
from optckpt.io.write import ProgressStart
from optckpt.locate import check_optimizers
from optckpt.names import KEYINGS, rekey, sources_of
from optckpt.optim.guess import guess_optimizer
from optckpt.sanitize import Sanitized, sanitize_tree

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
    notes: list[str] = field(default_factory=list)  # which checkpoint-N of a folder was read
    sanitized: list[Sanitized] | None = None  # --sanitize: each value made plain


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
    fmt: str | None = None,
    optimizer: str | None = None,
    key: str | None = None,
    force: bool = False,
    link: bool = False,
    allow_globals: Iterable[str] = (),
    progress: ProgressStart | None = None,
    keying: str | None = None,
    to: str | None = None,
    sanitize: bool = False,
    describe: bool | None = None,
) -> ConvertResult:
    """Write ``path`` to ``out`` in another format (and, optionally, for another optimizer).

    Args:
        path: the checkpoint file, a DCP folder, or a training folder (written as a folder:
            see :mod:`optckpt.io.folder_writer`).
        out: the output file; its extension picks the format unless ``fmt`` is given. A
            DCP folder when ``fmt`` is ``"dcp"``, or ``out`` ends in ``/`` or is a folder.
        fmt: ``"pt"``, ``"safetensors"`` or ``"dcp"`` (``--format``).
        optimizer: rewrite the optimizer state dicts (all, or the one at ``key``) for this
            torch optimizer class (Adam <-> AdamW).
        key: key path of the optimizer state dict ``optimizer`` and ``keying`` apply to.
        force: replace ``out`` if it exists.
        link: hard-link the files a training folder carries over instead of copying them
            (see :mod:`optckpt.io.folder_writer`).
        allow_globals: globals to allow while unpickling.
        progress: told the bytes to write when writing starts; the callback it returns is
            told each write.
        keying: ``"ids"`` or ``"names"``: rewrite the optimizer state dicts (all, or the one at
            ``key``) in that keying (:func:`optckpt.names.rekey`): ``ids`` for
            ``Optimizer.load_state_dict``, ``names`` (FQN-keyed) for
            ``set_optimizer_state_dict``. A DCP folder is read as ``ids`` unless asked
            otherwise, and written as ``names`` (as DCP keeps optimizer state).
        to: deprecated name of ``fmt`` (``--to`` names a layout in every other command).
        sanitize: rewrite numpy values, ``argparse.Namespace`` and paths into plain types
            (:func:`optckpt.sanitize.sanitize_tree`), so that the output loads with
            ``torch.load(weights_only=True)`` and no allow-list.
        describe: read the input without torch and copy its tensors' bytes from file to file
            (:meth:`~optckpt.io.rewrite.Rewrite.load`); ``None``: whenever the output is a
            file (``.pt`` or safetensors). The output is the same either way
            (``tests/test_convert.py``; a ``.pt`` file's serialization id aside,
            :mod:`optckpt.io.zip_writer`).

    Raises:
        UsageError: bad output path or format (a training folder takes none), ``key`` without ``optimizer``
            or ``keying``, parameters that cannot be named for ``keying="names"``.
        IncompatibleStateError: an optimizer that cannot become ``optimizer``.
        UnreadableCheckpointError: the input cannot be read, or holds an optimizer state dict
            that is not a valid one (:func:`~optckpt.locate.check_optimizers`).
    """
    if to is not None:
        warnings.warn(
            "convert_checkpoint(to=...) is deprecated; use fmt=...", DeprecationWarning, 2
        )
        if fmt is not None and fmt != to:
            raise UsageError(f"--format {fmt} and --to {to} disagree; give --format only")
        fmt = to
    job = plan_rewrite(
        path,
        out,
        command="convert",
        force=force,
        kind=fmt,
        allow_globals=allow_globals,
        link=link,
    )
    assert job.output is not None  # not a dry run
    to_dcp = job.output.kind == "dcp"
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
    if is_dcp(job.source) and not to_dcp and keying is None:
        keying = "ids"  # what Optimizer.load_state_dict takes; --keying names keeps the FQNs
    by_bytes = job.output.kind in ("pt", "safetensors")
    checkpoint = job.load(describe=by_bytes if describe is None else describe and by_bytes)
    sanitized = None
    if sanitize:
        checkpoint.root, sanitized = sanitize_tree(checkpoint.root)
    # Everything is carried over as it is, but an optimizer state dict that no optimizer
    # could load is refused here, as every other command refuses it, not written on.
    check_optimizers(checkpoint.root)
    # The loaded tree is ours (the file is mapped copy-on-write): edit it in place.
    rewritten = []
    if optimizer is not None:
        for located in job.select(checkpoint):
            new = retarget(located.state_dict, optimizer)
            if new is not located.state_dict:
                located.state_dict["param_groups"] = new["param_groups"]
                rewritten.append(located.key)
    where = str(path)
    rekeyed = []
    if keying is not None:
        for located in job.select(checkpoint):
            sources = sources_of(checkpoint, located.state_dict)
            keyed = rekey(located.state_dict, keying, sources=sources, where=where)
            if keyed is not located.state_dict:
                located.state_dict.clear()
                located.state_dict.update(keyed)
                rekeyed.append(located.key)
    if to_dcp:  # DCP keeps optimizer state by parameter names
        named = name_keyed_tree(
            checkpoint.root,
            lambda sd: rekey(sd, "names", sources=sources_of(checkpoint, sd), where=where),
        )
        rekeyed += [k for k in named if k not in rekeyed]
    job.save(checkpoint, progress)
    return ConvertResult(
        source=job.source,
        out=job.output.path,
        source_format=checkpoint.format,
        target_format=job.output.kind,
        rewritten=rewritten,
        rekeyed=rekeyed,
        keying="names" if to_dcp else keying,
        notes=checkpoint.notes(),
        sanitized=sanitized,
    )
