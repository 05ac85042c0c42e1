"""torch's optimizer state-dict rules, reimplemented as pure functions.

The reference is ``torch/optim/optimizer.py`` (``Optimizer.state_dict`` and
``Optimizer.load_state_dict``) of the installed torch; ``tests/test_statedict.py`` checks
these functions against it on random layouts.

* :func:`pack` is ``Optimizer.state_dict()``: parameters become integer IDs.
* :func:`check_groups`, :func:`map_ids` and :func:`cast_state` are the steps of
  ``load_state_dict``; :func:`unpack` runs them in torch's order.
* :func:`validate_state_dict` (in :mod:`optckpt.validate`, re-exported here) refuses,
  before anything walks it, what has the shape of a state dict but that no optimizer could
  use (``params`` holding lists, a complex ``step``, ``lr = 10**400``, ...).

None of these functions mutate their arguments. Like torch, they do not copy tensors that
need no cast: the unpacked state may share tensors with the state dict it came from.
"""

from __future__ import annotations

import copy
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from itertools import chain
from typing import TYPE_CHECKING, Any

from optckpt.described import is_tensor
from optckpt.errors import (
    GroupCountMismatchError,
    GroupSizeMismatchError,
    IncompatibleStateError,
)

# Re-exported: the state-dict checks live in optckpt.validate; callers import them from here.
from optckpt.validate import huge_int as huge_int
from optckpt.validate import is_optimizer_state_dict as is_optimizer_state_dict
from optckpt.validate import show_value as show_value
from optckpt.validate import validate_state_dict as validate_state_dict

if TYPE_CHECKING:
    import torch

StateDict = dict[str, Any]
"""An ``Optimizer.state_dict()``: ``{"state": {id: {key: value}}, "param_groups": [...]}``."""

REMAP_HINT = (
    "run `optckpt remap CHECKPOINT --to NEW_LAYOUT --dry-run` to carry the state over by name"
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
        if is_tensor(key):
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
            import torch

            return value.to(dtype=torch.float32, device=param.device)
        return value
    if param.is_floating_point():
        return value.to(dtype=param.dtype, device=param.device)
    return value.to(device=param.device)


def cast_tree(
    value: Any,
    cast: Callable[[torch.Tensor, tuple[Any, ...]], Any],
    path: tuple[Any, ...] = (),
    *,
    keep_types: bool = False,
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
        keep_types: rebuild an ``OrderedDict`` as one, with its attributes (a model state
            dict's ``_metadata``, which ``Module.load_state_dict`` reads), where torch's
            ``_cast`` makes a plain dict: for a whole checkpoint tree, not optimizer state.
    """
    if is_tensor(value):
        return cast(value, path)
    if isinstance(value, Mapping):
        items = {k: cast_tree(v, cast, (*path, k), keep_types=keep_types) for k, v in value.items()}
        return same_mapping(value, items) if keep_types else items
    # torch rebuilds every other iterable with ``type(value)(generator)``; that garbles str
    # and bytes and fails on namedtuples, so those are the two places optckpt differs.
    if isinstance(value, (str, bytes)):
        return value
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(
            *(cast_tree(v, cast, (*path, i), keep_types=keep_types) for i, v in enumerate(value))
        )
    if isinstance(value, Iterable):
        each = (cast_tree(v, cast, (*path, i), keep_types=keep_types) for i, v in enumerate(value))
        return type(value)(each)  # type: ignore[call-arg]
    return value


def same_mapping(original: Mapping[Any, Any], items: dict[Any, Any]) -> dict[Any, Any]:
    """``items`` as the kind of mapping ``original`` is: an ``OrderedDict`` with
    ``original``'s attributes (``_metadata``, shared, not copied) for one, else a dict."""
    if not isinstance(original, OrderedDict):
        return items
    rebuilt = OrderedDict(items)
    rebuilt.__dict__.update(vars(original))
    return rebuilt


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
