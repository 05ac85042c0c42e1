"""Finding optimizer state dicts inside nested checkpoints, by shape, named by key path.

A key path joins the keys from the root with dots: ``optimizer`` in ``{"model": ...,
"optimizer": ...}``, ``optimizer_states.0`` in a Lightning checkpoint, ``optimizer.pt`` in a
Trainer folder, and ``""`` for a bare state dict. Keys that contain dots themselves still
resolve: at each level the longest key that fits the path wins.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from optckpt.errors import NoOptimizerStateError, UnreadableCheckpointError, UsageError
from optckpt.statedict import StateDict, is_optimizer_state_dict, validate_state_dict


@dataclass(frozen=True)
class Located:
    """An optimizer state dict and where it sits in the checkpoint."""

    key: str
    state_dict: StateDict


def _join(prefix: str, key: object) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _walk(node: Any, prefix: str) -> Iterator[Located]:
    if is_optimizer_state_dict(node):
        yield Located(prefix, node)
    elif isinstance(node, Mapping):
        for key, value in node.items():
            yield from _walk(value, _join(prefix, key))
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            yield from _walk(value, _join(prefix, index))


def tensors_in(node: Any) -> Iterator[tuple[Any, torch.Tensor]]:
    """``(key, tensor)`` for every tensor of a tree (the key under which it sits, if any)."""
    stack: list[tuple[Any, Any]] = [(None, node)]
    while stack:
        key, value = stack.pop()
        if isinstance(value, torch.Tensor):
            yield key, value
        elif isinstance(value, Mapping):
            stack.extend(value.items())
        elif isinstance(value, (list, tuple)):
            stack.extend((key, v) for v in value)


def locate_optimizers(root: Any) -> list[Located]:
    """Every optimizer state dict in ``root``, in the order the checkpoint holds them."""
    return list(_walk(root, ""))


def _children(node: Any) -> list[tuple[str, Any]]:
    if isinstance(node, Mapping):
        return [(str(k), v) for k, v in node.items()]
    if isinstance(node, (list, tuple)):
        return [(str(i), v) for i, v in enumerate(node)]
    return []


def resolve(root: Any, key: str) -> Any:
    """The object at key path ``key`` (``""`` is the root).

    Raises:
        KeyError: nothing is at that path.
    """
    node, rest = root, key
    while rest:
        fits = [(k, v) for k, v in _children(node) if rest == k or rest.startswith(k + ".")]
        if not fits:
            raise KeyError(key)
        k, node = max(fits, key=lambda kv: len(kv[0]))
        rest = rest[len(k) + 1 :]
    return node


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
        node = resolve(root, key)
    except KeyError:
        raise UsageError(
            f"--key {key!r}: no such key; optimizer state dicts are at: {listed}"
        ) from None
    if not is_optimizer_state_dict(node):
        raise UsageError(f"--key {key!r} is not an optimizer state dict; they are at: {listed}")
    validate_state_dict(node, where=key)
    return [Located(key, node)]
