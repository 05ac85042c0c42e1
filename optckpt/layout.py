"""Layouts: which named parameters exist, their shapes and dtypes, and how they are grouped.

A layout is what ``remap --to`` (and ``regenerate --layout``) take. It comes from

* a JSON file: ``{"params": {name: {"shape": [...], "dtype": "float32"}},
  "groups": [{"params": [name, ...], "lr": ..., ...}]}``;
* a model state dict file (``.pt``/``.safetensors``, bare or inside a training checkpoint):
  names and shapes in one group, split by ``--group 'REGEX:key=value,...'`` rules (a plain
  safetensors file, whose tensors are sorted by name rather than in the model's order, is
  refused; one optckpt wrote keeps the order);
* a live model and optimizer: :func:`layout_of` / :func:`save_layout`.

Naming the parameters of an optimizer state dict (from ``param_names``, a ``--from`` layout
or these model weights) is :mod:`optckpt.names`' job.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optckpt.described import is_tensor
from optckpt.errors import UsageError
from optckpt.patterns import Pattern, compile_pattern
from optckpt.statedict import huge_int, show_value

if TYPE_CHECKING:
    import torch

# Entries of a model state dict that are buffers, not parameters: BatchNorm's statistics.
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
# Keys under which training checkpoints keep the model's weights.
_MODEL_KEYS = ("model", "state_dict", "model_state_dict", "module", "model.safetensors")


@dataclass(frozen=True)
class ParamSpec:
    """A parameter's shape and dtype (``"float32"``, ...)."""

    shape: tuple[int, ...]
    dtype: str = "float32"


