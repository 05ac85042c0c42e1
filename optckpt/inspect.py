"""What an optimizer checkpoint holds: groups, per-parameter state, totals, warnings, stats.

:func:`inspect_checkpoint` returns an :class:`InspectReport`; the CLI renders it, and
:meth:`InspectReport.to_json` gives the object DESIGN.md specifies for ``inspect --json``.
The report classes and the JSON form live in :mod:`optckpt.inspect_report` (re-exported here);
this module reads a checkpoint into them.
Without ``stats`` only shapes and dtypes are read, never tensor values, so a memory-mapped
multi-GB checkpoint is inspected without paging its data in.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optckpt.companions import checkpoint_companions, report_companions
from optckpt.described import is_tensor, layout_name
from optckpt.errors import IncompatibleStateError, UsageError

# Re-exported (``X as X``): the report classes and the JSON form live in optckpt.inspect_report.
from optckpt.inspect_report import GroupReport as GroupReport
from optckpt.inspect_report import InspectReport as InspectReport
from optckpt.inspect_report import OptimizerReport as OptimizerReport
from optckpt.inspect_report import ParamReport as ParamReport
from optckpt.inspect_report import TensorInfo as TensorInfo
from optckpt.inspect_report import TensorStats as TensorStats
from optckpt.inspect_report import dtype_name
from optckpt.inspect_report import jsonable as jsonable
from optckpt.io import Checkpoint, load_checkpoint
from optckpt.io.dcp import is_dcp
from optckpt.io.pages import Releaser
from optckpt.locate import KeyPath, Located, keyed_optimizers, select_optimizers
from optckpt.names import Naming, name_parameters, sources_of
from optckpt.optim.guess import guess_optimizer
from optckpt.optim.specs import (
    expected_state_shape,
    is_second_moment,
    param_shape_from_state,
    picture_order,
    spec_of,
    state_mismatches,
)
from optckpt.optim.specs import picture_label as _picture_label
from optckpt.statedict import group_of, param_ids

if TYPE_CHECKING:
    import torch

_CHUNK = 1 << 22  # elements per chunk when reading values, so memory stays flat
# --stats releases the pages it has read this often: on a 482 MB DCP folder, peak RSS above
# torch's import is 100-180 MB with 32 MiB (317 MB with the 256 MiB writers use).
_RELEASE_EVERY = 32 << 20


def _info(tensor: Any, checkpoint: Checkpoint, path: KeyPath) -> TensorInfo:
    return TensorInfo(
        shape=tuple(tensor.shape),
        dtype=dtype_name(tensor.dtype),
        device=checkpoint.saved_device(path, tensor),
        numel=tensor.numel(),
        nbytes=tensor.numel() * tensor.element_size(),
    )


def tensor_stats(tensor: torch.Tensor, where: str = "a state tensor") -> TensorStats:
    """Norm, finite min/max, non-finite count, RMS and mean of a tensor, read in chunks.

    Floating chunks are reduced in their own dtype with float64 accumulation (no float64
    copy), so a memory-mapped tensor is streamed through rather than copied whole; a
    non-contiguous tensor is copied one chunk at a time (:mod:`optckpt.chunks`). Dtypes the
    CPU cannot reduce (float8, integers) are converted chunk by chunk. The work is bounded by
    what the tensor holds: a zero-stride view that claims far more is refused.

    Raises:
        UnreadableCheckpointError: the tensor claims more elements than its storage holds by
            more than :data:`optckpt.chunks.MAX_EXCESS_BYTES` (``where`` names it).
    """
    import torch

    from optckpt.chunks import check_bounded, chunks, reducible

    check_bounded(tensor, where)
    total_sq = total = 0.0
    nonfinite = 0
    low = high = None
    for chunk in chunks(tensor.detach(), _CHUNK):
        chunk = reducible(chunk)
        if chunk.is_complex():
            chunk = chunk.abs()
        finite = torch.isfinite(chunk)
        bad = chunk.numel() - int(finite.sum())
        if bad:
            nonfinite += bad
            chunk = chunk[finite]
        if chunk.numel():
            total_sq += float(torch.linalg.vector_norm(chunk, dtype=torch.float64)) ** 2
            total += float(chunk.sum(dtype=torch.float64))
            lo, hi = (float(x) for x in torch.aminmax(chunk))
            low = lo if low is None else min(low, lo)
            high = hi if high is None else max(high, hi)
    n = max(math.prod(tensor.shape) - nonfinite, 1)
    return TensorStats(
        norm=math.sqrt(total_sq),
        min=low,
        max=high,
        nonfinite=nonfinite,
        rms=math.sqrt(total_sq / n),
        mean=total / n,
    )


def _step_value(value: Any) -> float | None:
    if is_tensor(value) and value.numel() == 1 and value.device.type != "meta":
        return float(value.item())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _state_entry(value: Any, checkpoint: Checkpoint, path: KeyPath) -> TensorInfo | Any:
    """A state value as the report shows it; ``path``: its key path in the checkpoint."""
    if is_tensor(value):
        return _info(value, checkpoint, path)
    if isinstance(value, (list, tuple)):
        return [_state_entry(v, checkpoint, (*path, i)) for i, v in enumerate(value)]
    return value


def _read_stats(
    report: ParamReport, raw: Mapping[Any, Any], checkpoint: Checkpoint, releaser: Releaser
) -> None:
    """``--stats``: the values of one parameter's state tensors, into ``report.stats``."""
    from optckpt.chunks import readable

    real = getattr(checkpoint, "real", None)  # DCP: a placeholder's chunks are read now
    for k, v in raw.items():
        if real is not None:
            v = real(v)
        if (
            is_tensor(v)
            and v.numel() > 1
            and v.device.type != "meta"
            and layout_name(v) == "strided"
            and readable(v.dtype)  # not a packed dtype such as float4_e2m1fn_x2
        ):
            where = f"the state of {report.name or f'ID {report.id}'}, {str(k)!r}"
            report.stats[str(k)] = tensor_stats(v, where)
            releaser.read(v.numel() * v.element_size())


