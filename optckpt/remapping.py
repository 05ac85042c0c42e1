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

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from optckpt.changes import majority
from optckpt.companions import checkpoint_companions
from optckpt.companions.remap import (
    GroupMapping,
    SchedulerChange,
    apply_remaps,
    driving,
    follow_groups,
    sibling_warnings,
)
from optckpt.devices import replace_placement
from optckpt.errors import IncompatibleStateError, UsageError
from optckpt.io.folder_writer import OMIT
from optckpt.io.rewrite import plan_rewrite
from optckpt.io.write import ProgressStart
from optckpt.layout import Layout, ParamSpec, load_layout
from optckpt.locate import keyed_optimizers
from optckpt.move import Later
from optckpt.names import NameSources, match_names, name_parameters, sources_of, to_name_keyed
from optckpt.optim.guess import guess_optimizer
from optckpt.optim.specs import (
    SPECS,
    param_dtype_from_state,
    param_shape_from_state,
    spec_of,
    state_mismatches,
)
from optckpt.patterns import apply_renames, parse_rename
from optckpt.remap_hyperparams import (
    PREFERENCES,
    HyperparamChange,
    KeptValue,
    Setting,
    parse_settings,
    plan_hyperparams,
)
from optckpt.statedict import StateDict, cast_tree, group_of, key_of, param_ids


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

    names_source: str | None  # "keys", "param_names", "layout", "model config", "recovered"
    groups: list[GroupPlan]
    dropped: list[str]
    warnings: list[str]
    names_from: str = ""  # the source of the names, in words
    prefixes_stripped: list[str] = field(default_factory=list)  # e.g. ["_orig_mod."]
    # Hyperparameters that differ from their source group's, and the layout's values that
    # were not taken (optckpt.remap_hyperparams).
    hyperparam_changes: list[HyperparamChange] = field(default_factory=list)
    hyperparams_kept: list[KeptValue] = field(default_factory=list)
    # Where the new state dict's parts came from, for its saved devices (not in the JSON):
    # each new state key's source parameter ID, each target group's source group.
    state_from: dict[Any, Any] = field(default_factory=dict)
    groups_from: list[int | None] = field(default_factory=list)
    # Per target group, the source group of each parameter it carries (not in the JSON).
    group_sources: list[list[int]] = field(default_factory=list)
    # The LR schedulers' per-group entries that change (optckpt.companions.remap); None
    # where no scheduler drives the optimizer.
    scheduler_changes: list[SchedulerChange] | None = None

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
            "hyperparam_changes": [c.to_json() for c in self.hyperparam_changes],
            "hyperparams_kept": [k.to_json() for k in self.hyperparams_kept],
            "dropped": self.dropped,
            "warnings": self.warnings,
        } | (
            {}
            if self.scheduler_changes is None
            else {"scheduler_changes": [c.to_json() for c in self.scheduler_changes]}
        )


def _carry(
    state: Any, source_dtype: str | None, spec: ParamSpec, later: Later | None = None
) -> Any:
    """The state of a parameter whose dtype becomes the layout's: floating state follows it,
    ``step`` never (the casting policy, through the core's recursion). A placeholder
    (``later``) stays one, of the cast."""
    target = getattr(torch, spec.dtype, None)
    if (
        not isinstance(target, torch.dtype)
        or not target.is_floating_point
        or spec.dtype == source_dtype
    ):
        return state

    def cast(tensor: torch.Tensor, path: tuple[Any, ...]) -> torch.Tensor:
        if key_of(path) == "step" or not tensor.is_floating_point():
            return tensor
        stand_in = later(tensor, target) if later is not None else None
        return stand_in if stand_in is not None else tensor.to(dtype=target)

    return cast_tree(state, cast)


def _source_dtype(optimizer: str | None, state: Any) -> str | None:
    dtype = param_dtype_from_state(optimizer, state)
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _mismatch(
    name: str, optimizer: str | None, state: Any, spec: ParamSpec, total_numel: int
) -> str | None:
    """Why the saved ``state`` does not fit the layout's parameter ``name``, if it does not:
    every optimizer's state keys are checked as :mod:`optckpt.optim.specs` declares them
    (Adafactor's factored moments, LBFGS's flat vectors over all parameters)."""
    wrong = state_mismatches(optimizer, state, spec.shape, total_numel)
    if not wrong:
        return None
    shape = param_shape_from_state(optimizer, state)
    if shape is not None and shape != spec.shape:
        return f"{name}: {list(shape)} in the checkpoint, {list(spec.shape)} in the layout"
    key, found, want = wrong[0]
    return f"{name}: its state {key} is {list(found)}, the layout's parameters need {list(want)}"


def _unchecked(optimizer: str | None, state: Mapping[Any, Any]) -> list[str]:
    """State keys of an optimizer outside torch.optim, whose shapes nothing declares."""
    if spec_of(optimizer) is not None:
        return []
    keys = {str(k) for s in state.values() if isinstance(s, Mapping) for k in s}
    known = {k.name for spec in SPECS.values() for k in spec.state}
    return sorted(keys - known)


