"""The hyperparameters of ``remap``'s target groups: the checkpoint's trained values are kept.

A checkpoint's group hyperparameters are what training left there: an ``lr`` a scheduler
decayed, tuned ``betas``, the ``initial_lr`` a scheduler resumes from. A layout written by
``save_layout(new_model, fresh_optimizer)`` holds a *fresh* optimizer's values instead, so
:func:`plan_hyperparams` decides, per target group (DESIGN.md, "Hyperparameters under remap"):

* a group that carries parameters takes the values of the source group most of them came
  from (several source groups with different values are a merge: the majority's values win,
  and every value that changes for the others is listed);
* a group made only of new parameters takes the layout's values, else the checkpoint's first
  group's; keys an LR scheduler owns (:data:`~optckpt.optim.specs.SCHEDULER_GROUP_KEYS`)
  come from the first group that carries parameters unless the layout gives them;
* the layout's values win only where asked: ``prefer="layout"`` (``--hyperparams layout``)
  for every key the layout gives, ``--set [N.]KEY=VALUE`` for one key (in group N, or all);
* a key the source group lacks (a checkpoint from an older torch) comes from the layout.

Every value that differs from the one its parameters had in the checkpoint is a
:class:`HyperparamChange`; layout values that were not taken are listed too
(:class:`KeptValue`), so a plan shows both what changed and what the layout wanted.
"""

from __future__ import annotations

import inspect
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from optckpt.changes import Change, majority
from optckpt.errors import IncompatibleStateError, UsageError
from optckpt.optim import by_name
from optckpt.optim.specs import SCHEDULER_GROUP_KEYS, spec_of
from optckpt.regenerate import Setting, parse_setting

__all__ = [
    "PREFERENCES",
    "GroupHyperparams",
    "HyperparamChange",
    "HyperparamPlan",
    "KeptValue",
    "Setting",
    "parse_settings",
    "plan_hyperparams",
    "same",
]

PREFERENCES = ("checkpoint", "layout")
"""What ``--hyperparams`` takes: whose values win where the layout gives one."""

_NOT_HYPERPARAMETERS = frozenset({"params", "param_names"})


@dataclass(frozen=True)
class HyperparamChange(Change):
    """A hyperparameter of target group ``group`` that differs from its source's value."""


@dataclass(frozen=True)
class KeptValue:
    """A checkpoint value kept where the layout gives another (``--hyperparams checkpoint``)."""

    group: int
    key: str
    kept: Any
    layout: Any

    def to_json(self) -> dict[str, Any]:
        """``{"group", "key", "kept", "layout"}``."""
        from optckpt.inspect import jsonable

        return {
            "group": self.group,
            "key": self.key,
            "kept": jsonable(self.kept),
            "layout": jsonable(self.layout),
        }


@dataclass
class GroupHyperparams:
    """One target group's values and, in words, where they came from."""

    values: dict[str, Any]
    origin: str


@dataclass
class HyperparamPlan:
    """Every target group's hyperparameters, what changed, and the layout values not taken."""

    groups: list[GroupHyperparams]
    changes: list[HyperparamChange] = field(default_factory=list)
    kept: list[KeptValue] = field(default_factory=list)


