"""Regenerate a checkpoint: a layout's parameters, N seeded steps of a bundled optimizer.

The parameters are drawn from a seed (or taken from a model state dict given as the layout),
the gradients come from :mod:`optckpt.synthetic`, and the result is what training code would
save: ``{"model": weights, "optimizer": optimizer.state_dict()}``. The same arguments give the
same tensors on every run, and ``torch.optim`` fed the same parameters and gradients gives
the same state bit for bit (tests/test_regenerate.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from optckpt.errors import IncompatibleStateError, UsageError
from optckpt.layout import Layout, load_layout, split_top_level, tied
from optckpt.optim import by_name
from optckpt.optim.registry import defaults
from optckpt.optim.specs import SCHEDULER_GROUP_KEYS, gradients_of
from optckpt.synthetic import MAX_SEED, Gradients, seeded_parameters, take_steps

if TYPE_CHECKING:
    from optckpt.io.write import ProgressStart

__all__ = [
    "RegenerateResult",
    "Setting",
    "parse_setting",
    "regenerate",
    "regenerate_checkpoint",
]

# Group keys optckpt never carries from a layout into a regenerated optimizer: names are
# given by the layout itself, and the others belong to LR schedulers and SWA.
_NOT_HYPERPARAMETERS = frozenset({"params", "param_names"}) | SCHEDULER_GROUP_KEYS


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
    except json.JSONDecodeError:
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


# The dtypes ``torch.randn`` draws on the CPU (not the float8 family).
_SEEDABLE = ("float16", "bfloat16", "float32", "float64", "complex64", "complex128")


def _torch_dtype(name: str, where: str) -> torch.dtype:
    if name not in _SEEDABLE:
        raise UsageError(
            f"{where}: dtype {name!r} cannot be seeded; use one of {', '.join(_SEEDABLE)}"
        )
    dtype: torch.dtype = getattr(torch, name)
    return dtype


@dataclass
class Regenerated:
    """What :func:`regenerate` returns: the checkpoint parts and what decided them."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    dropped: list[str] = field(default_factory=list)


def _groups(
    layout: Layout, defaults: Mapping[str, Any], settings: Sequence[Setting], cls_name: str
) -> tuple[list[dict[str, Any]], dict[str, Any], list[str]]:
    """The groups' hyperparameters (layout, then ``--set``), the constructor keyword
    arguments, and the layout keys dropped because the optimizer has no such hyperparameter."""
    known = ", ".join(sorted(defaults))
    for s in settings:
        if s.key not in defaults:
            raise UsageError(
                f"--set {s.key}: {cls_name} has no such hyperparameter (it has {known})"
            )
        if s.group is not None and s.group >= len(layout.groups):
            raise UsageError(
                f"--set {s.group}.{s.key}: the layout has {len(layout.groups)} group(s), "
                f"numbered from 0"
            )
    dropped: set[str] = set()
    groups = []
    for index, group in enumerate(layout.groups):
        hyper = {}
        for key, value in group.items():
            if key in _NOT_HYPERPARAMETERS:
                continue
            if key in defaults:
                hyper[key] = value
            else:
                dropped.add(key)
        for s in settings:
            if s.group is None or s.group == index:
                hyper[s.key] = s.value
        groups.append(hyper)
    kwargs = {s.key: s.value for s in settings if s.group is None}
    return groups, kwargs, sorted(dropped)


def regenerate(
    optimizer: str,
    layout: Layout,
    *,
    steps: int = 1,
    seed: int = 0,
    settings: Sequence[Setting] = (),
    values: Mapping[str, torch.Tensor] | None = None,
    names: bool = True,
) -> Regenerated:
    """Build the layout's parameters and take ``steps`` steps of a bundled optimizer.

    Args:
        optimizer: a bundled optimizer name (``"adamw"``).
        layout: the parameters and their groups; group hyperparameters the optimizer does not
            have are dropped (and listed in the result).
        steps: steps to take (0 leaves the state empty).
        seed: seeds the parameters and the gradients (see :mod:`optckpt.synthetic`).
        settings: ``--set`` overrides, applied after the layout's own hyperparameters.
            Settings for every group are also the constructor's arguments, so the optimizer
            validates them as torch does.
        values: initial values by name (a model state dict) instead of seeded ones.
        names: give the groups ``param_names``, as ``named_parameters()`` does.

    Returns:
        The model weights after the steps (every layout parameter; with ``values``, every
        entry of it), the optimizer state dict, and the dropped layout keys.

    Raises:
        UnknownOptimizerError: no bundled optimizer has that name.
        UsageError: a bad ``--set``, a negative ``steps``, ``values`` that do not fit.
        IncompatibleStateError: the optimizer refuses the layout or the hyperparameters.
    """
    cls = by_name(optimizer)
    if steps < 0:
        raise UsageError(f"--steps must be 0 or more, not {steps}")
    if not 0 <= seed <= MAX_SEED:
        raise UsageError(f"--seed must be between 0 and {MAX_SEED}, not {seed}")
    if not layout.params:  # torch.optim refuses an empty parameter list too
        raise UsageError("the layout has no parameters")
    groups, kwargs, dropped = _groups(layout, defaults(cls), settings, cls.__name__)
    if values is None:
        specs = [
            (spec.shape, _torch_dtype(spec.dtype, name)) for name, spec in layout.params.items()
        ]
        try:
            tensors = dict(zip(layout.params, seeded_parameters(specs, seed), strict=True))
        except RuntimeError as e:  # out of memory, mostly
            raise UsageError(
                f"cannot make the layout's parameters: {' '.join(str(e).split())}"
            ) from e
    else:
        tensors = {}
        for name, spec in layout.params.items():
            value = values.get(name)
            if value is None or tuple(value.shape) != spec.shape:
                raise UsageError(
                    f"the model weights have no parameter {name!r} of shape {list(spec.shape)}"
                )
            # a copy: the weights may be memory-mapped from the layout file
            tensors[name] = value.detach().clone()
    param_groups = [
        {
            **hyper,
            "params": [(n, tensors[n]) if names else tensors[n] for n in group["params"]],
            # an empty group has no (name, tensor) pairs to tell torch it is named
            **({"param_names": []} if names and not group["params"] else {}),
        }
        for hyper, group in zip(groups, layout.groups, strict=True)
    ]
    try:
        built = cls(param_groups, **kwargs)
    except (ValueError, TypeError, RuntimeError, AssertionError) as e:
        raise IncompatibleStateError(
            f"{cls.__name__} refuses this layout or these settings: {e}"
        ) from e
    try:
        take_steps(built, Gradients(seed, gradients_of(cls.__name__)), steps)
    except (ValueError, TypeError, RuntimeError, AssertionError) as e:
        raise IncompatibleStateError(f"{cls.__name__} cannot step this layout: {e}") from e
    model = tensors
    if values is not None:
        model = dict(values)
        aliases = tied(values)
        for name, tensor in tensors.items():
            for alias in (name, *aliases.get(name, ())):
                model[alias] = tensor  # tied weights stay tied
    return Regenerated(model=model, optimizer=built.state_dict(), dropped=dropped)


