"""LR scheduler state that follows ``remap``'s group mapping.

A scheduler keeps one entry per param group (``base_lrs``, ``_last_lr``, ReduceLROnPlateau's
``min_lrs``, CyclicLR's ``max_lrs`` and momenta, LambdaLR's ``lr_lambdas``, and the same in
the children of a SequentialLR / ChainedScheduler). When ``remap`` changes the groups, a torch
scheduler built for the new optimizer can only continue the schedule if those lists change
with them (DESIGN.md, "Training state"):

* a target group that carries parameters keeps the entry of the source group they came from
  (its majority, as its hyperparameters do);
* a group of new parameters takes the values its hyperparameters give: ``base_lrs`` its
  ``initial_lr`` (else its ``lr``), ``_last_lr`` its ``lr``, CyclicLR's momenta its
  ``base_momentum`` / ``max_momentum``; ``min_lrs`` ReduceLROnPlateau's ``default_min_lr``
  where torch keeps one; otherwise the entry of the first group that carries parameters
  (the rule for the group keys a scheduler owns);
* ``last_epoch`` and the step counts stay: the schedule goes on where it was.

Where a scheduler cannot follow, the remap is refused unless the scheduler is dropped
(``--drop-scheduler``): a target group that merges source groups whose entries differ (they
were on different schedules), a LambdaLR / MultiplicativeLR that would need an entry for a new
group (its lambdas are code, not in the checkpoint: nothing says what the new group's
function is), a per-group list that does not fit the optimizer's group count in the first place.

Plain Python: the new state dicts are shallow copies with new lists; the input is not changed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optckpt.changes import Change, majority
from optckpt.companions.checks import pair, suffix
from optckpt.companions.find import Companion, find_in_folder
from optckpt.companions.kinds import PER_GROUP_KEYS, guess_scheduler
from optckpt.companions.summary import number, plain
from optckpt.errors import IncompatibleStateError


@dataclass(frozen=True)
class SchedulerChange(Change):
    """One per-group scheduler entry that differs from the one at its index before (the
    form of ``remap --json``'s ``hyperparam_changes``; ``key`` is the entry's key path).
    A scheduler dropped whole (``--drop-scheduler``) is one change of group ``-1`` (``null``
    in JSON), ``key`` its key path, ``old`` its class, ``new`` ``None``."""

    def json_value(self, value: Any) -> Any:
        """A scheduler's value in JSON (a one-element tensor as its number)."""
        return plain(value)


@dataclass
class SchedulerRemap:
    """What becomes of one scheduler: its new state (``None``: dropped) and the changes."""

    companion: Companion
    state: dict[str, Any] | None
    changes: list[SchedulerChange] = field(default_factory=list)


@dataclass(frozen=True)
class GroupMapping:
    """The groups before and after a remap.

    Attributes:
        sources: per target group, the source group of each parameter it carries (empty for a
            group of new parameters).
        groups: the target groups as written (their hyperparameters decided).
        old_count: the number of source groups.
    """

    sources: Sequence[Sequence[int]]
    groups: Sequence[Mapping[str, Any]]
    old_count: int

    def major(self, index: int) -> int | None:
        """The source group most of target group ``index``'s parameters came from (see
        :func:`optckpt.changes.majority`, which the hyperparameters follow too)."""
        if not self.sources[index]:
            return None
        return majority(self.sources[index])[0]

    @property
    def first_carried(self) -> int | None:
        """The source group of the first target group that carries parameters."""
        return next((m for m in map(self.major, range(len(self.groups))) if m is not None), None)


def _same(a: Any, b: Any) -> bool:
    x, y = number(a), number(b)
    if x is not None and y is not None:
        return x == y or (math.isnan(x) and math.isnan(y))
    return bool(a == b) if type(a) is type(b) else False


