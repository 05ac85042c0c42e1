"""Carry optimizer state to a new model layout or new param groups, matching by name.

(The module is ``remapping`` so that ``optckpt.remap`` stays the function.)

torch matches saved state to parameters by position only, so after a model change
``load_state_dict`` fails (or, worse, succeeds and mixes up moments). :func:`remap` names every
saved parameter (:func:`optckpt.names.name_parameters`), renames them by rules, matches them to
the target's names (wrapper prefixes such as ``_orig_mod.`` stripped where only that makes
them match, :func:`optckpt.names.match_names`), and rebuilds
the state dict for the target layout: each target parameter takes the state of the source
parameter of the same name, bit for bit; new parameters get no state, as a fresh torch
optimizer has before its first step; parameters that are gone are listed as dropped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from optckpt.errors import IncompatibleStateError, UsageError
from optckpt.layout import Layout, ParamSpec, load_layout, model_state_of
from optckpt.names import match_names, name_parameters, to_name_keyed
from optckpt.statedict import PARAM_SHAPED_KEYS, StateDict, group_of, param_ids


@dataclass
class GroupPlan:
    """What happens in one target group."""

    index: int
    carried: list[str] = field(default_factory=list)
    renamed: list[tuple[str, str]] = field(default_factory=list)  # (source name, target name)
    new: list[str] = field(default_factory=list)
    reset: list[str] = field(default_factory=list)
    hyperparams: dict[str, Any] = field(default_factory=dict)
    hyperparams_from: str = ""


@dataclass
class RemapPlan:
    """The whole plan: per target group, plus what is dropped and what to watch."""

    names_source: str | None  # "keys", "param_names", "layout" or "recovered" (optckpt.names)
    groups: list[GroupPlan]
    dropped: list[str]
    warnings: list[str]
    names_from: str = ""  # the source of the names, in words
    prefixes_stripped: list[str] = field(default_factory=list)  # e.g. ["_orig_mod."]

    def to_json(self) -> dict[str, Any]:
        """The plan as ``remap --json`` prints it."""
        from optckpt.inspect import jsonable

        return {
            "names_source": self.names_source,
            "prefixes_stripped": self.prefixes_stripped,
            "groups": [
                {
                    "index": g.index,
                    "carried": g.carried,
                    "renamed": [{"from": a, "to": b} for a, b in g.renamed],
                    "new": g.new,
                    "reset": g.reset,
                    "hyperparams": jsonable(g.hyperparams),
                    "hyperparams_from": g.hyperparams_from,
                }
                for g in self.groups
            ],
            "dropped": self.dropped,
            "warnings": self.warnings,
        }


def parse_rename(rule: str) -> tuple[re.Pattern[str], str]:
    """Parse ``'REGEX=REPLACEMENT'`` (split at the first ``=``; ``\\1`` refers to groups).

    Raises:
        UsageError: no ``=`` or a bad regex.
    """
    pattern, sep, replacement = rule.partition("=")
    if not sep or not pattern:
        raise UsageError(f"--rename {rule!r}: expected 'REGEX=REPLACEMENT'")
    try:
        return re.compile(pattern), replacement
    except re.error as e:
        raise UsageError(f"--rename {rule!r}: bad regex ({e})") from e


def _renamed(name: str, rules: Sequence[tuple[re.Pattern[str], str]]) -> str:
    for regex, replacement in rules:
        name = regex.sub(replacement, name)
    return name


def _shape_of(state: Any) -> tuple[int, ...] | None:
    if isinstance(state, Mapping):
        for key, value in state.items():
            if key in PARAM_SHAPED_KEYS and isinstance(value, torch.Tensor):
                return tuple(value.shape)
    return None


def _cast(value: Any, key: Any, dtype: torch.dtype) -> Any:
    """The casting policy for a new parameter dtype: floating state follows it, ``step`` never."""
    if isinstance(value, torch.Tensor):
        if key == "step" or not value.is_floating_point():
            return value
        return value.to(dtype=dtype)
    if isinstance(value, Mapping):
        return {k: _cast(v, k, dtype) for k, v in value.items()}
    if isinstance(value, list):
        return [_cast(v, None, dtype) for v in value]
    if isinstance(value, tuple):
        return tuple(_cast(v, None, dtype) for v in value)
    return value


def _carry(state: Any, source_dtype: str | None, spec: ParamSpec) -> Any:
    target = getattr(torch, spec.dtype, None)
    if (
        not isinstance(target, torch.dtype)
        or not target.is_floating_point
        or spec.dtype == source_dtype
    ):
        return state
    return _cast(state, None, target)


def _source_dtype(state: Any) -> str | None:
    if isinstance(state, Mapping):
        for key, value in state.items():
            if key in PARAM_SHAPED_KEYS and isinstance(value, torch.Tensor):
                return str(value.dtype).removeprefix("torch.")
    return None


def _hyperparams(
    index: int,
    target_group: Mapping[str, Any],
    sources: list[int],
    saved_groups: Sequence[Mapping[str, Any]],
    warnings: list[str],
) -> tuple[dict[str, Any], str]:
    """Hyperparameters of a target group: the layout's where it gives them, else the source's."""
    given = {k: v for k, v in target_group.items() if k not in ("params", "param_names")}
    if not saved_groups:
        return given, "layout"
    if sources:
        origin = (
            f"source group {sources[0]}"
            if len(sources) == 1
            else "source groups " + ", ".join(map(str, sources))
        )
        base = {
            k: v for k, v in saved_groups[sources[0]].items() if k not in ("params", "param_names")
        }
        for other in sources[1:]:
            for key, value in saved_groups[other].items():
                if key in ("params", "param_names") or key in given:
                    continue
                if key not in base:
                    base[key] = value
                elif repr(base[key]) != repr(value):
                    warnings.append(
                        f"target group {index}: {key} differs between source group {sources[0]} "
                        f"({base[key]!r}) and source group {other} ({value!r}); kept {base[key]!r}"
                    )
    else:
        origin = "source group 0 (no parameter of this group was carried)"
        base = {k: v for k, v in saved_groups[0].items() if k not in ("params", "param_names")}
    if given:
        origin = "layout" if set(given) >= set(base) else f"layout, then {origin}"
    return {**base, **given}, origin


def remap(
    state_dict: Mapping[str, Any],
    *,
    to: Layout,
    source: Layout | None = None,
    rename: Iterable[str] = (),
    reset_mismatched: bool = False,
    model_state: Mapping[str, torch.Tensor] | None = None,
) -> tuple[StateDict, RemapPlan]:
    """Rebuild an optimizer state dict for the layout ``to``, matching parameters by name.

    Args:
        state_dict: the saved optimizer state dict (not modified).
        to: the target layout.
        source: the layout the checkpoint was saved with, when its groups carry no
            ``param_names`` (see :func:`optckpt.names.name_parameters`).
        rename: ``'REGEX=REPLACEMENT'`` rules applied, in order, to every source name.
        reset_mismatched: drop the state of a parameter whose shape changed instead of failing.
        model_state: the checkpoint's model state dict, to recover names from.

    Returns:
        ``(new_state_dict, plan)``. Carried state tensors are the source's own objects
        (bit-exact) unless the target dtype differs. The output keeps the input's keying: ID-keyed
        groups carry ``param_names``; a name-keyed input gives a name-keyed output, keyed by the
        target's names as FQNs (:func:`optckpt.names.to_name_keyed`).

    Raises:
        UsageError: names cannot be recovered, bad rename rules, or two names renamed to one.
        IncompatibleStateError: a carried parameter's shape changed (every one is named with
            both shapes) and ``reset_mismatched`` is off.
    """
    naming = name_parameters(state_dict, layout=source, model_state=model_state)
    if naming.source is None:
        raise UsageError(
            "the checkpoint's groups carry no param_names and it holds no model state dict; "
            "pass --from OLD_LAYOUT to name its parameters"
        )
    names = naming.names
    rules = [parse_rename(r) for r in rename]
    by_target_name: dict[str, tuple[str, Any]] = {}
    for pid, name in names.items():
        new_name = _renamed(name, rules)
        if new_name in by_target_name:
            raise UsageError(
                f"--rename maps both {by_target_name[new_name][0]!r} and {name!r} to {new_name!r}"
            )
        by_target_name[new_name] = (name, pid)
    # Wrapper prefixes (torch.compile's "_orig_mod.", DDP's "module.", ...) are no part of a
    # parameter's identity: names that match the layout only without them match so.
    matched = match_names(to.names(), by_target_name)

    saved_groups = state_dict["param_groups"]
    saved_state = state_dict["state"]
    source_group = group_of(state_dict)
    warnings: list[str] = []
    mismatches: list[str] = []
    plans: list[GroupPlan] = []
    new_state: dict[int, Any] = {}
    new_groups: list[dict[str, Any]] = []
    next_id = 0
    used: set[str] = set()
    for index, group in enumerate(to.groups):
        plan = GroupPlan(index)
        ids: list[int] = []
        sources: list[int] = []
        for name in group["params"]:
            spec = to.params[name]
            pid_new = next_id
            next_id += 1
            ids.append(pid_new)
            if name not in matched.found:
                plan.new.append(name)
                continue
            old_name, pid = by_target_name[matched.found[name]]
            used.add(matched.found[name])
            if source_group.get(pid) is not None and source_group[pid] not in sources:
                sources.append(source_group[pid])
            state = saved_state.get(pid)
            shape = _shape_of(state)
            if shape is not None and shape != spec.shape:
                if reset_mismatched:
                    plan.reset.append(name)
                    continue
                mismatches.append(
                    f"{name}: {list(shape)} in the checkpoint, {list(spec.shape)} in the layout"
                )
                continue
            if state is not None:
                new_state[pid_new] = _carry(state, _source_dtype(state), spec)
            if old_name == matched.found[name]:  # no --rename rule changed it
                plan.carried.append(name)
            else:
                plan.renamed.append((old_name, name))
        plan.hyperparams, plan.hyperparams_from = _hyperparams(
            index, group, sources, saved_groups, warnings
        )
        new_groups.append({**plan.hyperparams, "params": ids, "param_names": list(group["params"])})
        plans.append(plan)
    if mismatches:
        raise IncompatibleStateError(
            "shapes changed: "
            + "; ".join(mismatches)
            + "; pass --reset-mismatched to drop their state"
        )
    dropped = [by_target_name[n][0] for n in by_target_name if n not in used]
    if dropped and not used:
        warnings.append(
            "no parameter kept its state: no checkpoint name matches a layout name "
            f"(checkpoint {dropped[0]!r}, layout {to.names()[0]!r}), not even without "
            "wrapper prefixes; rename them with --rename 'REGEX=REPLACEMENT'"
            if to.names()
            else "no parameter kept its state: the layout names no parameters"
        )
    orphans = [k for k in saved_state if k not in set(param_ids(state_dict))]
    if orphans:
        warnings.append(
            f"dropped state under IDs in no param group: {', '.join(map(str, orphans))}"
        )
    new_sd: StateDict = {"state": new_state, "param_groups": new_groups}
    if naming.source == "keys":  # name-keyed in, name-keyed out
        target_names = {pid: n for g in new_groups for pid, n in zip(g["params"], g["param_names"])}
        if not any("param_names" in g for g in saved_groups):
            new_groups[:] = [{k: v for k, v in g.items() if k != "param_names"} for g in new_groups]
        new_sd = to_name_keyed(new_sd, target_names)
    return new_sd, RemapPlan(
        naming.source, plans, dropped, warnings, naming.describe(), matched.stripped
    )


@dataclass(frozen=True)
class RemapResult:
    """What :func:`remap_checkpoint` did (``out`` is ``None`` on a dry run)."""

    key: str
    plan: RemapPlan
    out: Path | None


def remap_checkpoint(
    path: str | Path,
    to: str | Path | Layout,
    out: str | Path | None = None,
    *,
    source: str | Path | Layout | None = None,
    rename: Iterable[str] = (),
    group_rules: Sequence[str] = (),
    reset_mismatched: bool = False,
    key: str | None = None,
    force: bool = False,
    allow_globals: Iterable[str] = (),
) -> RemapResult:
    """Remap the optimizer state of a checkpoint file and write the result to ``out``.

    Everything else in the file is kept. With ``out=None`` nothing is written (a dry run).

    Raises:
        UsageError: bad options, an output that may not be written, several optimizer state
            dicts and no ``key``, names that cannot be recovered.
        IncompatibleStateError: shapes changed (see :func:`remap`).
        UnreadableCheckpointError: the input cannot be read.
    """
    from optckpt.devices import carry_devices
    from optckpt.io import load_checkpoint
    from optckpt.io.write import check_output, format_for, save_checkpoint
    from optckpt.locate import select_optimizers

    path = Path(path)
    if out is not None:
        out = Path(out)
        check_output(out, [path, to, source], force=force)
        if path.is_dir():
            raise UsageError(
                f"{path} is a folder; remap the optimizer file in it (e.g. {path}/optimizer.pt)"
            )
    target = to if isinstance(to, Layout) else load_layout(to, group_rules, allow_globals)
    if group_rules and isinstance(to, Layout):
        raise UsageError("--group applies to a --to model state dict file")
    old = (
        source
        if isinstance(source, Layout) or source is None
        else load_layout(source, (), allow_globals)
    )
    checkpoint = load_checkpoint(path, allow_globals=allow_globals)
    found = select_optimizers(checkpoint.root, key)
    if len(found) > 1:
        listed = ", ".join(repr(f.key) for f in found)
        raise UsageError(
            f"the checkpoint holds several optimizer state dicts ({listed}); pick one with --key"
        )
    located = found[0]
    new, plan = remap(
        located.state_dict,
        to=target,
        source=old,
        rename=rename,
        reset_mismatched=reset_mismatched,
        model_state=model_state_of(checkpoint),
    )
    if out is None:
        return RemapResult(located.key, plan, None)
    # Carried state keeps its saved device; cast state takes the one the state was saved on.
    devices = carry_devices(checkpoint, located.state_dict, new, same_ids=False)
    # The loaded tree is ours (the file is mapped copy-on-write): swap the new state dict in.
    located.state_dict.clear()
    located.state_dict.update(new)
    save_checkpoint(
        checkpoint.root, out, format_for(out), sources=checkpoint.sources, saved_devices=devices
    )
    return RemapResult(located.key, plan, out)
