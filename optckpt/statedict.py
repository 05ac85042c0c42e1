"""torch's optimizer state-dict rules, reimplemented as pure functions.

The reference is ``torch/optim/optimizer.py`` (``Optimizer.state_dict`` and
``Optimizer.load_state_dict``) of the installed torch; ``tests/test_statedict.py`` checks
these functions against it on random layouts.

* :func:`pack` is ``Optimizer.state_dict()``: parameters become integer IDs.
* :func:`check_groups`, :func:`map_ids` and :func:`cast_state` are the steps of
  ``load_state_dict``; :func:`unpack` runs them in torch's order.
* :func:`validate_state_dict` refuses, before anything walks it, what has the shape of a
  state dict but that no optimizer could use (``params`` holding lists, a complex ``step``,
  ``lr = 10**400``, ...).

None of these functions mutate their arguments. Like torch, they do not copy tensors that
need no cast: the unpacked state may share tensors with the state dict it came from.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from itertools import chain
from typing import Any

import torch

from optckpt.errors import (
    GroupCountMismatchError,
    GroupSizeMismatchError,
    IncompatibleStateError,
    UnreadableCheckpointError,
)

StateDict = dict[str, Any]
"""An ``Optimizer.state_dict()``: ``{"state": {id: {key: value}}, "param_groups": [...]}``."""

REMAP_HINT = (
    "run `optckpt remap CHECKPOINT --to NEW_LAYOUT --dry-run` to carry the state over by name"
)


def is_optimizer_state_dict(obj: object) -> bool:
    """Tell whether ``obj`` has the shape of an optimizer state dict.

    That is a mapping with a ``state`` mapping and a ``param_groups`` list of mappings that
    each have a ``params`` list.
    """
    if not isinstance(obj, Mapping):
        return False
    state, groups = obj.get("state"), obj.get("param_groups")
    return (
        isinstance(state, Mapping)
        and isinstance(groups, (list, tuple))
        and all(
            isinstance(g, Mapping) and isinstance(g.get("params"), (list, tuple)) for g in groups
        )
    )


# The dtypes a ``step`` tensor may have: torch keeps it as a float32 (or float64) 0-dim tensor,
# older versions as an integer; bool, complex, float8 and the wide unsigned types are no count.
_STEP_DTYPES = frozenset(
    {
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
    }
)


def show_value(value: Any) -> str:
    """A short description of a value for a message (never the repr of a huge int)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {list(value.shape)}"
    text = repr(value) if isinstance(value, (int, float, complex, str, bytes)) else ""
    if text and len(text) <= 40:
        return text
    return f"a {type(value).__name__}"


