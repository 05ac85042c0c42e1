"""Finding the training state around the optimizer: LR schedulers, GradScalers, counters.

By shape, as :mod:`optckpt.locate` finds optimizers: anywhere in the checkpoint's tree
(``scheduler``, ``lr_scheduler``, Lightning's ``lr_schedulers.0``, a precision plugin's
scaler), plus, in a training folder, the files beside the optimizer (a Trainer's
``scheduler.pt``, ``scaler.pt`` and ``trainer_state.json``; accelerate's ``scheduler.bin``).
Trainer counters are the root's ``global_step`` / ``epoch`` (Lightning, with its ``loops``;
a plain training dict's ``epoch``, ``step``, ``iteration``) and ``trainer_state.json``.

Plain Python: torch is imported only to read a folder's torch files.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from optckpt.companions.kinds import guess_scheduler, is_scaler_state, is_scheduler_state
from optckpt.errors import UnreadableCheckpointError
from optckpt.optim.guess import Guess

Kind = Literal["lr_scheduler", "grad_scaler", "trainer"]

# Files a training folder keeps companions in: transformers' Trainer writes scheduler.pt,
# scaler.pt and trainer_state.json; accelerate's save_state scheduler.bin (scheduler_1.bin,
# ... for more) and scaler.pt.
_SCHEDULER_FILE = re.compile(r"^(lr_)?scheduler(_\d+)?\.(pt|pth|bin)$")
_SCALER_FILE = re.compile(r"^scaler(_\d+)?\.(pt|pth|bin)$")
TRAINER_STATE_FILE = "trainer_state.json"

# Root keys of a training dict that count the run (Lightning: epoch and global_step).
COUNTER_KEYS = ("global_step", "epoch", "step", "iteration", "iter")


@dataclass(frozen=True)
class Companion:
    """One piece of training state found beside the optimizer.

    Attributes:
        key: where it is, as users write key paths (``scheduler``, ``lr_schedulers.0``, a
            folder's ``scheduler.pt``; ``""`` for counters at the root of a file).
        path: the key path (tuple of keys) in the checkpoint's tree; for a folder's own
            companion files, ``(file name,)``.
        kind: ``"lr_scheduler"``, ``"grad_scaler"`` or ``"trainer"``.
        state: the state dict (for ``"trainer"``: the counters' mapping).
        guess: the guessed class (schedulers); fixed for the other kinds.
        in_folder: read from its own file in a training folder (not part of ``root``).
        file_tree: for ``in_folder``, the whole tree of that file (what a rewrite of the
            folder writes back).
    """

    key: str
    path: tuple[Any, ...]
    kind: Kind
    state: Mapping[str, Any]
    guess: Guess
    in_folder: bool = False
    file_tree: Any = None


def _sure(name: str | None, reason: str) -> Guess:
    return Guess(name, 1.0 if name else 0.0, (name,) if name else (), reason)


def _join(prefix: str, key: object) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _is_optimizer(node: Mapping[Any, Any]) -> bool:
    return "state" in node and "param_groups" in node


def _walk(node: Any, prefix: str, path: tuple[Any, ...]) -> Iterator[Companion]:
    if isinstance(node, Mapping):
        if is_scheduler_state(node):
            yield Companion(prefix, path, "lr_scheduler", node, guess_scheduler(node))
            return
        if is_scaler_state(node):
            yield Companion(prefix, path, "grad_scaler", node, _sure("GradScaler", "state keys"))
            return
        if _is_optimizer(node):
            return
        for key, value in node.items():
            if isinstance(value, (Mapping, list, tuple)):
                yield from _walk(value, _join(prefix, key), (*path, key))
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            if isinstance(value, (Mapping, list, tuple)):
                yield from _walk(value, _join(prefix, index), (*path, index))


def _is_count(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def trainer_counters(root: Any) -> Companion | None:
    """The run's counters at the root of a training checkpoint, or ``None``.

    Lightning's ``.ckpt`` (``pytorch-lightning_version``, ``epoch``, ``global_step`` and
    ``loops``) is class ``"Lightning"``; a plain training dict with an optimizer state dict
    (or a list of them) beside ``epoch`` / ``step`` / ``global_step`` / ``iteration``
    numbers, class ``None``.
    """
    if not isinstance(root, Mapping):
        return None
    counters = {k: root[k] for k in COUNTER_KEYS if k in root and _is_count(root[k])}
    lightning = "pytorch-lightning_version" in root or ("loops" in root and "global_step" in root)
    if lightning:
        state = {**counters, **({"loops": root["loops"]} if "loops" in root else {})}
        if isinstance(root.get("hyper_parameters"), Mapping):  # save_hyperparameters(): data
            state["hyper_parameters"] = root["hyper_parameters"]
        return Companion("", (), "trainer", state, _sure("Lightning", "pytorch-lightning keys"))
    beside = [v for value in root.values() for v in (value if isinstance(value, list) else [value])]
    if counters and any(isinstance(v, Mapping) and _is_optimizer(v) for v in beside):
        return Companion("", (), "trainer", counters, _sure(None, "counters beside an optimizer"))
    return None


def find_in_tree(root: Any) -> list[Companion]:
    """Every scheduler and scaler state dict in ``root`` (in the tree's order), then the
    root's trainer counters."""
    found = list(_walk(root, "", ()))
    counters = trainer_counters(root)
    return found + ([counters] if counters is not None else [])


def companion_files(members: Iterable[str]) -> list[str]:
    """The members of a training folder (names relative to it) that hold companions."""
    return sorted(
        m
        for m in members
        if "/" not in m
        and (_SCHEDULER_FILE.match(m) or _SCALER_FILE.match(m) or m == TRAINER_STATE_FILE)
    )


def _read_torch_file(path: Path, allow_globals: Iterable[str], describe: bool = False) -> Any:
    """The tree of a companion file; ``None`` for a file that is no checkpoint at all (of
    no format optckpt reads: it holds no scheduler or scaler state to find). ``describe``:
    read without torch where :mod:`optckpt.io.structure` can (its tensors described)."""
    # torch, only for a folder's own torch files
    from optckpt.io import load_checkpoint
    from optckpt.io.read import sniff

    try:
        sniff(path)
    except UnreadableCheckpointError:
        return None
    return load_checkpoint(path, allow_globals=allow_globals, describe=describe).root


def find_in_folder(
    folder: Path, members: Iterable[str], allow_globals: Iterable[str] = (), describe: bool = False
) -> list[Companion]:
    """The companions in a training folder's own files (``scheduler.pt``, ``scaler.pt``,
    ``trainer_state.json``), each read safely; a file of no checkpoint format is passed over.
    ``describe``: torch files are read without torch where they can be (``inspect``; their
    tensors described, see :mod:`optckpt.described`).

    Raises:
        UnreadableCheckpointError: a companion file that cannot be read (truncated, corrupt).
    """
    found: list[Companion] = []
    for name in companion_files(members):
        path = folder / name
        if name == TRAINER_STATE_FILE:
            try:
                state = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as e:
                raise UnreadableCheckpointError(f"{path}: not readable as JSON ({e})") from e
            if isinstance(state, Mapping):
                found.append(
                    Companion(
                        name,
                        (name,),
                        "trainer",
                        state,
                        _sure("TrainerState", "trainer_state.json"),
                        True,
                    )
                )
            continue
        content = _read_torch_file(path, allow_globals, describe)
        if content is None:
            continue
        for c in _walk(content, "", ()):
            found.append(
                Companion(
                    _join(name, c.key) if c.key else name,
                    (name, *c.path),
                    c.kind,
                    c.state,
                    c.guess,
                    True,
                    content,
                )
            )
    return found