def _warnings(
    state_dict: Mapping[str, Any],
    params: list[ParamReport],
    steps: dict[Any, float],
    optimizer: str | None = None,
) -> list[str]:
    """What is certainly wrong or worth knowing; ``optimizer`` is the guessed class, whose
    facts (:mod:`optckpt.optim.specs`) say which state shapes must agree and whether a Python
    number ``step`` means an old torch."""
    found: list[str] = []
    label = {p.id: (p.name or f"ID {p.id}") for p in params}
    orphans = [p for p in params if p.group is None]
    if orphans:
        found.append(
            "state under IDs in no param group (torch keeps it, but no parameter gets it): "
            + ", ".join(str(p.id) for p in orphans[:8])
        )
    stateless = [p for p in params if p.group is not None and not p.state]
    if stateless:
        shown = ", ".join(label[p.id] for p in stateless[:5]) + (
            " ..." if len(stateless) > 5 else ""
        )
        found.append(
            f"{len(stateless)} of {sum(p.group is not None for p in params)} parameters have no "
            f"state (not stepped yet, frozen, or never given a gradient): {shown}"
        )
    by_group: dict[int, Counter[float]] = defaultdict(Counter)
    for p in params:
        if p.group is not None and p.id in steps:
            by_group[p.group][steps[p.id]] += 1
    for index, counts in sorted(by_group.items()):
        if len(counts) > 1:
            listed = ", ".join(f"{_fmt_step(s)} ({n} params)" for s, n in counts.most_common())
            found.append(f"group {index}: step counts disagree: {listed}")
    for p in params:
        shape = param_shape_from_state(optimizer, p.state)
        if shape is not None and state_mismatches(optimizer, p.state, shape):
            listed = ", ".join(
                f"{k} {list(v.shape)}"
                for k, v in p.state.items()
                if isinstance(v, TensorInfo) and expected_state_shape(optimizer, k, shape)
            )
            found.append(f"{label[p.id]}: state tensors disagree in shape: {listed}")
    spec = spec_of(optimizer)
    counter = spec is not None and spec.step_is_counter  # SparseAdam's step is an int anyway
    legacy = [p for p in params if counter and isinstance(p.state.get("step"), (int, float))]
    if legacy:
        found.append(
            f"{len(legacy)} parameters store step as a Python number (saved by torch < 1.12); "
            "torch still loads it and turns it into a tensor"
        )
    return found


def _fmt_step(step: float) -> str:
    return str(int(step)) if step.is_integer() else repr(step)


def _picture_key(params: Iterable[ParamReport], optimizer: str | None) -> str | None:
    """The state key to picture: the optimizer's own (:mod:`optckpt.optim.specs`), else the
    most telling one there is (second moments first)."""
    keys = {k for p in params for k in p.stats}
    spec = spec_of(optimizer)
    if spec is not None and spec.picture in keys:
        return spec.picture
    return next((key for key in picture_order() if key in keys), None)


def picture_value(report: ParamReport, key: str) -> float | None:
    """The number the ``--stats`` bar view plots for one parameter."""
    stats = report.stats.get(key)
    if stats is None:
        return None
    if is_second_moment(key):  # the square root of a second moment: the gradients' scale
        return math.sqrt(max(stats.mean, 0.0))
    return stats.rms


def _names(state_dict: Mapping[str, Any], checkpoint: Checkpoint) -> tuple[Naming, str | None]:
    """The names :mod:`optckpt.names` gives (with what the checkpoint offers: its model
    weights, its other optimizers, a folder's model config), and why there are none when
    recovery refused: inspect then shows IDs only."""
    try:
        naming = name_parameters(
            state_dict,
            sources=sources_of(checkpoint, state_dict),
            hint="remap and resume-step name them with --from OLD_LAYOUT",
        )
        return naming, None
    except (UsageError, IncompatibleStateError) as e:
        return Naming(), f"parameters shown unnamed: {e}"