def remap(
    state_dict: Mapping[str, Any],
    *,
    to: Layout,
    source: Layout | None = None,
    rename: Iterable[str] = (),
    reset_mismatched: bool = False,
    model_state: Mapping[str, torch.Tensor] | None = None,
    hyperparams: str = "checkpoint",
    settings: Iterable[str | Setting] = (),
    layout_why: str = "--hyperparams layout",
    name_sources: NameSources | None = None,
    later: Later | None = None,
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
        hyperparams: ``"checkpoint"`` (default): groups keep the checkpoint's trained values
            (a decayed ``lr``, tuned ``betas``); ``"layout"``: the layout's values win where
            it gives them (:mod:`optckpt.remap_hyperparams`).
        settings: ``--set [N.]KEY=VALUE`` settings (as ``regenerate --set`` parses them),
            which win over both.
        layout_why: what asked for the layout's values, as the plan says it.
        name_sources: what the checkpoint offers to name the parameters besides ``model_state``
            (its other optimizers, a Trainer folder's model config: :func:`optckpt.names.sources_of`).
        later: the checkpoint's :meth:`~optckpt.io.Checkpoint.later`: a DCP folder's
            placeholders are cast when written (only shapes and dtypes are planned from).

    Returns:
        ``(new_state_dict, plan)``. Carried state tensors are the source's own objects
        (bit-exact) unless the target dtype differs. The output keeps the input's keying: ID-keyed
        groups carry ``param_names``; a name-keyed input gives a name-keyed output, keyed by the
        target's names as FQNs (:func:`optckpt.names.to_name_keyed`).

    Raises:
        UsageError: names cannot be recovered, bad rename rules, two names renamed to one,
            a bad ``hyperparams`` or ``settings``.
        IncompatibleStateError: a carried parameter's shape changed (every one is named with
            both shapes; for every optimizer, as :mod:`optckpt.optim.specs` declares its
            state) and ``reset_mismatched`` is off.
    """
    naming = name_parameters(
        state_dict, layout=source, model_state=model_state, sources=name_sources
    )
    if naming.source is None:
        raise UsageError(
            "the checkpoint's groups carry no param_names and it holds no model state dict"
            + "".join(f"; {note}" for note in naming.notes)
            + "; pass --from OLD_LAYOUT to name its parameters"
        )
    names = naming.names
    rules = [parse_rename(r) for r in rename]
    by_target_name: dict[str, tuple[str, Any]] = {}
    for pid, name in names.items():
        new_name = apply_renames(name, rules)
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
    optimizer = guess_optimizer(state_dict).name
    total_numel = sum(math.prod(to.params[n].shape) for n in to.names())
    carried_from: list[list[int]] = []
    warnings: list[str] = []
    mismatches: list[str] = []
    plans: list[GroupPlan] = []
    new_state: dict[int, Any] = {}
    state_from: dict[Any, Any] = {}
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
            if source_group.get(pid) is not None:
                sources.append(source_group[pid])
            state = saved_state.get(pid)
            wrong = _mismatch(name, optimizer, state, spec, total_numel)
            if wrong is not None:
                if reset_mismatched:
                    plan.reset.append(name)
                    continue
                mismatches.append(wrong)
                continue
            if state is not None:
                new_state[pid_new] = _carry(state, _source_dtype(optimizer, state), spec, later)
                state_from[pid_new] = pid
            if old_name == matched.found[name]:  # no --rename rule changed it
                plan.carried.append(name)
            else:
                plan.renamed.append((old_name, name))
        carried_from.append(sources)
        new_groups.append({"params": ids, "param_names": list(group["params"])})
        plans.append(plan)
    hyper = plan_hyperparams(
        to.groups,
        carried_from,
        saved_groups,
        prefer=hyperparams,
        settings=settings,
        optimizer=optimizer,
        layout_why=layout_why,
    )
    for index, (plan, decided) in enumerate(zip(plans, hyper.groups, strict=True)):
        plan.hyperparams, plan.hyperparams_from = decided.values, decided.origin
        new_groups[index] = {**decided.values, **new_groups[index]}
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
    listed = set(param_ids(state_dict))  # once: per key it made remap quadratic
    orphans = [k for k in saved_state if k not in listed]
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
        state_from = {target_names[pid]: old for pid, old in state_from.items()}
    unchecked = _unchecked(optimizer, saved_state) if new_state else []
    if unchecked:
        warnings.append(
            "the optimizer is none of torch.optim's (state keys "
            f"{', '.join(unchecked)}): the shapes of those keys were not checked "
            "against the layout"
        )
    return new_sd, RemapPlan(
        naming.source,
        plans,
        dropped,
        warnings,
        naming.describe(),
        matched.stripped,
        hyperparam_changes=hyper.changes,
        hyperparams_kept=hyper.kept,
        state_from=state_from,
        # the values majority's group gives (a group of new parameters: the first group's)
        groups_from=[majority(s)[0] if s else 0 for s in carried_from],
        group_sources=carried_from,
    )


@dataclass(frozen=True)
class RemapResult:
    """What :func:`remap_checkpoint` did (``out`` is ``None`` on a dry run)."""

    key: str
    plan: RemapPlan
    out: Path | None
    notes: list[str] = field(default_factory=list)  # which checkpoint-N of a folder was read


def remap_checkpoint(
    path: str | Path,
    to: str | Path | Layout,
    out: str | Path | None = None,
    *,
    source: str | Path | Layout | None = None,
    rename: Iterable[str] = (),
    group_rules: Sequence[str] = (),
    reset_mismatched: bool = False,
    hyperparams: str | None = None,
    settings: Iterable[str | Setting] = (),
    key: str | None = None,
    force: bool = False,
    link: bool = False,
    allow_globals: Iterable[str] = (),
    progress: ProgressStart | None = None,
    fmt: str | None = None,
    drop_scheduler: bool = False,
) -> RemapResult:
    """Remap the optimizer state of a checkpoint file and write the result to ``out``.

    Everything else in the file is kept. With ``out=None`` nothing is written (a dry run).
    ``hyperparams`` and ``settings`` decide the groups' hyperparameters (see :func:`remap`);
    without ``hyperparams`` the checkpoint's values are kept, except that values written in
    ``group_rules`` (``--group 'REGEX:key=value'``) are asked for and win. ``progress`` is
    told the bytes to write when writing starts; the callback it returns is told each write.

    LR schedulers that drive the optimizer follow the new groups
    (:mod:`optckpt.companions.remap`); one that cannot is refused, or with ``drop_scheduler``
    left out of the output.

    A DCP folder is read too (its optimizer state is keyed by names), and written when ``fmt``
    is ``"dcp"`` or ``out`` ends in ``/`` or is a folder (as ``convert`` decides), from a DCP
    folder only; the output keeps the input's keying. A training folder is written as a
    folder whose other files are copies, or with ``link`` hard links
    (:mod:`optckpt.io.folder_writer`).

    Raises:
        UsageError: bad options, an output that may not be written (a DCP folder from a file), several optimizer state
            dicts and no ``key``, names that cannot be recovered.
        IncompatibleStateError: shapes changed (see :func:`remap`), or a scheduler cannot
            follow the new groups and ``drop_scheduler`` is off.
        UnreadableCheckpointError: the input cannot be read.
    """
    if hyperparams is not None and hyperparams not in PREFERENCES:
        raise UsageError(f"--hyperparams {hyperparams!r}: expected checkpoint or layout")
    settings = parse_settings(settings)
    job = plan_rewrite(
        path,
        out,
        command="remap",
        force=force,
        inputs=[to, source],
        kind=fmt,
        key=key,
        allow_globals=allow_globals,
        link=link,
    )
    job.refuse_file_to_dcp("remap")
    target = to if isinstance(to, Layout) else load_layout(to, group_rules, allow_globals)
    if group_rules and isinstance(to, Layout):
        raise UsageError("--group applies to a --to model state dict file")
    old = (
        source
        if isinstance(source, Layout) or source is None
        else load_layout(source, (), allow_globals)
    )
    # A DCP folder's tensors are placeholders: the plan needs shapes and dtypes only (0-dim
    # values such as step are read); each is read, and cast, when written.
    checkpoint = job.load()
    located = job.select_one(checkpoint)
    new, plan = remap(
        located.state_dict,
        to=target,
        source=old,
        rename=rename,
        reset_mismatched=reset_mismatched,
        hyperparams=hyperparams or ("layout" if group_rules else "checkpoint"),
        settings=settings,
        layout_why="--group" if hyperparams is None else "--hyperparams layout",
        name_sources=sources_of(checkpoint, located.state_dict),
        later=checkpoint.later,
    )
    schedulers = driving(
        checkpoint_companions(checkpoint, allow_globals),
        keyed_optimizers(checkpoint.root),
        located.key,
    )
    mapping = GroupMapping(
        plan.group_sources, new["param_groups"], len(located.state_dict["param_groups"])
    )
    followed = follow_groups(schedulers, mapping, drop=drop_scheduler)
    plan.warnings += sibling_warnings(job.source, mapping, allow_globals)
    if schedulers:
        plan.scheduler_changes = [c for f in followed for c in f.changes]
    if job.output is None:
        return RemapResult(located.key, plan, None, checkpoint.notes())
    apply_remaps(checkpoint.root, followed, omit=OMIT)
    # Carried state keeps its saved device, cast or not; new state takes the usual one.
    replace_placement(
        checkpoint,
        located.path,
        located.state_dict,
        new,
        ids=plan.state_from,
        groups=plan.groups_from,
    )
    # The loaded tree is ours (the file is mapped copy-on-write): swap the new state dict in.
    located.state_dict.clear()
    located.state_dict.update(new)
    job.save(checkpoint, progress)
    return RemapResult(located.key, plan, job.output.path, checkpoint.notes())