def _new_entry(
    key: str, index: int, old: Sequence[Any], state: Mapping[str, Any], mapping: GroupMapping
) -> tuple[Any, str] | str:
    """The entry of a new group for per-group ``key``: ``(value, why)``, or why none can be
    made."""
    group = mapping.groups[index]
    first = mapping.first_carried
    if key == "base_lrs":
        source = "initial_lr" if "initial_lr" in group else "lr"
        return group[source], f"new group: its {source}"
    if key == "_last_lr":
        return group["lr"], "new group: its lr"
    if key == "lr_lambdas":
        return "its lr_lambdas are code, not in the checkpoint: nothing says what a new group's is"
    if key == "min_lrs" and state.get("default_min_lr") is not None:
        return state["default_min_lr"], "new group: the scheduler's default_min_lr"
    own = {"base_momentums": "base_momentum", "max_momentums": "max_momentum"}.get(key)
    if own is not None and own in group:
        return group[own], f"new group: its {own}"
    if first is None:
        return "no group carries parameters to take it from"
    return old[first], f"new group: as source group {first} (the first carried)"


def _follow(
    state: Mapping[str, Any], where: str, mapping: GroupMapping, problems: list[str]
) -> tuple[dict[str, Any], list[SchedulerChange]]:
    """The state with its per-group entries following ``mapping``; problems appended."""
    new, changes = dict(state), []
    name = guess_scheduler(state).name or "the scheduler"
    for key in PER_GROUP_KEYS:
        old = state.get(key)
        if not isinstance(old, (list, tuple)):
            continue
        if len(old) != mapping.old_count:
            problems.append(
                f"{where}.{key} has {len(old)} entries for the optimizer's {mapping.old_count} "
                "groups: it did not fit the optimizer before the remap"
            )
            continue
        entries = []
        for index in range(len(mapping.groups)):
            major = mapping.major(index)
            if major is None:
                made = _new_entry(key, index, old, state, mapping)
                if isinstance(made, str):
                    problems.append(
                        f"{where} ({name}) cannot give new group {index} a {key}: {made}"
                    )
                    continue
                value, why = made
            else:
                merged = sorted(set(mapping.sources[index]))
                if any(not _same(old[s], old[major]) for s in merged):
                    listed = ", ".join(f"{s}: {plain(old[s])!r}" for s in merged)
                    problems.append(
                        f"{where} ({name}): group {index} merges source groups on different "
                        f"schedules ({key} {listed})"
                    )
                value, why = old[major], f"carried from source group {major}"
            entries.append(value)
            if index >= len(old) or not _same(old[index], value):
                changes.append(
                    SchedulerChange(
                        index,
                        f"{where}.{key}",
                        old[index] if index < len(old) else None,
                        value,
                        why,
                    )
                )
        for index in range(len(mapping.groups), len(old)):
            changes.append(
                SchedulerChange(index, f"{where}.{key}", old[index], None, f"group {index} is gone")
            )
        new[key] = type(old)(entries) if isinstance(old, tuple) else entries
    children = state.get("_schedulers")
    if isinstance(children, (list, tuple)):
        rebuilt = []
        for i, child in enumerate(children):
            if isinstance(child, Mapping):
                child_state, child_changes = _follow(
                    child, f"{where}._schedulers.{i}", mapping, problems
                )
                rebuilt.append(child_state)
                changes += child_changes
            else:
                rebuilt.append(child)
        new["_schedulers"] = rebuilt
    return new, changes


def follow_groups(
    schedulers: Sequence[Companion], mapping: GroupMapping, *, drop: bool = False
) -> list[SchedulerRemap]:
    """Each scheduler's state after the remap that ``mapping`` describes.

    Args:
        schedulers: the schedulers that drive the remapped optimizer.
        mapping: its groups before and after.
        drop: drop a scheduler that cannot follow instead of refusing (``--drop-scheduler``).

    Returns:
        One :class:`SchedulerRemap` per scheduler, its ``state`` ``None`` where dropped (its
        one change says why).

    Raises:
        IncompatibleStateError: a scheduler cannot follow and ``drop`` is off; every reason is
            named.
    """
    found, refused = [], []
    for companion in schedulers:
        problems: list[str] = []
        where = companion.key or "the scheduler"
        state, changes = _follow(companion.state, where, mapping, problems)
        if not problems:
            found.append(SchedulerRemap(companion, state, changes))
        elif drop:
            why = "dropped (--drop-scheduler): " + "; ".join(problems)
            found.append(
                SchedulerRemap(
                    companion, None, [SchedulerChange(-1, where, companion.guess.name, None, why)]
                )
            )
        else:
            refused += problems
    if refused:
        raise IncompatibleStateError(
            "the LR scheduler cannot follow the new groups: "
            + "; ".join(refused)
            + "; pass --drop-scheduler to write the checkpoint without it"
        )
    return found


