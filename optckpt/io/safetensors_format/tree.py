"""The ``optckpt.tree`` metadata: a checkpoint tree encoded as tagged JSON, and decoded back.

Decoding checks every tag (:class:`_TreeDecoder`); ``optckpt.devices`` is checked here too.
"""

from __future__ import annotations

import json
import math
import sys
from collections import OrderedDict
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optckpt.described import DType, is_tensor, layout_name
from optckpt.errors import UnreadableCheckpointError, UsageError
from optckpt.io.outfile import is_deferred
from optckpt.io.safetensors_format.header import _kind, _show, corrupt_json, safetensors_dtype
from optckpt.locate import KeyPath, tensor_paths
from optckpt.statedict import is_optimizer_state_dict, names_of

if TYPE_CHECKING:
    import torch

    from optckpt.io.torch_format import Deferred

TREE_KEY = "optckpt.tree"
DEVICES_KEY = "optckpt.devices"
VERSION_KEY = "optckpt.version"
VERSION = "1"

# Nesting of the optckpt.tree JSON. A checkpoint is a few levels deep; decoding takes up to
# three Python frames a level, and this bound keeps them well inside the interpreter's 1000.
_MAX_DEPTH = 100


class _CorruptTree(Exception):
    """A value in ``optckpt.tree`` or ``optckpt.devices`` that optckpt never writes."""