def inspect_optimizer(
    located: Located, checkpoint: Checkpoint, *, stats: bool = False
) -> OptimizerReport:
    """Describe one optimizer state dict.

    Args:
        located: the state dict and its key path.
        checkpoint: the checkpoint it came from (for saved devices).
        stats: also read the values: per-tensor norms, min/max and non-finite counts.
    """
    sd = located.state_dict
    groups_of = group_of(sd)
    naming, unnamed = _names(sd, checkpoint)
    names = naming.names
    state = sd["state"]
    ids = param_ids(sd) + [k for k in state if k not in groups_of]
    params: list[ParamReport] = []
    steps: dict[Any, float] = {}
    releaser = Releaser(checkpoint.sources, _RELEASE_EVERY) if stats else None
    for pid in ids:
        raw = state.get(pid, {})
        at = (*located.path, "state", pid)
        if isinstance(raw, Mapping):
            entries = {str(k): _state_entry(v, checkpoint, (*at, k)) for k, v in raw.items()}
        else:
            entries = {"<value>": _state_entry(raw, checkpoint, at)}
            raw = {"<value>": raw}
        report = ParamReport(
            id=pid,
            name=names.get(pid),
            group=groups_of.get(pid),
            state=entries,
        )
        step = _step_value(raw.get("step"))
        if step is not None:
            steps[pid] = step
        if releaser is not None:
            _read_stats(report, raw, checkpoint, releaser)
        params.append(report)

    groups = []
    for index, group in enumerate(sd["param_groups"]):
        unique = list(dict.fromkeys(group["params"]))
        groups.append(
            GroupReport(
                index=index,
                num_params=len(group["params"]),
                params_with_state=sum(1 for pid in unique if state.get(pid)),
                hyperparams={k: v for k, v in group.items() if k not in ("params", "param_names")},
            )
        )
    guess = guess_optimizer(sd)
    return OptimizerReport(
        key=located.key,
        guess=guess,
        groups=groups,
        params=params,
        steps=steps,
        names_source=naming.source,
        names_from=naming.describe(),
        warnings=_warnings(sd, params, steps, guess.name) + ([unnamed] if unnamed else []),
        picture=_picture_key(params, guess.name) if stats else None,
        notes=list(naming.notes),
    )


def picture_label(key: str) -> str:
    """How the bar view names the quantity it plots for state key ``key``."""
    return _picture_label(key)


def inspect_checkpoint(
    path: str | Path,
    *,
    key: str | None = None,
    stats: bool = False,
    allow_globals: Iterable[str] = (),
    describe: bool | None = None,
) -> InspectReport:
    """Read a checkpoint and describe every optimizer state dict in it (or the one at ``key``).

    Args:
        path: a checkpoint file or folder (see :func:`optckpt.io.load_checkpoint`).
        key: key path of one optimizer state dict; ``None`` for all of them.
        stats: read tensor values for per-parameter statistics.
        allow_globals: globals to allow while unpickling (``module.Name``).
        describe: read the structure without torch (:mod:`optckpt.io.structure`), where
            the reader models the file; ``None``: unless ``stats``. The report is the same
            either way (``tests/test_structure.py`` compares them).

    Raises:
        UnreadableCheckpointError: the input cannot be read, or holds no optimizer state.
        UsageError: ``key`` names nothing, or no optimizer state dict.
    """
    checkpoint: Checkpoint
    described = not stats if describe is None else describe
    if is_dcp(path):  # .metadata and the values: tensors are read only for --stats
        from optckpt.io.dcp.describe import describe_dcp

        dcp = describe_dcp(path, allow_globals=allow_globals) if described else None
        if dcp is None:  # not modelled without torch, or --stats
            from optckpt.io.dcp.reader import read_dcp

            dcp = read_dcp(path, allow_globals=allow_globals, tensors="meta")
        checkpoint = dcp
    else:
        # Without --stats only the structure is needed: described without torch
        # (optckpt.io.structure) where the reader models the file, else read with torch.
        checkpoint = load_checkpoint(path, allow_globals=allow_globals, describe=described)
    located = select_optimizers(checkpoint.root, key)
    if checkpoint.members:
        top = checkpoint.members
    elif isinstance(checkpoint.root, Mapping):
        top = [str(k) for k in checkpoint.root]
    else:
        top = []
    return InspectReport(
        path=checkpoint.path,
        format=checkpoint.format,
        size=checkpoint.size,
        top_level_keys=top,
        optimizers=[inspect_optimizer(loc, checkpoint, stats=stats) for loc in located],
        storage=summary() if (summary := getattr(checkpoint, "summary", None)) else None,  # DCP
        read_notes=checkpoint.notes(),
        companions=report_companions(
            checkpoint_companions(checkpoint, allow_globals, describe=described),
            keyed_optimizers(checkpoint.root),
        ),
    )