def _is_id(value: Any) -> bool:
    # Integers are torch's positions (negative ones are odd but harmless, as in torch); strings
    # are the FQNs of name-keyed state (DCP, FSDP). A bool equals 0 or 1 and hides one of them.
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _leaves(root: Any) -> Iterator[Any]:
    """Every value inside ``root`` that is not a dict, list or tuple (dict keys included),
    each container visited once: a reference cycle ends the walk instead of looping."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        value = stack.pop()
        if isinstance(value, (Mapping, list, tuple)):
            if id(value) in seen:
                continue
            seen.add(id(value))
            if isinstance(value, Mapping):
                stack.extend(value.keys())
                stack.extend(value.values())
            else:
                stack.extend(value)
        else:
            yield value


def huge_int(root: Any) -> int | None:
    """The first int inside ``root`` (through dicts, lists and tuples) that no float can hold
    (``10**400``: torch's arithmetic on it raises ``OverflowError``), else ``None``."""
    for value in _leaves(root):
        if isinstance(value, int) and not isinstance(value, bool):
            try:
                float(value)
            except OverflowError:
                return value
    return None


def _step_problem(step: Any) -> str | None:
    if isinstance(step, torch.Tensor):
        if step.layout != torch.strided or step.dtype not in _STEP_DTYPES or step.numel() != 1:
            return f"is {show_value(step)}"
        return None
    if isinstance(step, bool) or not isinstance(step, (int, float)):
        return f"is {show_value(step)}"
    return None


def _entry_problem(entry: Any, shaped: frozenset[str]) -> str | None:
    """What is wrong with one parameter's state, or ``None``."""
    if not isinstance(entry, Mapping):
        return f"is {show_value(entry)}, not a dict of state values"
    if "step" in entry:
        problem = _step_problem(entry["step"])
        if problem:
            return f"has a step that {problem}; a step is a number, or a real tensor of one element"
    for key, value in entry.items():
        if key in shaped and not isinstance(value, torch.Tensor):
            return f"has {key!r} = {show_value(value)}; torch keeps a tensor there"
    for value in _leaves(entry):
        if isinstance(value, torch.Tensor) and value.layout != torch.strided:
            layout = str(value.layout).removeprefix("torch.")
            return f"holds a {layout} tensor; optimizer state is dense"
    huge = huge_int(entry)
    if huge is not None:
        return f"holds {show_value(huge)}, too large for any float"
    return None


def validate_state_dict(state_dict: Any, *, where: str = "") -> None:
    """Refuse what has the shape of an optimizer state dict but is none that torch could write
    or any command could use, before anything walks it.

    torch's ``load_state_dict`` checks only the group count and sizes, and fails later, deep
    inside ``step``, on the rest. optckpt checks the rest up front:

    * ``param_groups`` is a list of dicts, each with a ``params`` list;
    * every ID (in ``params`` and as a ``state`` key) is an int or a str (the FQN of
      name-keyed state): not a bool, float, tensor, list or dict. Negative IDs, IDs listed
      twice, and IDs listed in two groups are kept, as torch keeps them (a bundled optimizer
      then refuses the last, as ``torch.optim`` does: that is incompatible, exit 4);
    * every parameter's state is a dict; its ``step``, when present, is a real number: a
      Python int or float, or a one-element tensor of a float or integer dtype (not bool,
      complex or float8); parameter-shaped keys (``exp_avg``, ...) hold tensors; every state
      tensor is dense;
    * no int anywhere (hyperparameters, ``param_names``, state) is too large for a float
      (``lr = 10**400``: torch raises ``OverflowError`` at the first step). Hyperparameters of
      other odd types (complex, NaN, nested dicts, strings) are kept: they are the saved
      values, inspect shows them, and an optimizer that cannot use them says so.

    These are inputs that cannot be read as an optimizer state dict, so the error is
    :class:`~optckpt.errors.UnreadableCheckpointError` (exit 3). Whether a valid state dict
    fits a given optimizer (group count and sizes, shapes) is :func:`check_groups`' question
    (:class:`~optckpt.errors.IncompatibleStateError`, exit 4).

    Args:
        state_dict: the candidate.
        where: its key path in the checkpoint, for the message.

    Raises:
        UnreadableCheckpointError: the first problem found, with where it is.
    """
    from optckpt.optim.specs import param_shaped_keys  # optckpt.optim imports this module

    at = f" at {where!r}" if where else ""

    def refuse(problem: str) -> UnreadableCheckpointError:
        return UnreadableCheckpointError(f"not a valid optimizer state dict{at}: {problem}")

    if not isinstance(state_dict, Mapping):
        raise refuse(f"it is {show_value(state_dict)}, not a dict")
    state, groups = state_dict.get("state"), state_dict.get("param_groups")
    if not isinstance(state, Mapping):
        raise refuse(f"'state' is {show_value(state)}, not a dict")
    if not isinstance(groups, (list, tuple)):
        raise refuse(f"'param_groups' is {show_value(groups)}, not a list")
    for index, group in enumerate(groups):
        if not isinstance(group, Mapping):
            raise refuse(f"param_groups[{index}] is {show_value(group)}, not a dict")
        params = group.get("params")
        if not isinstance(params, (list, tuple)):
            raise refuse(f"param_groups[{index}]['params'] is {show_value(params)}, not a list")
        for pid in params:
            if not _is_id(pid):
                raise refuse(
                    f"param_groups[{index}]['params'] lists {show_value(pid)}; "
                    "parameter IDs are integers or names"
                )
        huge = huge_int(group)
        if huge is not None:
            raise refuse(f"param_groups[{index}] holds {show_value(huge)}, too large for any float")
    shaped = param_shaped_keys()
    for pid, entry in state.items():
        if not _is_id(pid):
            raise refuse(
                f"'state' has the key {show_value(pid)}; parameter IDs are integers or names"
            )
        problem = _entry_problem(entry, shaped)
        if problem:
            raise refuse(
                f"the state of {'ID ' if isinstance(pid, int) else ''}{show_value(pid)} {problem}"
            )


def pack(param_groups: Sequence[Mapping[str, Any]], state: Mapping[Any, Any]) -> StateDict:
    """Build the state dict ``torch.optim.Optimizer.state_dict()`` returns.

    Each parameter gets an integer ID, its position in the concatenated ``params`` lists: a
    parameter listed in an earlier group keeps that group's ID, and one listed twice in the
    same group takes its later position. The running start index advances by the full length
    of every group's ``params``, so duplicates leave holes in the numbering.
    Every group key but ``params`` is copied (shallowly, as torch does); ``state`` is re-keyed
    by ID, and keys that are not tensors are kept as they are.

    Args:
        param_groups: the live groups, each with ``params`` holding tensors.
        state: per-parameter state keyed by the parameter tensors.

    Returns:
        ``{"state": {id: state}, "param_groups": [{..., "params": [id, ...]}]}``.

    Raises:
        IncompatibleStateError: ``state`` holds a tensor key that is in no group (torch raises
            ``KeyError`` there).
    """
    mapping: dict[int, int] = {}
    start = 0
    packed_groups = []
    for group in param_groups:
        packed = {k: v for k, v in group.items() if k != "params"}
        # torch builds each group's new IDs in one dict comprehension checked against the
        # earlier groups only: a parameter repeated *within* a group takes its last position,
        # one repeated in a *later* group keeps the ID of the earlier group.
        mapping.update(
            {id(p): i for i, p in enumerate(group["params"], start) if id(p) not in mapping}
        )
        packed["params"] = [mapping[id(p)] for p in group["params"]]
        start += len(packed["params"])
        packed_groups.append(packed)

    packed_state = {}
    for key, value in state.items():
        if isinstance(key, torch.Tensor):
            if id(key) not in mapping:
                raise IncompatibleStateError(
                    f"state holds a tensor of shape {list(key.shape)} that is in no param group"
                )
            key = mapping[id(key)]
        packed_state[key] = value
    return {"state": packed_state, "param_groups": packed_groups}


def _names(group: Mapping[str, Any]) -> list[str] | None:
    names = group.get("param_names")
    if isinstance(names, (list, tuple)) and len(names) == len(group["params"]):
        return [str(n) for n in names]
    return None


def _describe_size_mismatch(index: int, saved: Mapping[str, Any], live: Mapping[str, Any]) -> str:
    n_saved, n_live = len(saved["params"]), len(live["params"])
    text = f"param group {index} has {n_saved} parameters in the checkpoint but {n_live} in the optimizer"
    saved_names, live_names = _names(saved), _names(live)
    if saved_names is not None and live_names is not None:
        missing = [n for n in saved_names if n not in live_names]
        added = [n for n in live_names if n not in saved_names]
        parts = []
        if added:
            parts.append(
                "only in the optimizer: "
                + ", ".join(added[:5])
                + (" ..." if len(added) > 5 else "")
            )
        if missing:
            parts.append(
                "only in the checkpoint: "
                + ", ".join(missing[:5])
                + (" ..." if len(missing) > 5 else "")
            )
        if parts:
            text += " (" + "; ".join(parts) + ")"
    elif saved_names is not None or live_names is not None:
        which, names = (
            ("checkpoint", saved_names) if saved_names is not None else ("optimizer", live_names)
        )
        assert names is not None
        text += f" ({which} has " + ", ".join(names[:5]) + (" ..." if len(names) > 5 else "") + ")"
    return text


def check_groups(
    saved_groups: Sequence[Mapping[str, Any]], live_groups: Sequence[Mapping[str, Any]]
) -> None:
    """Check that saved groups fit the live ones, as ``load_state_dict`` does.

    Raises:
        GroupCountMismatchError: the number of groups differs.
        GroupSizeMismatchError: some group has a different number of ``params``; the message
            names every such group, both sizes and the parameter names where known.
    """
    if len(saved_groups) != len(live_groups):
        raise GroupCountMismatchError(
            f"the checkpoint has {len(saved_groups)} param groups but the optimizer has "
            f"{len(live_groups)}; {REMAP_HINT}"
        )
    problems = [
        _describe_size_mismatch(i, s, g)
        for i, (s, g) in enumerate(zip(saved_groups, live_groups))
        if len(s["params"]) != len(g["params"])
    ]
    if problems:
        raise GroupSizeMismatchError("; ".join(problems) + f"; {REMAP_HINT}")


def map_ids(
    saved_groups: Sequence[Mapping[str, Any]], live_groups: Sequence[Mapping[str, Any]]
) -> dict[Any, Any]:
    """Map saved IDs to live parameters by zipping the flattened ``params`` lists.

    Call :func:`check_groups` first. An ID listed twice maps to the later parameter, as in
    torch's ``dict(zip(...))``.
    """
    return dict(
        zip(
            chain.from_iterable(g["params"] for g in saved_groups),
            chain.from_iterable(g["params"] for g in live_groups),
        )
    )


def _step_placement(param_id: Any, saved_groups: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the first saved group listing ``param_id`` is ``fused`` or ``capturable``."""
    for group in saved_groups:
        if param_id in group["params"]:
            return bool(group.get("fused", False) or group.get("capturable", False))
    return False


def cast_value(
    param: torch.Tensor, value: torch.Tensor, *, key: Hashable, fused_or_capturable: bool
) -> torch.Tensor:
    """Cast one state tensor for ``param`` (torch's ``_process_value_according_to_param_policy``).

    ``step`` is left alone (https://github.com/pytorch/pytorch/issues/74424) unless the group
    is fused or capturable, where the kernels want it as float32 on the parameter's device.
    Other tensors take the parameter's dtype and device if the parameter is floating point,
    else only its device. Like ``Tensor.to``, a tensor that needs no change is returned as is.
    """
    if key == "step":
        if fused_or_capturable:
            return value.to(dtype=torch.float32, device=param.device)
        return value
    if param.is_floating_point():
        return value.to(dtype=param.dtype, device=param.device)
    return value.to(device=param.device)


def cast_tree(
    value: Any,
    cast: Callable[[torch.Tensor, tuple[Any, ...]], Any],
    path: tuple[Any, ...] = (),
) -> Any:
    """``value`` rebuilt with ``cast(tensor, path)`` in place of every tensor in it.

    The recursion of torch's ``load_state_dict`` (its inner ``_cast``), shared by every
    command that casts or moves state (:func:`cast_state`, ``move``, ``remap``): dicts are
    rebuilt with their keys, every other iterable with ``type(value)(...)``, anything else
    is kept. ``path`` holds the keys and indices from ``value`` down to the tensor; its last
    item is the dict key torch's policy reads (``step``), or an index for the item of a list,
    which torch casts with no key.

    Args:
        value: a state value, a state dict's ``state``, or a whole checkpoint tree.
        cast: what a tensor becomes, given it and its path under ``value``.
        path: the path of ``value`` itself (the paths given to ``cast`` start with it).
    """
    if isinstance(value, torch.Tensor):
        return cast(value, path)
    if isinstance(value, Mapping):
        return {k: cast_tree(v, cast, (*path, k)) for k, v in value.items()}
    # torch rebuilds every other iterable with ``type(value)(generator)``; that garbles str
    # and bytes and fails on namedtuples, so those are the two places optckpt differs.
    if isinstance(value, (str, bytes)):
        return value
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(cast_tree(v, cast, (*path, i)) for i, v in enumerate(value)))
    if isinstance(value, Iterable):
        items = (cast_tree(v, cast, (*path, i)) for i, v in enumerate(value))
        return type(value)(items)  # type: ignore[call-arg]
    return value


def key_of(path: tuple[Any, ...]) -> Hashable:
    """The key torch's casting policy sees for the tensor at ``path`` (see :func:`cast_tree`):
    the dict key it sits under; an index (the item of a list) is never ``step``."""
    return path[-1] if path else None


def cast_state(
    param: torch.Tensor,
    value: Any,
    *,
    param_id: Any,
    saved_groups: Sequence[Mapping[str, Any]],
) -> Any:
    """Cast a parameter's saved state to fit ``param``, recursing through dicts and iterables.

    Keys of nested dicts are passed down, so a ``step`` key at any depth is treated as a step;
    items of lists and tuples are cast with no key. Python numbers (such as ``step`` in
    checkpoints from torch < 1.12) are returned unchanged.

    Args:
        param: the live parameter the state belongs to.
        value: its saved state, usually ``{"step": ..., "exp_avg": ...}``.
        param_id: the saved ID, used to find the saved group's ``fused``/``capturable`` flags.
        saved_groups: the saved ``param_groups``.
    """
    placed = _step_placement(param_id, saved_groups)
    return cast_tree(
        value,
        lambda tensor, path: cast_value(
            param, tensor, key=key_of(path), fused_or_capturable=placed
        ),
    )


def unpack(
    state_dict: Mapping[str, Any], live_groups: Sequence[Mapping[str, Any]]
) -> tuple[defaultdict[Any, dict[Any, Any]], list[dict[str, Any]]]:
    """Apply a saved state dict to live groups, as ``Optimizer.load_state_dict`` does.

    Args:
        state_dict: a saved optimizer state dict.
        live_groups: the optimizer's groups, each with ``params`` holding tensors.

    Returns:
        ``(state, param_groups)``: the state keyed by live parameters (state under IDs that map
        to no parameter is kept under its ID, uncast), and deep copies of the saved groups with
        the live ``params``; the live ``param_names`` are kept only where the saved group has
        none.

    Raises:
        GroupCountMismatchError, GroupSizeMismatchError: see :func:`check_groups`.
    """
    saved_groups = copy.deepcopy(list(state_dict["param_groups"]))
    check_groups(saved_groups, live_groups)
    id_to_param = map_ids(saved_groups, live_groups)

    state: defaultdict[Any, dict[Any, Any]] = defaultdict(dict)
    for key, value in state_dict["state"].items():
        if key in id_to_param:
            param = id_to_param[key]
            state[param] = cast_state(
                param, value, param_id=key, saved_groups=state_dict["param_groups"]
            )
        else:
            state[key] = value

    groups = []
    for live, saved in zip(live_groups, saved_groups):
        saved["params"] = live["params"]
        if "param_names" in live and "param_names" not in saved:
            saved["param_names"] = live["param_names"]
        groups.append(saved)
    return state, groups


def param_ids(state_dict: Mapping[str, Any]) -> list[Any]:
    """Every ID listed in the groups, in order, each once."""
    return list(dict.fromkeys(chain.from_iterable(g["params"] for g in state_dict["param_groups"])))


def group_of(state_dict: Mapping[str, Any]) -> dict[Any, int]:
    """Map each ID to the index of the first group that lists it."""
    found: dict[Any, int] = {}
    for index, group in enumerate(state_dict["param_groups"]):
        for pid in group["params"]:
            found.setdefault(pid, index)
    return found


def names_of(state_dict: Mapping[str, Any]) -> dict[Any, str]:
    """Map IDs to names from the groups' ``param_names`` (empty where they are absent)."""
    names: dict[Any, str] = {}
    for group in state_dict["param_groups"]:
        group_names = _names(group)
        if group_names is not None:
            for pid, name in zip(group["params"], group_names):
                names.setdefault(pid, name)
    return names
