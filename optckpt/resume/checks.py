"""The checks of a resume step that read the state and the parameters: shapes, loads, step
counters, finiteness."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from optckpt.chunks import chunks, readable, reducible
from optckpt.optim.specs import expected_state_shape, state_mismatches
from optckpt.resume.parameters import Params
from optckpt.resume.report import Check


def param_label(pid: Any, names: Mapping[Any, str]) -> str:
    return f"ID {pid} ({names[pid]})" if pid in names else f"ID {pid}"


def short_list(items: list[str], limit: int = 4) -> str:
    return "; ".join(items[:limit]) + (f"; ... ({len(items)} in all)" if len(items) > limit else "")


def check_shapes(state: Mapping[Any, Any], params: Params, optimizer_name: str) -> Check:
    """Every state tensor against the shape torch gives it for its parameter, as
    :mod:`optckpt.optim.specs` declares it (LBFGS's flat vectors: all parameters' size)."""
    wrong = []
    checked = 0
    total = sum(p.numel() for p in params.by_id.values())
    for pid, p in params.by_id.items():
        s = state.get(pid)
        if not isinstance(s, Mapping):
            continue
        shape = tuple(p.shape)
        checked += sum(
            isinstance(v, torch.Tensor)
            and expected_state_shape(optimizer_name, k, shape, total) is not None
            for k, v in s.items()
        )
        for key, found, want in state_mismatches(optimizer_name, s, shape, total):
            wrong.append(
                f"{key} of {param_label(pid, params.names)} is {list(found)}, expected {list(want)}"
            )
    if wrong:
        return Check("shapes", False, short_list(wrong))
    return Check("shapes", True, f"{checked} state tensor(s) fit their parameters")


def steps_of(state: Mapping[Any, Any], ids: Iterable[Any]) -> dict[Any, float]:
    found = {}
    for pid in ids:
        s = state.get(pid)
        if isinstance(s, Mapping) and "step" in s:
            value = s["step"]
            found[pid] = float(value.item() if isinstance(value, torch.Tensor) else value)
    return found


def check_loads(state_dict: Mapping[str, Any], ids: list[list[Any]], name: str) -> Check:
    """The state loaded (group count and sizes fit); state under keys that are no parameter's
    ID fails: torch keeps it on load but no parameter ever uses it (a JSON round trip that
    made the IDs strings, say), so those moments would silently restart."""
    known = {pid for group in ids for pid in group}
    orphans = [key for key in state_dict["state"] if key not in known]
    if orphans:
        listed = ", ".join(repr(k) for k in orphans[:5]) + (" ..." if len(orphans) > 5 else "")
        return Check("loads", False, f"state under {listed} belongs to no parameter of the groups")
    sizes = ", ".join(str(len(g)) for g in ids)
    return Check("loads", True, f"{len(ids)} group(s) of {sizes} parameter(s) into {name}")


def check_counters_agree(state_dict: Mapping[str, Any], params: Params) -> Check:
    groups = state_dict["param_groups"]
    steps = steps_of(state_dict["state"], params.by_id)
    if not steps:
        return Check("step_counters_agree", True, "no step counters in the state")
    problems, summary = [], []
    for index, group in enumerate(groups):
        values = [steps[pid] for pid in group["params"] if pid in steps]
        # NaN is no count, and NaN != NaN: give it one bucket of its own
        distinct = sorted({v for v in values if not math.isnan(v)})
        nan = sum(1 for v in values if math.isnan(v))
        if len(distinct) + bool(nan) > 1 or nan:
            counts = [f"{v:g} for {values.count(v)}" for v in distinct]
            counts += [f"nan for {nan}"] if nan else []
            problems.append(f"group {index}: step " + ", ".join(counts))
        elif distinct:
            summary.append(f"group {index}: {distinct[0]:g}")
    if problems:
        return Check("step_counters_agree", False, short_list(problems))
    without = len(params.by_id) - len(steps)
    extra = f" ({without} parameter(s) have no state yet)" if without else ""
    return Check("step_counters_agree", True, ", ".join(summary) + extra)


def _count_nonfinite(t: torch.Tensor) -> int:
    """How many elements of ``t`` are NaN or infinite (0 for non-floating tensors, for meta
    tensors, which hold no values, and for packed dtypes no reduction reads)."""
    if t.numel() == 0 or not (t.is_floating_point() or t.is_complex()):
        return 0
    if t.is_meta or not readable(t.dtype):
        return 0
    count = 0
    for chunk in chunks(t):  # bounded temporaries, any strides, float8 through float64
        values = reducible(chunk)
        # one pass without a temporary (NaN and infinities reach the min or max), then
        # count only where something is wrong
        low, high = torch.aminmax(torch.view_as_real(values) if values.is_complex() else values)
        if not (math.isfinite(float(low)) and math.isfinite(float(high))):
            count += int(values.numel() - torch.isfinite(values).sum().item())
    return count


def _nonfinite(tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    bad = []
    for label, t in tensors:
        count = _count_nonfinite(t)
        if count:
            bad.append(f"{label}: {count} non-finite value(s)")
    return bad


def _state_tensors(
    state: Mapping[Any, Any], names: Mapping[Any, str]
) -> Iterator[tuple[str, torch.Tensor]]:
    for pid, s in state.items():
        if isinstance(s, Mapping):
            for key, value in s.items():
                if isinstance(value, torch.Tensor):
                    yield f"{key} of {param_label(pid, names)}", value


def check_finite(
    name: str,
    state: Mapping[Any, Any],
    tensors: Mapping[Any, torch.Tensor],
    names: Mapping[Any, str],
) -> Check:
    bad = _nonfinite(
        [*((f"parameter {param_label(pid, names)}", t) for pid, t in tensors.items())]
    ) + _nonfinite(_state_tensors(state, names))
    if bad:
        return Check(name, False, short_list(bad))
    return Check(name, True, "parameters and state are finite")


def check_counters_advance(
    before: Mapping[Any, float], after: Mapping[Any, float], params: Params, steps: int
) -> Check:
    if not before and not after:
        return Check("step_counters_advance", True, "no step counters in the state")
    wrong = [
        f"{param_label(pid, params.names)}: {before.get(pid, 0.0):g} -> {after.get(pid, math.nan):g}"
        for pid in params.by_id
        if after.get(pid, math.nan) - before.get(pid, 0.0) != steps
    ]
    if wrong:
        return Check(
            "step_counters_advance", False, f"not advanced by {steps}: " + short_list(wrong)
        )
    return Check("step_counters_advance", True, f"every counter advanced by {steps}")