@dataclass
class RegenerateResult:
    """What :func:`regenerate_checkpoint` wrote."""

    out: Path
    optimizer: str
    steps: int
    seed: int
    params_from: str
    num_params: int
    groups: list[dict[str, Any]]
    dropped: list[str]
    bare: bool


def regenerate_checkpoint(
    optimizer: str,
    layout: str | Path | Layout,
    out: str | Path,
    *,
    steps: int = 1,
    seed: int = 0,
    settings: Iterable[str | Setting] = (),
    group_rules: Sequence[str] = (),
    bare: bool = False,
    names: bool = True,
    force: bool = False,
    allow_globals: Iterable[str] = (),
    progress: ProgressStart | None = None,
) -> RegenerateResult:
    """Regenerate a checkpoint (see :func:`regenerate`) and write it to ``out``.

    A ``layout`` file that is a model state dict gives the starting values as well as the
    names and shapes. ``out`` is ``.pt`` (torch zip) or ``.safetensors`` by its extension;
    ``bare`` writes the optimizer state dict alone. ``progress`` is called with the bytes of
    tensors to write when the writing starts; the callback it returns is told each write.

    Raises:
        UsageError: bad options or an output that may not be written.
        UnreadableCheckpointError: the layout file cannot be read.
        IncompatibleStateError: the optimizer refuses the layout or the settings.
    """
    from optckpt.io import load_checkpoint
    from optckpt.io.write import check_output, format_for, save_checkpoint, tensor_bytes
    from optckpt.layout import find_model_state

    out = Path(out)
    fmt = format_for(out)
    inputs = [] if isinstance(layout, Layout) else [Path(layout)]
    check_output(out, inputs, force=force)
    parsed = [s if isinstance(s, Setting) else parse_setting(s) for s in settings]
    if group_rules and (isinstance(layout, Layout) or Path(layout).suffix == ".json"):
        raise UsageError(
            "--group splits a model state dict layout; a JSON layout has its own groups"
        )
    values: Mapping[str, torch.Tensor] | None = None
    params_from = "seeded"
    if isinstance(layout, Layout):
        target = layout
    else:
        target = load_layout(layout, group_rules, allow_globals)
        if Path(layout).suffix != ".json":
            model_state = find_model_state(
                load_checkpoint(layout, allow_globals=allow_globals).root
            )
            assert model_state is not None  # load_layout found it
            values = {**model_state}
            params_from = f"model state dict {layout}"
    if fmt == "safetensors":  # refused now, not after the steps
        from optckpt.io.safetensors_format import check_storable

        check_storable((n, getattr(torch, p.dtype)) for n, p in target.params.items())
    result = regenerate(
        optimizer, target, steps=steps, seed=seed, settings=parsed, values=values, names=names
    )
    tree: Any = result.optimizer if bare else {"model": result.model, "optimizer": result.optimizer}
    save_checkpoint(tree, out, fmt, progress=progress(tensor_bytes(tree)) if progress else None)
    return RegenerateResult(
        out=out,
        optimizer=by_name(optimizer).__name__,
        steps=steps,
        seed=seed,
        params_from=params_from,
        num_params=sum(len(g["params"]) for g in target.groups),
        groups=[
            {k: v for k, v in g.items() if k not in ("params", "param_names")}
            for g in result.optimizer["param_groups"]
        ],
        dropped=result.dropped,
        bare=bare,
    )
