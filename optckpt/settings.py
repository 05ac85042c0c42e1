"""``--set`` hyperparameter settings: ``KEY=VALUE`` or ``GROUP.KEY=VALUE``, parsed to a :class:`Setting`.

``regenerate --set`` and ``remap --set`` both take them; values are JSON where they parse
(Python's ``True``/``None``/``nan`` too) and tuples where they have top-level commas. Applying
them to the groups is :mod:`optckpt.regenerate` (and :mod:`optckpt.remap_hyperparams`);
:mod:`optckpt.regenerate` re-exports these names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from optckpt.errors import UsageError
from optckpt.layout import split_top_level

__all__ = ["Setting", "parse_setting"]


@dataclass(frozen=True)
class Setting:
    """One ``--set``: ``key=value`` for every group (``group is None``) or for one group."""

    group: int | None
    key: str
    value: Any


def _value(text: str) -> Any:
    """A JSON value where ``text`` parses as one (numbers, ``true``, lists); Python's
    ``True``/``False``/``None`` and ``nan``/``inf`` too; a string otherwise."""
    python = {"True": True, "False": False, "None": None}
    if text.strip() in python:
        return python[text.strip()]
    if text.strip().lower() in ("nan", "inf", "+inf", "-inf", "infinity", "-infinity"):
        return float(text)
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return text
    return tuple(value) if isinstance(value, list) else value


def _parenthesized(text: str) -> bool:
    """Whether ``text`` is one ``( ... )`` whose opening parenthesis closes at the end."""
    if not (text.startswith("(") and text.endswith(")")):
        return False
    depth = 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return i == len(text) - 1
    return False


def parse_setting(text: str) -> Setting:
    """Parse ``--set``: ``KEY=VALUE`` or ``GROUP.KEY=VALUE``.

    A value with top-level commas is a tuple (``betas=0.9,0.95``, also ``(0.9,0.95)`` and
    ``[0.9,0.95]``); items and values are JSON where they parse.

    Raises:
        UsageError: no ``=``, or an empty key.
    """
    target, eq, raw = text.partition("=")
    target = target.strip()
    if not eq or not target:
        raise UsageError(f"--set {text!r}: expected KEY=VALUE or GROUP.KEY=VALUE")
    group: int | None = None
    head, dot, rest = target.partition(".")
    if dot and head.isdigit():
        group, target = int(head), rest
    if not target.isidentifier():
        raise UsageError(f"--set {text!r}: {target!r} is not a hyperparameter name")
    if _parenthesized(raw.strip()):  # Python's spelling: (0.9,0.95) is a tuple, (1) is 1
        inner = raw.strip()[1:-1]
        raw = f"[{inner}]" if len(split_top_level(inner)) > 1 else inner
    items = split_top_level(raw)
    value = tuple(_value(i) for i in items) if len(items) > 1 else _value(raw)
    return Setting(group, target, value)
