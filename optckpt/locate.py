"""Finding optimizer state dicts inside nested checkpoints, by shape, named by key path.

A key path joins the keys from the root with dots: ``optimizer`` in ``{"model": ...,
"optimizer": ...}``, ``optimizer_states.0`` in a Lightning checkpoint, ``optimizer.pt`` in a
Trainer folder, and ``""`` for a bare state dict. Keys that contain dots themselves still
resolve: at each level the longest key that fits the path wins.

That text names what users type (``--key``); inside optckpt a place in a tree is a
:data:`KeyPath`, the tuple of the keys themselves (``("optimizer", "state", 0, "exp_avg")``),
which tells ``{0: ...}`` from ``{"0": ...}`` and ``{"a.b": ...}`` from ``{"a": {"b": ...}}``:
saved devices (:attr:`optckpt.io.Checkpoint.placement`) are keyed by it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

from optckpt.described import is_tensor
from optckpt.errors import NoOptimizerStateError, UnreadableCheckpointError, UsageError
from optckpt.statedict import StateDict, is_optimizer_state_dict, validate_state_dict

if TYPE_CHECKING:
    import torch

KeyPath: TypeAlias = tuple[Any, ...]
"""The keys (and list indices) from a tree's root down to one of its values; ``()``: the root."""
_L = TypeVar("_L")  # what a tree walk labels each tensor with


@dataclass(frozen=True)
class Located:
    """An optimizer state dict and where it sits in the checkpoint: ``key`` as users write it,
    ``path`` the :data:`KeyPath` itself."""

    key: str
    state_dict: StateDict
    path: KeyPath = ()


def _join(prefix: str, key: object) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _walk(node: Any, prefix: str, path: KeyPath) -> Iterator[Located]:
    if is_optimizer_state_dict(node):
        yield Located(prefix, node, path)
    elif isinstance(node, Mapping):
        for key, value in node.items():
            yield from _walk(value, _join(prefix, key), (*path, key))
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            yield from _walk(value, _join(prefix, index), (*path, index))


def tensor_paths(node: Any, prefix: KeyPath = ()) -> Iterator[tuple[KeyPath, torch.Tensor]]:
    """``(key path, tensor)`` for every tensor of a tree, in the tree's order (dicts by their
    keys, lists and tuples by index); ``prefix`` is the path of ``node`` itself."""

    def children(path: KeyPath, value: Any) -> Iterable[tuple[KeyPath, Any]]:
        items: Iterable[tuple[Any, Any]] = (
            value.items() if isinstance(value, Mapping) else enumerate(value)
        )
        pairs: list[tuple[KeyPath, Any]] = [((*path, k), v) for k, v in items]
        return pairs[::-1]  # popped in the tree's order

    return _depth_first(prefix, node, children)


def tensors_in(node: Any) -> Iterator[tuple[Any, torch.Tensor]]:
    """``(key, tensor)`` for every tensor of a tree (the key under which it sits, if any)."""

    def children(key: Any, value: Any) -> Iterable[tuple[Any, Any]]:
        items: Iterable[tuple[Any, Any]] = (
            value.items() if isinstance(value, Mapping) else ((key, v) for v in value)
        )
        return items

    return _depth_first(None, node, children)


def _depth_first(
    label: _L, node: Any, children: Callable[[_L, Any], Iterable[tuple[_L, Any]]]
) -> Iterator[tuple[_L, torch.Tensor]]:
    """``(label, tensor)`` for every tensor under ``node``, without recursion (a tree may be
    deeper than Python's stack); ``children`` labels the entries of a dict, list or tuple."""
    stack: list[tuple[_L, Any]] = [(label, node)]
    while stack:
        label, value = stack.pop()
        if is_tensor(value):
            yield label, value
        elif isinstance(value, (Mapping, list, tuple)):
            stack.extend(children(label, value))


def locate_optimizers(root: Any) -> list[Located]:
    """Every optimizer state dict in ``root``, in the order the checkpoint holds them."""
    return list(_walk(root, "", ()))


def keyed_optimizers(root: Any) -> list[tuple[str, StateDict]]:
    """``(key, state dict)`` for every optimizer state dict in ``root``, in order: the
    optimizers a companion may drive (:mod:`optckpt.companions`)."""
    return [(found.key, found.state_dict) for found in locate_optimizers(root)]


def _children(node: Any) -> list[tuple[str, Any]]:
    return [(str(k), v) for k, _, v in _keyed_children(node)]


def _keyed_children(node: Any) -> list[tuple[str, Any, Any]]:
    """``(key as text, key, child)`` for each child of a dict, list or tuple."""
    if isinstance(node, Mapping):
        return [(str(k), k, v) for k, v in node.items()]
    if isinstance(node, (list, tuple)):
        return [(str(i), i, v) for i, v in enumerate(node)]
    return []


