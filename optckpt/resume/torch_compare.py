"""The ``matches_torch`` check: the same steps by ``torch.optim`` from a fresh read, compared
with the bundled optimizer's result."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from optckpt.chunks import same_bits
from optckpt.optim.specs import gradients_of
from optckpt.resume.checks import param_label, short_list
from optckpt.resume.optimizer import STEP_ERRORS, build_optimizer, describe_error, uncapture
from optckpt.resume.report import Check
from optckpt.resume.source import Source
from optckpt.synthetic import Gradients, take_steps


def _same(a: Any, b: Any, atol: float | None) -> bool:
    """Equal: tensors within ``atol``, or without it bit for bit (:func:`~optckpt.chunks.
    same_bits`, the meaning of "bitwise" ``diff`` has too: -0.0 is not 0.0, NaNs with the same
    bits are equal); other values by ``==``, NaN equal to NaN."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if atol is not None and (a.is_floating_point() or a.is_complex()):
            return bool(torch.allclose(a, b, rtol=0.0, atol=atol, equal_nan=True))
        return same_bits(a, b)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k], atol) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y, atol) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


def _compare_with_torch(
    ours: Any, theirs: Any, names: Mapping[Any, str], atol: float | None
) -> list[str]:
    """Where the two optimizers disagree (parameters, state, hyperparameters)."""
    wrong = []
    mine, torch_sd = ours.state_dict(), theirs.state_dict()
    for index, (a, b) in enumerate(zip(ours.param_groups, theirs.param_groups, strict=True)):
        for p, q, pid in zip(
            a["params"],
            b["params"],
            mine["param_groups"][index]["params"],
            strict=True,
        ):
            if not _same(p.detach(), q.detach(), atol):
                wrong.append(f"parameter {param_label(pid, names)}")
    for index, (g, h) in enumerate(
        zip(mine["param_groups"], torch_sd["param_groups"], strict=True)
    ):
        if not _same(g, h, atol):
            keys = [k for k in g.keys() | h.keys() if not _same(g.get(k), h.get(k), atol)]
            wrong.append(f"group {index} hyperparameters {sorted(map(str, keys))}")
    for pid in mine["state"].keys() | torch_sd["state"].keys():
        s, t = mine["state"].get(pid, {}), torch_sd["state"].get(pid, {})
        for key in s.keys() | t.keys():
            if not _same(s.get(key), t.get(key), atol):
                wrong.append(f"{key} of {param_label(pid, names)}")
    return wrong


def matches_torch(
    source: Source, cls: type, ours: Any, names: Mapping[Any, str], steps: int, atol: float | None
) -> Check:
    """Take the same steps with ``torch.optim`` from a fresh read, compare with ``ours``."""
    fresh, found = source.read()
    state_dict = found.state_dict
    name = f"torch.optim.{cls.__name__}"
    try:
        theirs = build_optimizer(
            getattr(torch.optim, cls.__name__), source.parameters(fresh, state_dict), state_dict
        )
        theirs.load_state_dict(source.owned(state_dict))
        uncapture(theirs)
        take_steps(theirs, Gradients(source.seed, gradients_of(cls.__name__)), steps)
    except STEP_ERRORS as e:
        return Check("matches_torch", False, f"{name} failed: {describe_error(e)}")
    wrong = _compare_with_torch(ours, theirs, names, atol)
    how = "bitwise" if atol is None else f"within atol={atol:g}"
    if wrong:
        return Check("matches_torch", False, f"differs from {name} ({how}): " + short_list(wrong))
    return Check("matches_torch", True, f"parameters and state equal {name}'s, {how}")