@dataclass
class Layout:
    """Named parameters and their groups (each group's ``params`` lists names)."""

    params: dict[str, ParamSpec]
    groups: list[dict[str, Any]] = field(default_factory=list)

    def names(self) -> list[str]:
        """Every grouped name, in group order."""
        return [n for g in self.groups for n in g["params"]]

    def to_json(self) -> dict[str, Any]:
        """The JSON form (see module doc)."""
        return {
            "params": {
                n: {"shape": list(p.shape), "dtype": p.dtype} for n, p in self.params.items()
            },
            "groups": [
                {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
                for g in self.groups
            ],
        }


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _is_torch_dtype(name: str) -> bool:
    import torch

    return isinstance(getattr(torch, name, None), torch.dtype)


def _hyperparams(group: Mapping[str, Any]) -> dict[str, Any]:
    """A group's hyperparameters as torch keeps them: JSON lists become tuples (``betas``)."""
    return {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in group.items()
        if k not in ("params", "param_names")
    }


def layout_from_json(data: Mapping[str, Any], source: str = "layout") -> Layout:
    """Build a layout from its JSON form, checking that every grouped name is declared.

    Raises:
        UsageError: a malformed layout (the message says what is wrong where).
    """
    try:
        params = {
            str(name): ParamSpec(
                tuple(int(d) for d in spec["shape"]), str(spec.get("dtype", "float32"))
            )
            for name, spec in data["params"].items()
        }
        raw_groups = data.get("groups") or [{"params": list(params)}]
        groups = [{**_hyperparams(g), "params": [str(n) for n in g["params"]]} for g in raw_groups]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UsageError(
            f"{source}: not a layout ({type(e).__name__}: {e}); see README, Layouts"
        ) from e
    for name, spec in params.items():
        if any(d < 0 for d in spec.shape):
            raise UsageError(f"{source}: {name!r} has a negative dimension {list(spec.shape)}")
        if not _is_torch_dtype(spec.dtype):
            raise UsageError(f"{source}: {name!r} has dtype {spec.dtype!r}, which torch has not")
    for index, group in enumerate(groups):
        huge = huge_int(group)
        if huge is not None:  # torch's arithmetic on it raises OverflowError at the first step
            raise UsageError(
                f"{source}: group {index} holds {show_value(huge)}, too large for any float"
            )
    seen: set[str] = set()
    for index, group in enumerate(groups):
        for name in group["params"]:
            if name not in params:
                raise UsageError(f"{source}: group {index} lists {name!r}, which is not in params")
            if name in seen:
                raise UsageError(f"{source}: {name!r} is in more than one group")
            seen.add(name)
    return Layout(params, groups)


def is_buffer(name: str, tensor: torch.Tensor) -> bool:
    """Whether a model state dict entry is a buffer rather than a trainable parameter
    (integer and bool tensors cannot be trained; complex ones can, like floating ones)."""
    trainable = tensor.is_floating_point() or tensor.is_complex()
    return name.rsplit(".", 1)[-1] in _BUFFER_SUFFIXES or not trainable


def model_parameters(model_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The parameters of a model state dict, in order, as ``model.named_parameters()`` has them.

    Known buffers and non-floating tensors are left out, and so is the second name of a tied
    weight (an entry sharing storage, offset and shape with an earlier one), which
    ``named_parameters()`` also yields only once.
    """
    found: dict[str, torch.Tensor] = {}
    seen: set[tuple[torch.UntypedStorage, int, tuple[int, ...]]] = set()
    for name, tensor in model_state.items():
        if not is_tensor(tensor) or is_buffer(name, tensor):
            continue
        identity = _alias_key(tensor)
        if tensor.numel() and identity in seen:
            continue
        seen.add(identity)
        found[name] = tensor
    return found


def tied(model_state: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """For each name, the other names of a model state dict that are the same tensor (tied
    weights: the same storage, offset and shape), which must change together."""
    by_identity: dict[tuple[torch.UntypedStorage, int, tuple[int, ...]], list[str]] = {}
    for name, tensor in model_state.items():
        if is_tensor(tensor) and tensor.numel():
            by_identity.setdefault(_alias_key(tensor), []).append(name)
    return {n: [m for m in names if m != n] for names in by_identity.values() for n in names}


def _alias_key(tensor: torch.Tensor) -> tuple[torch.UntypedStorage, int, tuple[int, ...]]:
    """What two names of one tied weight share: the storage (the object, of which torch keeps
    one per storage; the key holds it), the offset in it and the shape."""
    return (tensor.untyped_storage(), int(tensor.storage_offset()), tuple(tensor.shape))


def _is_model_state(node: Any) -> bool:
    return (
        isinstance(node, Mapping)
        and bool(node)
        and all(isinstance(k, str) and is_tensor(v) for k, v in node.items())
    )


def model_state_path(root: Any) -> tuple[str, ...] | None:
    """The key path of a checkpoint's model state dict (see :func:`find_model_state`):
    ``()`` for the root, ``("model",)`` for one under a usual key; ``None`` for none."""
    if _is_model_state(root):
        return ()
    if isinstance(root, Mapping):
        for key in _MODEL_KEYS:
            if _is_model_state(root.get(key)):
                return (key,)
    return None


def find_model_state(root: Any) -> Mapping[str, torch.Tensor] | None:
    """The model state dict of a checkpoint: the root if it is one, or under a usual key."""
    path = model_state_path(root)
    if path is None:
        return None
    found: Mapping[str, torch.Tensor] | None = root[path[0]] if path else root
    return found


def model_state_of(checkpoint: Any) -> Mapping[str, torch.Tensor] | None:
    """The model weights stored in a :class:`~optckpt.io.Checkpoint`, if any.

    A training folder's ``model.safetensors`` is not used: safetensors files keep their
    tensors sorted by name, not in the model's order, so IDs cannot be aligned with them.
    """
    return find_model_state(checkpoint.root)


def sorted_by_name(checkpoint: Any) -> bool:
    """Whether a checkpoint's tensors are sorted by name rather than kept in the model's
    order: a plain safetensors file (not one optckpt wrote, which records its tree). Its
    weights can be matched to parameters by name only, never aligned by order."""
    from optckpt.io.safetensors_format import TREE_KEY, read_header

    if checkpoint.format != "safetensors" or not Path(checkpoint.path).is_file():
        return False
    return TREE_KEY not in read_header(Path(checkpoint.path))[1]


def split_top_level(text: str) -> list[str]:
    """Split at the commas outside JSON brackets and strings (``betas=[0.9,0.95],lr=1``)."""
    items: list[str] = []
    depth, start, quoted, escaped = 0, 0, False, False
    for i, char in enumerate(text):
        if quoted:
            escaped, quoted = (False, True) if escaped else (char == "\\", char != '"')
        elif char == '"':
            quoted = True
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth <= 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return items


def parse_group_rule(rule: str) -> tuple[Pattern, dict[str, Any]]:
    """Parse ``'REGEX:key=value,key=value'``; values are JSON where they parse (numbers, ...).

    Commas inside JSON brackets or strings do not split (``betas=[0.9,0.95]``).

    Raises:
        UsageError: no ``:``, a bad regex, or a ``key=value`` without ``=``.
    """
    pattern, sep, settings = rule.rpartition(":")
    if not sep or not pattern:
        raise UsageError(f"--group {rule!r}: expected 'REGEX:key=value,...'")
    regex = compile_pattern(pattern, option="--group", rule=rule)  # with a time budget
    values: dict[str, Any] = {}
    for item in filter(None, split_top_level(settings)):
        key, eq, text = item.partition("=")
        if not eq:
            raise UsageError(f"--group {rule!r}: expected key=value, got {item!r}")
        try:
            values[key.strip()] = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            values[key.strip()] = text
    return regex, values


def layout_from_model_state(
    model_state: Mapping[str, torch.Tensor], rules: Sequence[str] = ()
) -> Layout:
    """A layout from a model state dict: one group, or split by ``--group`` rules.

    Parameters matching no rule form the first group (no hyperparameters of its own); each
    rule, first match wins, forms the next group with its values. Empty groups are dropped.
    """
    params = model_parameters(model_state)
    parsed = [parse_group_rule(r) for r in rules]
    members: list[list[str]] = [[] for _ in range(len(parsed) + 1)]
    for name in params:
        index = next((i + 1 for i, (regex, _) in enumerate(parsed) if regex.search(name)), 0)
        members[index].append(name)
    groups = [{"params": members[0]}] + [
        {**_hyperparams(values), "params": members[i + 1]} for i, (_, values) in enumerate(parsed)
    ]
    return Layout(
        {n: ParamSpec(tuple(t.shape), _dtype_name(t.dtype)) for n, t in params.items()},
        [g for g in groups if g["params"]],
    )


def load_layout(
    path: str | Path, rules: Sequence[str] = (), allow_globals: Iterable[str] = ()
) -> Layout:
    """Read a layout from a JSON file or a model state dict file (see module doc).

    Raises:
        UsageError: not a layout, ``rules`` given for a JSON layout, or a plain safetensors
            file (sorted by name, it cannot give the model's parameter order).
        UnreadableCheckpointError: the file cannot be read.
    """
    from optckpt.io import load_checkpoint

    path = Path(path)
    if path.is_file() and path.suffix == ".json":
        if rules:
            raise UsageError("--group splits a model state dict; a JSON layout has its own groups")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UsageError(f"{path}: cannot read the layout ({e})") from e
        except RecursionError as e:  # json recurses once per level of nesting
            raise UsageError(f"{path}: not a layout (nested too deeply)") from e
        return layout_from_json(data, str(path))
    checkpoint = load_checkpoint(path, allow_globals=allow_globals)
    model_state = find_model_state(checkpoint.root)
    if model_state is None:
        raise UsageError(f"{path}: neither a JSON layout nor a model state dict")
    if sorted_by_name(checkpoint):
        # torch numbers an optimizer's parameters in the model's order; a plain safetensors
        # file keeps its tensors sorted by name, so a layout read from it would put state on
        # the wrong parameters when torch loads the result.
        raise UsageError(
            f"{path}: a plain safetensors file keeps its tensors sorted by name, not in the "
            "model's order, so it cannot give the order torch numbers parameters in; use "
            "torch.save(model.state_dict(), PATH) or optckpt.save_layout(model, optimizer, PATH)"
        )
    return layout_from_model_state(model_state, rules)


def layout_of(model: torch.nn.Module, optimizer: Any | None = None) -> Layout:
    """The layout of a live model, grouped as ``optimizer`` groups it.

    Without an optimizer: one group of the parameters that require grad. With one: its groups
    and hyperparameters; parameters it does not hold (frozen ones) are left out, as the
    optimizer leaves them out.

    Raises:
        UsageError: the optimizer holds a tensor that is not a parameter of ``model``.
    """
    named = dict(model.named_parameters())
    by_id = {id(p): n for n, p in named.items()}
    if optimizer is None:
        chosen = [n for n, p in named.items() if p.requires_grad]
        groups: list[dict[str, Any]] = [{"params": chosen}]
    else:
        groups = []
        for index, group in enumerate(optimizer.param_groups):
            names = []
            for p in group["params"]:
                if id(p) not in by_id:
                    raise UsageError(
                        f"optimizer group {index} holds a tensor that is not a parameter of the model"
                    )
                names.append(by_id[id(p)])
            groups.append({**_hyperparams(group), "params": names})
        chosen = [n for g in groups for n in g["params"]]
    params = {n: ParamSpec(tuple(named[n].shape), _dtype_name(named[n].dtype)) for n in chosen}
    return Layout(params, groups)


def save_layout(model: torch.nn.Module, optimizer: Any | None, path: str | Path) -> Layout:
    """Write :func:`layout_of` ``(model, optimizer)`` to ``path`` as JSON and return it.

    Hyperparameters JSON cannot hold (a Tensor ``lr``) are written as numbers.
    """
    layout = layout_of(model, optimizer)
    data = layout.to_json()
    for group in data["groups"]:
        for key, value in list(group.items()):
            if is_tensor(value):
                group[key] = value.item()
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
    return layout