def _resolve(root: Any, key: str) -> tuple[KeyPath, Any]:
    node, rest = root, key
    path: KeyPath = ()
    while rest:
        fits = [c for c in _keyed_children(node) if rest == c[0] or rest.startswith(c[0] + ".")]
        if not fits:
            raise KeyError(key)
        text, k, node = max(fits, key=lambda c: len(c[0]))
        path = (*path, k)
        rest = rest[len(text) + 1 :]
    return path, node


def value_at(root: Any, path: KeyPath, default: Any = None) -> Any:
    """The value at key path ``path`` of ``root``, or ``default`` where there is none."""
    node = root
    for key in path:
        if isinstance(node, Mapping):
            if key not in node:
                return default
            node = node[key]
        elif isinstance(node, (list, tuple)) and isinstance(key, int) and 0 <= key < len(node):
            node = node[key]
        else:
            return default
    return node


def resolve(root: Any, key: str) -> Any:
    """The object at key path ``key`` (``""`` is the root).

    Raises:
        KeyError: nothing is at that path.
    """
    return _resolve(root, key)[1]


def _near_miss(node: Any, prefix: str) -> str | None:
    """Why the first dict under ``node`` that has both ``state`` and ``param_groups`` is no
    optimizer state dict (``None`` when there is none)."""
    if isinstance(node, Mapping) and "state" in node and "param_groups" in node:
        try:
            validate_state_dict(node, where=prefix)
        except UnreadableCheckpointError as e:
            return str(e)
        return None
    for key, value in _children(node):
        found = _near_miss(value, _join(prefix, key))
        if found:
            return found
    return None


def check_optimizers(root: Any) -> list[Located]:
    """Every optimizer state dict in ``root``, each validated; none found is no error.

    For commands that carry a whole checkpoint over (convert): a dict with ``state`` and
    ``param_groups`` that is not a valid optimizer state dict is refused as it would be by
    any command that reads the optimizer, not written on as if it were plain data.

    Raises:
        UnreadableCheckpointError: a state dict, or a dict that has both keys, that is not
            a valid one (see :func:`~optckpt.statedict.validate_state_dict`).
    """
    found = locate_optimizers(root)
    for located in found:
        validate_state_dict(located.state_dict, where=located.key)
    why = _near_miss(root, "")
    if why:
        raise UnreadableCheckpointError(why)
    return found


def select_optimizers(root: Any, key: str | None) -> list[Located]:
    """The optimizer state dict at ``key``, or every one in ``root`` when ``key`` is ``None``.

    Every one returned has passed :func:`~optckpt.statedict.validate_state_dict`, so commands
    may walk it without meeting unhashable IDs, a complex ``step`` or an int no float holds.

    Raises:
        UsageError: ``key`` names nothing, or something that is not an optimizer state dict;
            the message lists the key paths that hold one.
        NoOptimizerStateError: ``key`` is ``None`` and ``root`` holds no optimizer state dict
            (the message says why a dict with ``state`` and ``param_groups`` is none).
        UnreadableCheckpointError: a state dict found is not a valid one (see
            :func:`~optckpt.statedict.validate_state_dict`).
    """
    found = locate_optimizers(root)
    if key is None:
        if not found:
            top = ", ".join(str(k) for k, _ in _children(root)[:12]) or "none"
            why = _near_miss(root, "")
            raise NoOptimizerStateError(
                f"no optimizer state dict found (top-level keys: {top})"
                + (f"; {why}" if why else "")
            )
        for located in found:
            validate_state_dict(located.state_dict, where=located.key)
        return found
    listed = ", ".join(repr(f.key) for f in found) or "none"
    try:
        path, node = _resolve(root, key)
    except KeyError:
        raise UsageError(
            f"--key {key!r}: no such key; optimizer state dicts are at: {listed}"
        ) from None
    if not is_optimizer_state_dict(node):
        raise UsageError(f"--key {key!r} is not an optimizer state dict; they are at: {listed}")
    validate_state_dict(node, where=key)
    return [Located(key, node, path)]


def select_one(root: Any, key: str | None) -> Located:
    """The one optimizer state dict a command that takes one works on (remap, resume-step):
    the one at ``key``, or the only one in ``root``.

    Raises:
        UsageError: ``key`` is ``None`` and ``root`` holds several (they are listed), or as
            :func:`select_optimizers` raises.
        NoOptimizerStateError, UnreadableCheckpointError: as :func:`select_optimizers` raises.
    """
    found = select_optimizers(root, key)
    if len(found) > 1:
        listed = ", ".join(repr(f.key) for f in found)
        raise UsageError(
            f"the checkpoint holds several optimizer state dicts ({listed}); pick one with --key"
        )
    return found[0]
