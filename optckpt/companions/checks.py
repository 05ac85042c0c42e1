"""Whether the companions agree with the optimizer they drive.

Warnings only for what is certainly inconsistent (DESIGN.md, "Training state"): a per-group
list of a scheduler whose length is not the optimizer's group count (torch's scheduler zips
it with the groups, so groups go unscheduled or an index fails), a group ``lr`` that is not
the lr the scheduler set last (every scheduler's ``step`` writes both together), a group that
lacks ``initial_lr`` (or OneCycleLR's ``max_lr`` / ``min_lr`` / momenta), which the scheduler
reads when it is built to resume, and a GradScaler scale that is zero or not finite (every
step would be skipped, or every gradient unscaled to nothing).

What depends on how the training loop calls them is reported without a warning: the
scheduler's ``last_epoch`` against the optimizer's ``step`` (a per-epoch scheduler counts
epochs), and the trainer's ``global_step`` against both (skipped AMP steps do not advance
the optimizer).

Plain Python: tensors (a ``step``, a tensor ``lr``) are read through
:func:`optckpt.companions.summary.number`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from optckpt.companions.find import Companion
from optckpt.companions.kinds import PER_GROUP_KEYS, guess_scheduler
from optckpt.companions.summary import number

# Group keys OneCycleLR reads at every step (its phases name them; momenta if it cycles them).
_ONE_CYCLE_KEYS = ("initial_lr", "max_lr", "min_lr")
_ONE_CYCLE_MOMENTA = ("max_momentum", "base_momentum")


def _fmt(value: float | int) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def optimizer_step(state_dict: Mapping[str, Any]) -> float | int | None:
    """The optimizer's ``step`` when every parameter with state agrees on it, else ``None``."""
    state = state_dict.get("state")
    steps = set()
    for value in state.values() if isinstance(state, Mapping) else ():
        step = number(value.get("step")) if isinstance(value, Mapping) else None
        if step is not None:
            steps.add(step)
    if len(steps) != 1:
        return None
    (step,) = steps
    return int(step) if float(step).is_integer() else step


def suffix(name: str) -> str:
    """``_1`` of ``scheduler_1.bin``; ``""`` of ``scheduler.pt``."""
    found = re.search(r"_\d+$", name.split(".")[0])
    return found.group(0) if found else ""


def _lrs_match(last: Any, state_dict: Mapping[str, Any]) -> bool:
    groups = state_dict.get("param_groups")
    if not isinstance(last, (list, tuple)) or not isinstance(groups, (list, tuple)):
        return False
    if len(last) != len(groups):
        return False
    return all(
        isinstance(g, Mapping)
        and number(g.get("lr")) is not None
        and number(g.get("lr")) == number(x)
        for g, x in zip(groups, last)
    )


def pair(companion: Companion, optimizers: Sequence[tuple[str, Mapping[str, Any]]]) -> str | None:
    """The key of the optimizer a scheduler or scaler drives: the only optimizer there is;
    in a folder the optimizer file with the same number (accelerate's ``scheduler_1.bin``
    drives ``optimizer_1.bin``); else, for a scheduler, the one optimizer whose group lrs are
    exactly the lrs the scheduler set last (a Lightning GAN's ``lr_schedulers.0``). ``None``
    when that is not certain: the checks then need the optimizer and do not run."""
    if len(optimizers) == 1:
        return optimizers[0][0]
    if companion.in_folder:
        want = "optimizer" + suffix(str(companion.path[0]))
        matches = [k for k, _ in optimizers if k.split(".")[0] == want]
        if len(matches) == 1:
            return matches[0]
    if companion.kind == "lr_scheduler":
        last = companion.state.get("_last_lr")
        matches = [k for k, sd in optimizers if _lrs_match(last, sd)]
        if len(matches) == 1:
            return matches[0]
    return None


