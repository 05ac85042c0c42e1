"""From DCP's flat keys back to a checkpoint tree, with every optimizer name-keyed.

``dcp.save`` flattens the state dict it is given (``flatten_state_dict``): nested dicts and
lists become dotted keys (``optim.param_groups.0.lr``), and ``planner_data`` records each
key's path (``('optim', 'param_groups', 0, 'lr')``). Where it is present the tree is rebuilt
from the paths exactly, as ``dcp_to_torch_save`` does; where it is not (torch before it was
recorded), each key is split at its first dot (``model`` / ``0.weight``).

An optimizer comes out as the name-keyed state dict ``get_optimizer_state_dict`` returns
(``state`` keyed by FQN, ``params`` listing FQNs: DESIGN.md, "Names"), whichever flattening
it was saved with:

* the default: ``optim.state.<fqn>.<key>`` and ``optim.param_groups.<i>.<hyperparameter>``,
  with ``optim.param_groups.<i>.params`` listing the FQNs. With ``planner_data`` this is the
  tree itself; without it the FQN of a state key is the longest FQN the groups list that
  starts it;
* ``flatten_optimizer_state_dict=True``: ``optim.state.<fqn>.<key>`` and
  ``optim.param_groups.<fqn>.<hyperparameter>`` for every parameter, no ``params`` lists.
  Parameters with equal hyperparameters form one group, in order of first appearance (as
  torch's ``_unflatten_optim_state_dict`` regroups them, but without the live optimizer
  torch reads the groups from: two groups saved with the same hyperparameters become one).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from optckpt.described import DescribedTensor, is_tensor
from optckpt.errors import UnreadableCheckpointError
from optckpt.optim.specs import SPECS

_DEFAULT_PARAMS = re.compile(r"param_groups\.(\d+)\.params")
_STATE_KEYS = frozenset(k.name for spec in SPECS.values() for k in spec.state)


def build_tree(
    where: str,
    keys: list[str],
    paths: Mapping[str, tuple[str | int, ...]] | None,
    value: Callable[[str], Any],
) -> dict[str, Any]:
    """The checkpoint tree of a DCP folder's flat ``keys``.

    Args:
        where: how messages name the folder.
        keys: every flat key, in the order of ``.metadata``.
        paths: ``planner_data`` (each key's path), or ``None``.
        value: the value of a flat key (read, or a placeholder).

    Raises:
        UnreadableCheckpointError: two keys whose paths collide (one inside the other's
            value), or list indices that do not count from 0.
    """
    root: dict[Any, Any] = {}
    for key in keys:
        path = paths[key] if paths is not None else _split_first(key)
        node = root
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict) or _is_leaf(child):
                raise UnreadableCheckpointError(
                    f"{where}: key {key} lies inside the value of {_joined(path[: i + 1])}"
                )
            node = child
        if path[-1] in node:
            raise UnreadableCheckpointError(f"{where}: two keys for {_joined(path)}")
        node[path[-1]] = _Leaf(value(key))
    finished: dict[str, Any] = _finish(where, root, "")
    return finished


class _Leaf:
    """A value while the tree is built (so that a dict value is not taken for a branch)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def _is_leaf(node: Any) -> bool:
    return isinstance(node, _Leaf)


def _split_first(key: str) -> tuple[str, ...]:
    head, dot, rest = key.partition(".")
    return (head, rest) if dot else (head,)


def _joined(path: tuple[Any, ...]) -> str:
    return ".".join(map(str, path))


def _finish(where: str, node: Any, at: str) -> Any:
    """Unwrap leaves, turn int-keyed branches into lists and flat optimizers into trees."""
    if isinstance(node, _Leaf):
        return node.value
    done = {k: _finish(where, v, f"{at}.{k}" if at else str(k)) for k, v in node.items()}
    if done and all(type(k) is int for k in done):
        if sorted(done) != list(range(len(done))):
            raise UnreadableCheckpointError(
                f"{where}: the list at {at or 'the top level'} has indices {sorted(done)}"
            )
        return [done[i] for i in range(len(done))]
    if done and all(isinstance(k, str) and k.startswith(("state.", "param_groups.")) for k in done):
        return unflatten_optimizer(where, at, done)
    return _int_ids(done)


def _int_ids(node: dict[Any, Any]) -> dict[Any, Any]:
    """An ID-keyed optimizer saved as it is (``dcp.save({"optim": opt.state_dict()})``) with
    its ``state`` keys back to the ints its ``params`` list: DCP's flattening made them
    strings (``optim.state.0.exp_avg``), as ``dcp_to_torch_save`` leaves them."""
    state, groups = node.get("state"), node.get("param_groups")
    if not (isinstance(state, dict) and isinstance(groups, list)):
        return node
    ids = {str(p): p for g in groups if isinstance(g, dict) for p in g.get("params", ())}
    if not ids or not all(type(p) is int for p in ids.values()):
        return node
    if all(isinstance(k, str) and k in ids for k in state):
        node["state"] = {ids[k]: v for k, v in state.items()}
    return node


def unflatten_optimizer(where: str, at: str, flat: Mapping[str, Any]) -> dict[str, Any]:
    """The name-keyed optimizer state dict of a flat one (either flattening; module doc)."""
    default = {int(m.group(1)) for k in flat if (m := _DEFAULT_PARAMS.fullmatch(k))}
    groups: list[dict[str, Any]]
    if default:
        groups = _default_groups(where, at, flat, sorted(default))
    else:
        groups = _flattened_groups(where, at, flat)
    fqns = sorted({p for g in groups for p in g["params"]}, key=len, reverse=True)
    state: dict[str, Any] = {}
    for key, value in flat.items():
        if not key.startswith("state."):
            continue
        fqn, path = _split_state(key[len("state.") :], fqns)
        node = state.setdefault(fqn, {})
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UnreadableCheckpointError(f"{where}: {at}.{key} lies inside another value")
        node[path[-1]] = value
    return {"state": state, "param_groups": groups}


def _default_groups(
    where: str, at: str, flat: Mapping[str, Any], indices: list[int]
) -> list[dict[str, Any]]:
    if indices != list(range(len(indices))):
        raise UnreadableCheckpointError(f"{where}: {at} has param groups {indices}")
    groups: list[dict[str, Any]] = [{} for _ in indices]
    for key, value in flat.items():
        if not key.startswith("param_groups."):
            continue
        index, dot, hyper = key[len("param_groups.") :].partition(".")
        if not (index.isdigit() and dot and int(index) < len(groups)):
            raise UnreadableCheckpointError(f"{where}: {at}.{key} belongs to no param group")
        groups[int(index)][hyper] = value
    for i, group in enumerate(groups):
        params = group.pop("params")
        if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
            raise UnreadableCheckpointError(
                f"{where}: {at}.param_groups.{i}.params is not a list of parameter names"
            )
        group["params"] = params
    return groups


def _flattened_groups(where: str, at: str, flat: Mapping[str, Any]) -> list[dict[str, Any]]:
    hypers: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        if key.startswith("param_groups."):
            fqn, dot, name = key[len("param_groups.") :].rpartition(".")
            if not dot or not fqn:
                raise UnreadableCheckpointError(f"{where}: {at}.{key} names no parameter")
            hypers.setdefault(fqn, {})[name] = value
    groups: list[dict[str, Any]] = []
    for fqn, hyper in hypers.items():
        group = next((g for g in groups if _same(g, hyper)), None)
        if group is None:
            groups.append({**hyper, "params": [fqn]})
        else:
            group["params"].append(fqn)
    return groups


def _same(group: Mapping[str, Any], hyper: Mapping[str, Any]) -> bool:
    """Whether a parameter's hyperparameters are those of ``group``."""
    if set(group) - {"params"} != set(hyper):
        return False
    return all(_equal(group[k], v) for k, v in hyper.items())


def _equal(a: Any, b: Any) -> bool:
    if is_tensor(a) or is_tensor(b):
        if not (is_tensor(a) and is_tensor(b)):
            return False
        if isinstance(a, DescribedTensor) or isinstance(b, DescribedTensor):
            # read without torch (optckpt.io.dcp.describe): only 0-dim tensors are read, as
            # "meta" mode reads them; torch.equal of two 0-dim tensors compares their items
            return (
                isinstance(a, DescribedTensor)
                and isinstance(b, DescribedTensor)
                and a.dim() == b.dim() == 0
                and a.dtype == b.dtype
                and a.item() == b.item()
            )
        import torch

        return (
            a.device.type != "meta"
            and b.device.type != "meta"
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(torch.equal(a, b))
        )
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))
    return type(a) is type(b) and bool(a == b)


def _split_state(rest: str, fqns: list[str]) -> tuple[str, list[str]]:
    """``<fqn>.<key>[.<nested key>...]`` into the FQN and the key path.

    The FQN is the longest one the groups list that starts ``rest`` (``fqns`` is sorted
    longest first); for state of a parameter in no group, the first state key any torch
    optimizer declares (``optckpt.optim.specs``), else the last component.
    """
    for fqn in fqns:
        if rest.startswith(fqn + "."):
            return fqn, rest[len(fqn) + 1 :].split(".")
    parts = rest.split(".")
    for i in range(1, len(parts)):
        if parts[i] in _STATE_KEYS:
            return ".".join(parts[:i]), parts[i:]
    head, _, last = rest.rpartition(".")
    return (head, [last]) if head else (rest, ["<value>"])
