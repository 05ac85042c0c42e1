"""Regenerate a checkpoint: a layout's parameters, N seeded steps of a bundled optimizer.

The parameters are drawn from a seed (or taken from a model state dict given as the layout),
the gradients come from :mod:`optckpt.synthetic`, and the result is what training code would
save: ``{"model": weights, "optimizer": optimizer.state_dict()}``. The same arguments give the
same tensors on every run, and ``torch.optim`` fed the same parameters and gradients gives
the same state bit for bit (tests/test_regenerate.py).

This module owns building the checkpoint and checking, before any allocation, that it fits in
memory (:func:`footprint`); parsing ``--set`` is :mod:`optckpt.settings` (:class:`Setting`
and :func:`parse_setting` are re-exported here).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from optckpt.errors import IncompatibleStateError, UsageError
from optckpt.layout import Layout, load_layout, tied
from optckpt.optim import by_name
from optckpt.optim.registry import defaults
from optckpt.optim.specs import SCHEDULER_GROUP_KEYS, gradients_of
from optckpt.seeds import check_seed
from optckpt.settings import Setting, parse_setting
from optckpt.statedict import huge_int, show_value
from optckpt.synthetic import Gradients, seeded_parameters, take_steps

if TYPE_CHECKING:
    from optckpt.io.write import ProgressStart

__all__ = [
    "RegenerateResult",
    "Setting",
    "available_memory",
    "footprint",
    "parse_setting",
    "regenerate",
    "regenerate_checkpoint",
]

# Group keys optckpt never carries from a layout into a regenerated optimizer: names are
# given by the layout itself, and the others belong to LR schedulers and SWA.
_NOT_HYPERPARAMETERS = frozenset({"params", "param_names"}) | SCHEDULER_GROUP_KEYS


# The dtypes ``torch.randn`` draws on the CPU (not the float8 family).
_SEEDABLE = ("float16", "bfloat16", "float32", "float64", "complex64", "complex128")


def _torch_dtype(name: str, where: str) -> torch.dtype:
    if name not in _SEEDABLE:
        raise UsageError(
            f"{where}: dtype {name!r} cannot be seeded; use one of {', '.join(_SEEDABLE)}"
        )
    dtype: torch.dtype = getattr(torch, name)
    return dtype


# Elements a tensor may hold at most: torch indexes them with int64.
_MAX_NUMEL = 2**63 - 1


def _numel(name: str, shape: tuple[int, ...]) -> int:
    """Elements of a layout shape, as a Python int (no int64 overflow).

    Raises:
        UsageError: more elements than a tensor can index.
    """
    numel = math.prod(shape)
    if numel > _MAX_NUMEL:
        shown = (
            f"shape {list(shape)}" if all(d < 2**64 for d in shape) else "a dimension over 2**64"
        )
        raise UsageError(
            f"the layout's {name!r} has {shown}: more than 2**63 - 1 elements, "
            "which no tensor can hold"
        )
    return numel


def _element_size(dtype: str) -> int:
    found = getattr(torch, dtype, None)
    return found.itemsize if isinstance(found, torch.dtype) else 4


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if n < 1024 or unit == "EiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def footprint(
    cls_name: str,
    layout: Layout,
    groups: Sequence[Mapping[str, Any]],
    steps: int,
    *,
    dtypes: Mapping[str, str] | None = None,
) -> tuple[int, int]:
    """Estimate the memory :func:`regenerate` needs, before it allocates anything.

    Parameters, plus, when it steps, a gradient and one temporary per parameter and the
    state the optimizer creates as its spec declares it (:mod:`optckpt.optim.specs`):
    ``exp_avg``-like keys the parameter's size, Adafactor's factored rows and columns,
    LBFGS's flat vectors and its history of up to ``history_size`` pairs of them.

    Args:
        cls_name: the optimizer class name.
        layout: the parameters' shapes and groups.
        groups: each group's hyperparameters (layout values, then ``--set``).
        steps: steps to take (0: the parameters only).
        dtypes: dtype names by parameter where they differ from the layout's (model weights).

    Returns:
        ``(parameter bytes, total bytes)``.

    Raises:
        UsageError: a shape whose element count overflows a tensor's index.
    """
    from optckpt.optim.specs import spec_of

    spec = spec_of(cls_name)
    params = total = flat = 0
    for index, group in enumerate(layout.groups):
        settings = {**(spec.defaults if spec else {}), **groups[index]}
        for name in group["params"]:
            shape = layout.params[name].shape
            numel = _numel(name, shape)
            size = _element_size((dtypes or {}).get(name, layout.params[name].dtype))
            params += numel * size
            total += numel * size
            flat += numel * size
            if not steps:
                continue
            total += 2 * numel * size  # the gradient, and a temporary of the step
            if spec is None:
                total += 2 * numel * size
                continue
            for key in spec.state:
                if not key.applies(settings, len(shape)):
                    continue
                if key.kind == "param":
                    total += numel * size
                elif key.kind in ("row", "col") and len(shape) >= 2:
                    total += numel * size // max(shape[-1 if key.kind == "row" else -2], 1)
    if steps and spec is not None and spec.first_param_only:  # LBFGS: flat vectors
        settings = {**spec.defaults, **(groups[0] if groups else {})}
        history = _count(settings.get("history_size"), 100)
        iterations = _count(settings.get("max_iter"), 20) * steps
        for key in spec.state:
            if key.kind == "flat":
                total += flat
            elif key.kind == "flat_list":
                total += flat * min(history, iterations)
    return params, total


def _count(value: Any, default: int) -> int:
    """A count hyperparameter as an int (the default where ``--set`` gave something odd:
    the optimizer's own validation reports that, after this estimate)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def available_memory() -> tuple[int, str] | None:
    """Bytes this process can still allocate, and where that number comes from: the least
    of the system's ``MemAvailable``, a cgroup (container) limit, and ``RLIMIT_AS`` less the
    address space in use. ``None`` where none of them can be read."""
    found: list[tuple[int, str]] = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append((int(line.split()[1]) * 1024, "MemAvailable"))
    except (OSError, ValueError, IndexError):
        pass
    if not found:
        try:
            pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            if pages > 0:
                found.append((pages, "free memory"))
        except (AttributeError, ValueError, OSError):
            pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            found.append((max(int(limit) - used, 0), "the cgroup memory limit"))
    except (OSError, ValueError):
        pass
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            with open("/proc/self/statm") as f:
                in_use = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            found.append((max(soft - in_use, 0), "the address-space limit, ulimit -v"))
    except (ImportError, OSError, ValueError, IndexError):
        pass
    return min(found) if found else None


def _check_memory(need: int, params: int, cls_name: str, steps: int) -> None:
    """Refuse a layout whose estimated footprint exceeds the memory available now."""
    available = available_memory()
    if available is None or need <= available[0]:
        return
    what = (
        f"{_bytes(params)} of parameters"
        if not steps
        else f"{_bytes(params)} of parameters and {_bytes(need - params)} of gradients and "
        f"{cls_name} state"
    )
    raise UsageError(
        f"the layout needs about {_bytes(need)} ({what}) but only {_bytes(available[0])} is "
        f"available ({available[1]}); regenerate a smaller layout"
    )


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
        for key, value in hyper.items():
            huge = huge_int(value)  # torch's step would raise OverflowError on it
            if huge is not None:
                raise UsageError(
                    f"group {index}: {key} holds {show_value(huge)}, too large for any float"
                )
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
        UsageError: a bad ``--set``, a negative ``steps``, ``values`` that do not fit, a
            shape whose element count overflows, or a layout whose estimated footprint
            (:func:`footprint`) exceeds the memory available (:func:`available_memory`),
            checked before anything is allocated.
        IncompatibleStateError: the optimizer refuses the layout or the hyperparameters.
    """
    cls = by_name(optimizer)
    if steps < 0:
        raise UsageError(f"--steps must be 0 or more, not {steps}")
    check_seed(seed)
    if not layout.params:  # torch.optim refuses an empty parameter list too
        raise UsageError("the layout has no parameters")
    groups, kwargs, dropped = _groups(layout, defaults(cls), settings, cls.__name__)
    # Nothing is allocated before the whole footprint is known to fit.
    dtypes = None
    if values is not None:
        dtypes = {
            n: str(v.dtype).removeprefix("torch.")
            for n, v in values.items()
            if isinstance(v, torch.Tensor)
        }
    params_bytes, need = footprint(cls.__name__, layout, groups, steps, dtypes=dtypes)
    _check_memory(need, params_bytes, cls.__name__, steps)
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
    except (ValueError, TypeError, RuntimeError, AssertionError, OverflowError) as e:
        raise IncompatibleStateError(
            f"{cls.__name__} refuses this layout or these settings: {e}"
        ) from e
    try:
        take_steps(built, Gradients(seed, gradients_of(cls.__name__)), steps)
    except (ValueError, TypeError, RuntimeError, AssertionError, OverflowError) as e:
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
    from optckpt.io.rewrite import prepare_output, save
    from optckpt.layout import find_model_state

    output = prepare_output(out, force=force, inputs=[layout], command="regenerate")
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
    # refused now, not after the steps
    output.refuse_unstorable((n, getattr(torch, p.dtype)) for n, p in target.params.items())
    result = regenerate(
        optimizer, target, steps=steps, seed=seed, settings=parsed, values=values, names=names
    )
    tree: Any = result.optimizer if bare else {"model": result.model, "optimizer": result.optimizer}
    save(output, tree, progress=progress)
    return RegenerateResult(
        out=output.path,
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