def sibling_warnings(
    path: Path, mapping: GroupMapping, allow_globals: Iterable[str] = ()
) -> list[str]:
    """Warnings for the scheduler files beside an optimizer file remapped on its own (a
    Trainer folder's ``scheduler.pt`` beside ``optimizer.pt``): they drive it, and a file
    remap does not rewrite them.

    Raises:
        UnreadableCheckpointError, UnsafeCheckpointError: such a file cannot be read.
    """
    folder = path.parent
    if not path.name.startswith("optimizer") or not folder.is_dir():
        return []
    members = [p.name for p in folder.iterdir() if p.is_file()]
    schedulers = [
        c
        for c in find_in_folder(folder, members, allow_globals)
        if c.kind == "lr_scheduler"
        and pair(c, [(path.name, {})]) == path.name
        and suffix(str(c.path[0])) == suffix(path.name)
    ]
    found = []
    for remap in follow_groups(schedulers, mapping, drop=True):
        if remap.changes:
            found.append(
                f"{folder / str(remap.companion.path[0])} drives this optimizer and is not "
                f"rewritten ({len(remap.changes)} per-group entries would change): a scheduler "
                "loading it with the new optimizer does not continue the schedule"
            )
    return found


def _parent(root: Any, path: Sequence[Any]) -> Any:
    node = root
    for key in path[:-1]:
        node = node[key]
    return node


def _order(path: Sequence[Any]) -> list[tuple[int, int, str]]:
    return [(0, k, "") if isinstance(k, int) else (1, 0, str(k)) for k in path]


def driving(
    companions: Sequence[Companion], optimizers: Sequence[tuple[str, Mapping[str, Any]]], key: str
) -> list[Companion]:
    """The schedulers among ``companions`` that drive the optimizer at ``key`` (see
    :func:`optckpt.companions.checks.pair`); ``optimizers``: every one of the checkpoint."""
    return [c for c in companions if c.kind == "lr_scheduler" and pair(c, optimizers) == key]


def apply_remaps(root: Any, remaps: Sequence[SchedulerRemap], omit: object = None) -> None:
    """Put each scheduler's new state into the checkpoint tree ``root`` (which the caller
    owns: a freshly loaded tree), and take out the dropped ones (a list entry, such as
    Lightning's ``lr_schedulers.0``, is removed from its list).

    A training folder's ``root`` holds its optimizer files by name: a scheduler read from a
    file of its own (a Trainer's ``scheduler.pt``) is added to it under that name, so a
    folder writer writes the file anew; a dropped one is set to ``omit``, which the writer
    leaves out (:data:`optckpt.io.folder_writer.OMIT`).
    """
    dropped = []
    for remap in remaps:
        companion, path = remap.companion, remap.companion.path
        if companion.in_folder and not remap.changes:
            continue  # the file is carried over as it is
        if companion.in_folder:
            if len(path) == 1:
                root[path[0]] = omit if remap.state is None else remap.state
                continue
            root.setdefault(path[0], companion.file_tree)
        if remap.state is None:
            dropped.append(path)
        else:
            _parent(root, path)[path[-1]] = remap.state
    # Later list entries first, so earlier indices stay right.
    for path in sorted(dropped, key=_order, reverse=True):
        parent = _parent(root, path)
        if isinstance(parent, list):
            parent.pop(path[-1])
        else:
            del parent[path[-1]]
