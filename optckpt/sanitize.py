"""Plain types for what makes an old checkpoint fail ``torch.load(weights_only=True)``.

Training scripts used to save numpy values (a best accuracy as ``numpy.float64``, a history
as an ``ndarray``), their ``argparse.Namespace`` and ``pathlib`` paths next to the weights.
torch's weights-only unpickler refuses all of them, so such a checkpoint needs an allow-list
(``--allow-global``) to be read at all. :func:`sanitize_tree` rewrites them into what it
loads without one:

* a numpy scalar → the Python number (``bool``, ``int``, ``float``, ``complex``) or ``str``
  its ``.item()`` gives;
* a numpy array → a tensor of the same dtype, shape and values (``torch.from_numpy``), or,
  where torch has no such dtype (strings, objects), the nested lists ``.tolist()`` gives,
  themselves sanitized;
* an ``argparse.Namespace`` → the dict of its attributes;
* a ``pathlib`` path → its ``str``.

Everything else is kept as it is (the same objects). Each rewrite is listed with its key path.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any


@dataclass(frozen=True)
class Sanitized:
    """One value rewritten: where (key path as users write it), from what type, into what."""

    key: str
    was: str
    now: str

    def to_json(self) -> dict[str, str]:
        """``{"key", "from", "to"}``."""
        return {"key": self.key, "from": self.was, "to": self.now}


def _type_name(value: object) -> str:
    kind = type(value)
    module = kind.__module__.replace("numpy._core", "numpy").replace("numpy.core", "numpy")
    return f"{module}.{kind.__qualname__}"


def _is_numpy(value: object) -> bool:
    return type(value).__module__.split(".")[0] == "numpy"


def _array(value: Any) -> Any:
    """A tensor for a numpy array torch has a dtype for, else ``None``."""
    import torch  # only when there is an array to convert

    try:
        return torch.from_numpy(value.copy())  # its own memory, not the unpickled buffer's
    except TypeError:  # a dtype torch lacks: strings, objects
        return None


def _join(prefix: str, key: object) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _clean(value: Any, where: str, found: list[Sanitized]) -> Any:
    if isinstance(value, argparse.Namespace):
        found.append(Sanitized(where, "argparse.Namespace", "dict"))
        return {k: _clean(v, _join(where, k), found) for k, v in vars(value).items()}
    if isinstance(value, PurePath):
        found.append(Sanitized(where, _type_name(value), "str"))
        return str(value)
    if _is_numpy(value):
        import numpy  # the checkpoint holds numpy values: numpy is there

        if isinstance(value, numpy.generic):
            plain = value.item()
            found.append(Sanitized(where, _type_name(value), type(plain).__name__))
            return plain
        if not isinstance(value, numpy.ndarray):
            return value
        tensor = _array(value)
        if tensor is not None:
            found.append(Sanitized(where, f"numpy.ndarray[{value.dtype}]", "torch.Tensor"))
            return tensor
        found.append(Sanitized(where, f"numpy.ndarray[{value.dtype}]", "list"))
        return _clean(value.tolist(), where, found)
    if isinstance(value, Mapping):
        items = [(k, _clean(v, _join(where, k), found)) for k, v in value.items()]
        if all(new is value[k] for k, new in items):
            return value
        if not isinstance(value, MutableMapping):
            return dict(items)
        # A copy of its own type, attributes and all (an OrderedDict's _metadata, which
        # Module.load_state_dict reads), holding the new values.
        rebuilt = copy.copy(value)
        rebuilt.clear()
        rebuilt.update(dict(items))
        return rebuilt
    if isinstance(value, (list, tuple)):
        cleaned = [_clean(v, _join(where, i), found) for i, v in enumerate(value)]
        if all(new is old for new, old in zip(cleaned, value)):
            return value
        return tuple(cleaned) if isinstance(value, tuple) else cleaned
    return value


def sanitize_tree(root: Any) -> tuple[Any, list[Sanitized]]:
    """``root`` with numpy values, Namespaces and paths made plain (see the module doc).

    Returns:
        ``(new_root, rewrites)``: containers on the way to a rewritten value are new copies
        of their own type (an ``OrderedDict`` keeps its ``_metadata``); everything else is
        the input's own objects; the input is not changed.
    """
    found: list[Sanitized] = []
    return _clean(root, "", found), found