def _per_group(name: str, state: Mapping[str, Any], groups: int, where: str) -> list[str]:
    found = []
    for key in PER_GROUP_KEYS:
        value = state.get(key)
        if isinstance(value, (list, tuple)) and len(value) != groups:
            found.append(
                f"{where}: {key} has {len(value)} entries, the optimizer has {groups} param "
                f"groups ({name} for another group count cannot drive this optimizer)"
            )
    children = state.get("_schedulers")
    for i, child in enumerate(children if isinstance(children, (list, tuple)) else ()):
        if isinstance(child, Mapping):
            inner = guess_scheduler(child).name or "scheduler"
            found += _per_group(inner, child, groups, f"{where}, scheduler {i} ({inner})")
    return found


def _needs(name: str | None, state: Mapping[str, Any]) -> tuple[str, ...]:
    """The group keys scheduler ``name`` reads when it resumes."""
    if name is None or name == "ReduceLROnPlateau":
        return ()
    if name == "OneCycleLR":
        return _ONE_CYCLE_KEYS + (_ONE_CYCLE_MOMENTA if state.get("cycle_momentum") else ())
    needs: tuple[str, ...] = ("initial_lr",)
    children = state.get("_schedulers")
    for child in children if isinstance(children, (list, tuple)) else ():
        if isinstance(child, Mapping):
            needs += tuple(k for k in _needs(guess_scheduler(child).name, child) if k not in needs)
    return needs


def scheduler_warnings(companion: Companion, optimizer: Mapping[str, Any]) -> list[str]:
    """What is certainly inconsistent between a scheduler and the optimizer it drives."""
    state, name = companion.state, companion.guess.name or "the scheduler"
    groups = [g for g in optimizer.get("param_groups", []) if isinstance(g, Mapping)]
    found = _per_group(name, state, len(groups), "scheduler")
    last = state.get("_last_lr")
    if isinstance(last, (list, tuple)) and len(last) == len(groups):
        for index, (group, lr) in enumerate(zip(groups, last)):
            have, want = number(group.get("lr")), number(lr)
            if have is not None and want is not None and not math.isclose(have, want, rel_tol=1e-6):
                found.append(
                    f"group {index}: lr {_fmt(have)} is not the lr the scheduler set last "
                    f"({_fmt(want)}); something changed one without the other"
                )
    for key in _needs(companion.guess.name, state):
        lacking = [str(i) for i, g in enumerate(groups) if key not in g]
        if lacking:
            found.append(
                f"groups {', '.join(lacking)} lack {key}, which {name} reads to resume "
                "(torch raises KeyError building it with last_epoch)"
            )
    return found


def scaler_warnings(companion: Companion) -> list[str]:
    """A GradScaler scale of zero or not finite."""
    scale = number(companion.state.get("scale"))
    if scale is not None and (not math.isfinite(scale) or scale == 0):
        return [
            f"GradScaler scale is {_fmt(scale)}: every step would be skipped or its gradients "
            "unscaled to nothing"
        ]
    return []


def _beside_step(name: str, value: Any, step: float | int, why: str) -> list[str]:
    """``value`` (a counter named ``name``) beside the optimizer's ``step``, and ``why`` the
    two may differ where they do; nothing where ``value`` is no number."""
    count = number(value)
    if count is None:
        return []
    differ = "" if count == step else f" ({why})"
    return [f"{name} {_fmt(count)}, the optimizer's step {_fmt(step)}{differ}"]


def observations(companion: Companion, optimizer: Mapping[str, Any] | None) -> list[str]:
    """What to know that depends on the training loop (no warnings): counts side by side."""
    step = optimizer_step(optimizer) if optimizer is not None else None
    if step is None:
        return []
    if companion.kind == "lr_scheduler":
        why = (
            "equal for a scheduler stepped once per optimizer step; "
            "a per-epoch scheduler counts epochs"
        )
        return _beside_step("last_epoch", companion.state.get("last_epoch"), step, why)
    if companion.kind == "trainer":
        why = "skipped AMP steps and several optimizers make them differ"
        return _beside_step("global_step", companion.state.get("global_step"), step, why)
    return []