def same(a: Any, b: Any) -> bool:
    """Whether two hyperparameter values are equal for torch: tuples equal lists (a layout's
    JSON has no tuples), NaN equals NaN, a tensor equals only a tensor of its dtype and values
    (a Tensor ``lr`` is not a float ``lr`` to fused and capturable steps)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and bool(torch.equal(a.cpu(), b.cpu()) or (a.isnan().all() and b.isnan().all()))
        )
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, (list, tuple)) != isinstance(b, (list, tuple)):
        return False
    if isinstance(a, bool) != isinstance(b, bool):  # True == 1.0 in Python, not here
        return False
    try:
        return bool(a == b)
    except Exception:  # an exotic value whose == gives no bool
        return a is b


def _hyper(group: Mapping[str, Any]) -> dict[str, Any]:
    return {str(k): v for k, v in group.items() if k not in _NOT_HYPERPARAMETERS}


def parse_settings(settings: Iterable[str | Setting]) -> list[Setting]:
    """``--set [N.]KEY=VALUE`` texts, parsed as ``regenerate --set`` parses them.

    Raises:
        UsageError: a malformed setting.
    """
    return [s if isinstance(s, Setting) else parse_setting(s) for s in settings]


def _check_settings(
    settings: Sequence[Setting],
    groups: int,
    known: set[str],
    optimizer: str | None,
) -> None:
    for s in settings:
        where = f"{s.group}.{s.key}" if s.group is not None else s.key
        if s.group is not None and s.group >= groups:
            raise UsageError(f"--set {where}: the layout has {groups} group(s), numbered from 0")
        if s.key in _NOT_HYPERPARAMETERS:
            raise UsageError(f"--set {where}: {s.key} is no hyperparameter; the layout sets it")
        if s.key not in known:
            whose = optimizer or "the checkpoint's optimizer"
            raise UsageError(
                f"--set {where}: {whose} has no such hyperparameter "
                f"(it has {', '.join(sorted(known))})"
            )


def plan_hyperparams(
    target_groups: Sequence[Mapping[str, Any]],
    carried_from: Sequence[Sequence[int]],
    saved_groups: Sequence[Mapping[str, Any]],
    *,
    prefer: str = "checkpoint",
    settings: Iterable[str | Setting] = (),
    optimizer: str | None = None,
    layout_why: str = "--hyperparams layout",
) -> HyperparamPlan:
    """Decide every target group's hyperparameters (see the module doc).

    Args:
        target_groups: the layout's groups (``params`` and the layout's values).
        carried_from: per target group, the source group of each parameter it carries.
        saved_groups: the checkpoint's ``param_groups``.
        prefer: ``"checkpoint"`` (default) or ``"layout"``: whose values win where the layout
            gives one.
        settings: ``--set [N.]KEY=VALUE`` settings (texts or parsed); they win over both.
        optimizer: the checkpoint's optimizer class, when known, for the keys ``--set`` may
            name (any key of a group, of that class, or of an LR scheduler).
        layout_why: what asked for the layout's values (``prefer="layout"``), as the plan
            says it: ``--hyperparams layout``, or ``--group`` for values given in rules.

    Raises:
        UsageError: ``prefer`` is neither, a malformed ``--set``, a group index past the
            layout's groups, a key that is no hyperparameter.
    """
    if prefer not in PREFERENCES:
        raise UsageError(f"--hyperparams {prefer!r}: expected checkpoint or layout")
    parsed = parse_settings(settings)
    spec = spec_of(optimizer)
    known = {k for g in [*saved_groups, *target_groups] for k in _hyper(g)} | SCHEDULER_GROUP_KEYS
    known |= set(spec.defaults) if spec is not None else set()
    _check_settings(parsed, len(target_groups), known, optimizer)

    saved = [_hyper(g) for g in saved_groups]
    plan = HyperparamPlan([])
    # The reasons why a value differs from the checkpoint's, by (group, key).
    reasons: dict[tuple[int, str], str] = {}
    first_carried: dict[str, Any] | None = None
    pending_new: list[int] = []
    for index, (group, sources) in enumerate(zip(target_groups, carried_from, strict=True)):
        given = _hyper(group)
        if not sources or not saved:
            plan.groups.append(GroupHyperparams({}, ""))
            pending_new.append(index)
            continue
        major, counts = majority(sources)
        values = dict(saved[major])
        origin = f"source group {major}"
        if len(counts) > 1:
            others = ", ".join(str(g) for g in sorted(counts) if g != major)
            origin += f" (merged with {others})"
        for key in [*values, *(k for k in given if k not in values)]:  # the source's order
            if key not in given:
                continue
            value = given[key]
            if key not in values:
                values[key] = value
                reasons[index, key] = f"not in source group {major}: the layout's value"
            elif same(values[key], value):
                continue
            elif prefer == "layout":
                values[key] = value
                reasons[index, key] = layout_why
            else:
                plan.kept.append(KeptValue(index, key, values[key], value))
        plan.groups.append(GroupHyperparams(values, origin))
        if first_carried is None:
            first_carried = values
    # A group of new parameters falls back on the checkpoint's first group, and for the keys
    # a scheduler owns on the first group that carries parameters (its trained values).
    inherited = {k: v for k, v in (first_carried or {}).items() if k in SCHEDULER_GROUP_KEYS}
    for index in pending_new:
        given = _hyper(target_groups[index])
        if not saved:
            plan.groups[index] = GroupHyperparams(given, "layout")
            continue
        fallback = {**saved[0], **inherited}
        values = {**fallback, **given}
        if given and set(given) >= set(fallback):
            origin = "layout"
        elif given:
            origin = "layout, then source group 0"
        else:
            origin = "source group 0 (no parameter of this group was carried)"
        for key in given:
            reasons[index, key] = "a group of new parameters: the layout's value"
        plan.groups[index] = GroupHyperparams(values, origin)
    for s in parsed:
        for index, decided in enumerate(plan.groups):
            if s.group is None or s.group == index:
                decided.values[s.key] = s.value
                reasons[index, s.key] = "--set"
                plan.kept = [k for k in plan.kept if (k.group, k.key) != (index, s.key)]
    plan.changes = _changes(plan, carried_from, saved, inherited, reasons)
    _check_values(optimizer, plan, {index for index, _ in reasons})
    return plan


def _check_values(optimizer: str | None, plan: HyperparamPlan, asked: set[int]) -> None:
    """Refuse what torch's constructor refuses (``lr=-1``, ``lr=1e-4x``, ``betas=5``) in the
    groups whose values came from the layout or ``--set``, as ``regenerate`` does: torch
    checks only its constructor's arguments, so each group's values are tried as those.

    Raises:
        IncompatibleStateError: the optimizer refuses a group's values.
    """
    if optimizer is None or not asked:
        return
    try:
        cls = by_name(optimizer)
    except UsageError:  # not one of torch.optim's: nothing to check against
        return
    accepted = inspect.signature(cls.__init__).parameters
    for index in sorted(asked):
        values = plan.groups[index].values
        kwargs = {k: v for k, v in values.items() if k in accepted and k != "params"}
        try:
            cls([torch.zeros(1, requires_grad=True)], **kwargs)
        except (ValueError, TypeError, RuntimeError, AssertionError, OverflowError) as e:
            raise IncompatibleStateError(
                f"{cls.__name__} refuses the hyperparameters of target group {index}: {e}"
            ) from e


def _changes(
    plan: HyperparamPlan,
    carried_from: Sequence[Sequence[int]],
    saved: Sequence[Mapping[str, Any]],
    inherited: Mapping[str, Any],
    reasons: Mapping[tuple[int, str], str],
) -> list[HyperparamChange]:
    """Every value that differs from the one its parameters had: against each source group a
    target group carries from (a new group: the checkpoint's first group, and the first
    carried group for scheduler keys), with the reason."""
    changes = []
    for index, group in enumerate(plan.groups):
        sources = carried_from[index] if saved else []
        if sources:
            major, counts = majority(sources)
            references = [major, *sorted(g for g in counts if g != major)]
        elif saved:
            major, counts, references = 0, Counter[int](), [0]
        else:
            continue
        for ref in references:
            old_values = saved[ref] if sources else {**saved[ref], **inherited}
            for key, new in group.values.items():
                why = reasons.get((index, key))
                if ref != major and why is None:
                    why = (
                        f"merged groups {', '.join(map(str, sorted(counts)))}: the "
                        f"{counts[ref]} parameter(s) from group {ref} take group {major}'s value "
                        f"({counts[major]} parameter(s))"
                    )
                if why is None:
                    continue
                if key not in old_values:  # absent there: listed once, with old None
                    if ref == major:
                        changes.append(HyperparamChange(index, key, None, new, why))
                    continue
                if not same(old_values[key], new):
                    changes.append(HyperparamChange(index, key, old_values[key], new, why))
    return changes
