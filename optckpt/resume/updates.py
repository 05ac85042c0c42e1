"""How far each group's parameters moved over the steps (the report's ``groups``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from optckpt.optim.specs import spec_of
from optckpt.resume.report import GroupUpdate


def is_adaptive(optimizer: str) -> bool:
    """Whether the step size adapts per element: the report then gives an effective lr."""
    spec = spec_of(optimizer)
    return spec is not None and spec.adaptive


def _squares(t: torch.Tensor) -> float:
    """The sum of ``|x|^2`` over ``t``, accumulated in float64 without a float64 copy."""
    real = torch.view_as_real(t) if t.is_complex() else t
    return float(torch.linalg.vector_norm(real, dtype=torch.float64)) ** 2


@dataclass
class GradientSquares:
    """Sums of squared gradients per group, seen before each step (for the effective lr)."""

    group_of: dict[int, int]
    squares: list[float]
    count: list[int]

    def observe(self, tensors: list[torch.Tensor]) -> None:
        for p in tensors:
            assert p.grad is not None  # take_steps set every gradient
            g = p.grad.to_dense() if p.grad.is_sparse else p.grad
            i = self.group_of[id(p)]
            self.squares[i] += _squares(g)
            self.count[i] += g.numel()


def group_updates(
    optimizer: Any,
    ids: list[list[Any]],
    before: Mapping[Any, torch.Tensor],
    grad_squares: list[float],
    grad_count: list[int],
    steps: int,
    adaptive: bool,
) -> list[GroupUpdate]:
    result = []
    for index, group in enumerate(optimizer.param_groups):
        squares, numel, largest = 0.0, 0, 0.0
        for p, pid in zip(group["params"], ids[index], strict=True):
            change = p.detach() - before[pid]
            if change.numel():
                squares += _squares(change)
                largest = max(largest, float(change.abs().max()))
            numel += change.numel()
        rms = math.sqrt(squares / numel) if numel else 0.0
        grad_rms = math.sqrt(grad_squares[index] / grad_count[index]) if grad_count[index] else 0.0
        lr = group.get("lr")
        result.append(
            GroupUpdate(
                index=index,
                num_params=len(group["params"]),
                lr=float(lr) if isinstance(lr, (int, float, torch.Tensor)) else None,
                update_rms=rms,
                update_max=largest,
                effective_lr=rms / (steps * grad_rms) if adaptive and grad_rms else None,
            )
        )
    return result