class _TreeDecoder:
    """Rebuilds the checkpoint tree from its JSON, checking every tag.

    A tag decodes only to a value of its own kind: ``__dtype__`` to a ``torch.dtype`` by its
    name, ``__device__`` to a device of a known type, ``__float__`` to a float from its repr,
    ``__tensor__`` to a tensor of this file, ``__tuple__`` and ``__dict__`` from lists,
    ``__odict__`` to an ``OrderedDict`` with its attributes (string names, none of them
    ``__dunder__``: what ``torch.load(weights_only=True)`` sets on one). A dict
    key that starts with ``__`` outside a tag is never written (the writer puts such dicts in
    ``__dict__``), so it is refused too. The key path being decoded is kept as a stack and
    spelled out only in an error message.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.where: list[Any] = []
        self.placed: list[tuple[KeyPath, str]] = []  # (key path, tensor name) of each tensor

    def corrupt(self, reason: str) -> _CorruptTree:
        at = ".".join(
            str(k) if isinstance(k, (str, int, float)) else f"<{type(k).__name__}>"
            for k in self.where
        )
        return _CorruptTree(f"{reason} at {_show(at) if at else 'the top'}")

    def decode(self, node: Any) -> Any:
        if len(self.where) > _MAX_DEPTH:
            raise self.corrupt(f"nested more than {_MAX_DEPTH} levels deep")
        if isinstance(node, list):
            return self.items(node)
        if not isinstance(node, dict):
            return node  # str, int, float, bool, None: JSON has nothing else
        tags = [k for k in node if k.startswith("__")]
        if tags:
            if len(node) > 1 or tags[0] not in _TAGS:
                raise self.corrupt(f"unknown tag {_show(tags[0])}")
            ((tag, value),) = node.items()
            return _TAGS[tag](self, value)
        out = {}
        self.where.append(None)  # loops, not comprehensions: fewer frames a level
        for key, child in node.items():
            self.where[-1] = key
            out[key] = self.decode(child)
        self.where.pop()
        return out

    def items(self, nodes: list[Any]) -> list[Any]:
        out = []
        self.where.append(0)
        for i, child in enumerate(nodes):
            self.where[-1] = i
            out.append(self.decode(child))
        self.where.pop()
        return out

    def as_tensor(self, value: Any) -> torch.Tensor:
        if not isinstance(value, str) or value not in self.tensors:
            raise self.corrupt(f"__tensor__ {_show(value)} names no tensor of the file")
        self.placed.append((tuple(self.where), value))
        return self.tensors[value]

    def as_tuple(self, value: Any) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise self.corrupt(f"__tuple__ holds {_kind(value)}, not a list")
        return tuple(self.items(value))

    def as_dict(self, value: Any) -> dict[Any, Any]:
        if not isinstance(value, list) or not all(
            isinstance(pair, list) and len(pair) == 2 for pair in value
        ):
            raise self.corrupt("__dict__ is not a list of [key, value] pairs")
        out = {}
        self.where.append("<key>")
        for k, v in value:
            self.where[-1] = "<key>"
            key = self.decode(k)
            try:
                hash(key)
            except TypeError:
                raise self.corrupt(f"__dict__ has a key {_show(k)} of no hashable kind") from None
            self.where[-1] = key
            out[key] = self.decode(v)
        self.where.pop()
        return out

    def as_ordered(self, value: Any) -> OrderedDict[Any, Any]:
        if not isinstance(value, list) or len(value) != 2:
            raise self.corrupt("__odict__ is not a list of [items, attributes]")
        items = self.decode(value[0])
        self.where.append("<attributes>")
        attributes = self.decode(value[1])
        self.where.pop()
        if not isinstance(items, dict) or not isinstance(attributes, dict):
            raise self.corrupt("__odict__ holds something other than two mappings")
        if not all(isinstance(k, str) and not k.startswith("__") for k in attributes):
            raise self.corrupt("__odict__ has an attribute name that is not a plain string")
        ordered = OrderedDict(items)
        ordered.__dict__.update(attributes)
        return ordered

    def as_float(self, value: Any) -> float:
        # repr() of 'nan', 'inf', '-inf' or a finite float gives the string back; anything
        # else (' nan', 'infinity', '1e999', '1_0', 'load') is not what the writer stores
        try:
            number = float(value) if isinstance(value, str) and len(value) <= 32 else None
        except ValueError:
            number = None
        if number is None or repr(number) != value:
            raise self.corrupt(f"__float__ {_show(value)} is not a float's repr")
        return number

    def as_dtype(self, value: Any) -> torch.dtype:
        dtype = _torch_dtypes().get(value) if isinstance(value, str) else None
        if dtype is None:
            raise self.corrupt(f"__dtype__ {_show(value)} is not a torch dtype")
        return dtype

    def as_device(self, value: Any) -> torch.device:
        device = _device(value)
        if device is None:
            raise self.corrupt(f"__device__ {_show(value)} is not a torch device")
        return device


_TAGS: dict[str, Callable[[_TreeDecoder, Any], Any]] = {
    "__tensor__": _TreeDecoder.as_tensor,
    "__tuple__": _TreeDecoder.as_tuple,
    "__dict__": _TreeDecoder.as_dict,
    "__odict__": _TreeDecoder.as_ordered,
    "__float__": _TreeDecoder.as_float,
    "__dtype__": _TreeDecoder.as_dtype,
    "__device__": _TreeDecoder.as_device,
}


@cache
def _torch_dtypes() -> dict[str, torch.dtype]:
    """Every torch.dtype by the name the writer gives it (str(dtype) less "torch."), and nothing
    else: looking a name up with getattr(torch, name) gave whatever torch holds ("load")."""
    import torch

    return {
        str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)
    }


# The device types a checkpoint's tensors live on; torch.device also takes legacy and
# rendering backends (mkldnn, opengl, vulkan, ...) that hold no checkpoint.
_DEVICE_TYPES = frozenset(
    {"cpu", "cuda", "mps", "xpu", "meta", "hpu", "xla", "mtia", "maia", "hip", "ipu"}
    | {"privateuseone"}
)


def _device(value: Any) -> torch.device | None:
    """``torch.device(value)`` when ``value`` is a string naming a known device type, else None."""
    if not isinstance(value, str) or len(value) > 32:
        return None
    if value.partition(":")[0] not in _DEVICE_TYPES:
        return None
    import torch

    try:
        return torch.device(value)
    except (RuntimeError, ValueError):  # "cuda:-1", "cuda:x", "cpu:0:1"
        return None


def _saved_devices(devices: Any, tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """The ``optckpt.devices`` map, checked: tensor name -> device (see :func:`read_safetensors`)."""
    if not isinstance(devices, dict):
        raise _CorruptTree(f"{DEVICES_KEY} is {_kind(devices)}, not a mapping")
    out = {}
    for name, value in devices.items():
        if name not in tensors:
            raise _CorruptTree(f"{DEVICES_KEY} names {_show(name)}, no tensor of the file")
        device = _device(value)
        # the writer records where a tensor's data was; a meta tensor has none, and a .pt
        # written with "meta" as a location would load with its values gone
        if device is None or device.type == "meta":
            raise _CorruptTree(f"{DEVICES_KEY} gives {_show(name)} the device {_show(value)}")
        out[name] = str(device)
    return out


def _tree_json(text: str) -> Any:
    # NaN and Infinity literals are not JSON; the writer tags non-finite floats instead
    return json.loads(text, parse_constant=_no_constant)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class _Encoder:
    """Turns a checkpoint tree into JSON plus a ``{name: tensor}`` map."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor | Deferred] = {}
        self._by_object: dict[int, str] = {}

    def tensor(self, value: torch.Tensor | Deferred, name: str) -> dict[str, str]:
        if id(value) in self._by_object:  # the same tensor twice stays one tensor
            return {"__tensor__": self._by_object[id(value)]}
        unique, n = name, 1
        while unique in self.tensors:
            n += 1
            unique = f"{name}#{n}"
        if is_tensor(value) and value.device.type == "meta":
            raise UsageError(f"cannot store {name}: a meta tensor has no data")
        if is_tensor(value) and layout_name(value) != "strided":
            raise UsageError(
                f"cannot store {name} in safetensors: a {layout_name(value)} tensor "
                "(safetensors holds dense tensors; write a .pt file)"
            )
        if safetensors_dtype(value.dtype) is None:
            raise UsageError(f"cannot store {name}: safetensors has no {value.dtype}")
        # made contiguous on the CPU only when written (_stored), one at a time
        self.tensors[unique] = value
        self._by_object[id(value)] = unique
        return {"__tensor__": unique}

    def encode(self, node: Any, name: str) -> Any:
        if is_tensor(node) or is_deferred(node):
            return self.tensor(node, name)
        if node is None or isinstance(node, (bool, int, str)):
            return node
        if isinstance(node, float):
            return node if math.isfinite(node) else {"__float__": repr(node)}
        torch = sys.modules.get("torch")  # without it, no torch dtype or device exists
        if isinstance(node, DType) or (torch is not None and isinstance(node, torch.dtype)):
            return {"__dtype__": str(node).removeprefix("torch.")}
        if torch is not None and isinstance(node, torch.device):
            return {"__device__": str(node)}
        if isinstance(node, tuple):
            return {"__tuple__": [self.encode(v, f"{name}.{i}") for i, v in enumerate(node)]}
        if isinstance(node, list):
            return [self.encode(v, f"{name}.{i}") for i, v in enumerate(node)]
        if isinstance(node, Mapping):
            if is_optimizer_state_dict(node):
                return self.optimizer(node, name)
            if isinstance(node, OrderedDict):
                # a model state dict: its type and _metadata (read by Module.load_state_dict)
                attributes = self.encode(vars(node), f"{name}.<attributes>")
                return {"__odict__": [self.mapping(node, name, {}), attributes]}
            return self.mapping(node, name, {})
        raise UsageError(
            f"cannot store a {type(node).__name__} at {name or 'the top level'} in safetensors"
        )

    def mapping(self, node: Mapping[Any, Any], name: str, labels: Mapping[Any, str]) -> Any:
        prefix = f"{name}." if name else ""
        if all(isinstance(k, str) and not k.startswith("__") for k in node):
            return {k: self.encode(v, prefix + labels.get(k, k)) for k, v in node.items()}
        return {
            "__dict__": [
                [self.encode(k, f"{prefix}key"), self.encode(v, prefix + labels.get(k, str(k)))]
                for k, v in node.items()
            ]
        }

    def optimizer(self, node: Mapping[str, Any], name: str) -> Any:
        prefix = f"{name}." if name else ""
        out = {}
        for k, v in node.items():
            if k == "state" and isinstance(v, Mapping):
                out[k] = self.mapping(v, prefix + "state", names_of(node))
            else:
                out[k] = self.encode(v, prefix + str(k))
        return out


def decode_tree(
    path: Path,
    tree: str,
    metadata: Mapping[str, str],
    tensors: Mapping[str, Any],
    placement: dict[KeyPath, str] | None,
) -> Any:
    """The checkpoint tree of ``optckpt.tree`` (``tree``) over the file's ``tensors``; the
    devices of ``optckpt.devices`` go into ``placement`` (see
    :func:`~optckpt.io.safetensors_format.read_safetensors`).

    Raises:
        UnreadableCheckpointError: optckpt metadata that optckpt never writes (see
            :class:`_TreeDecoder`), naming what is wrong and where.
    """
    with corrupt_json(path, "optckpt metadata"):
        try:
            devices = _saved_devices(_tree_json(metadata.get(DEVICES_KEY, "{}")), tensors)
            decoder = _TreeDecoder(tensors)
            root = decoder.decode(_tree_json(tree))
        except _CorruptTree as e:
            raise UnreadableCheckpointError(f"{path}: corrupt optckpt metadata ({e})") from e
    if placement is not None and devices:
        # where each tensor sits in the tree (a tensor used as a dict key sits nowhere)
        at = {key for key, _ in tensor_paths(root)}
        placement.update(
            {key: devices[name] for key, name in decoder.placed if name in devices and key in at}
        )
    return root
