"""Seeded synthetic parameters and gradients, reproducible with plain torch.

``regenerate`` and ``resume-step`` drive the optimizers with these; anyone can rebuild them
without optckpt:

* **Parameters** (when no model weights are given): one generator,
  ``gen = torch.Generator().manual_seed(seed)``; every parameter in turn, in the order given
  (a layout's ``params`` order; for ``resume-step``, the optimizer's ID order), is
  ``torch.randn(shape, generator=gen, dtype=dtype)``.
* **Gradients**: a second generator, ``torch.Generator().manual_seed(seed + 1)``; before
  each step, every parameter the optimizer holds, group by group and in each group's order,
  draws ``torch.randn(p.shape, generator=gen, dtype=p.dtype)``.

``torch.randn`` draws only float16, bfloat16, float32, float64 and the complex dtypes on the
CPU; for any other dtype (the float8 family, integers) both draw float32 (complex64 for a
complex dtype) with the same generator and cast the values to the dtype.

Two optimizers take more than a dense gradient:

* ``SparseAdam`` takes sparse gradients: the same values as ``.to_sparse()``.
* ``LBFGS`` evaluates a closure several times per step: the values drawn for a step are
  targets ``t``, and the closure sets ``p.grad = p - t`` for every parameter and returns the
  loss ``sum(0.5 * (p - t).abs().double().pow(2).sum())``, whose gradient that is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from optckpt.seeds import MAX_SEED

__all__ = ["MAX_SEED", "Gradients", "seeded_parameters", "take_steps"]


def seeded_parameters(
    specs: Sequence[tuple[tuple[int, ...], torch.dtype]], seed: int
) -> list[torch.Tensor]:
    """Draw one tensor per ``(shape, dtype)``, in order, from a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return [_randn(shape, generator, dtype) for shape, dtype in specs]


# The dtypes torch.randn draws on the CPU; others are drawn in float32 and cast.
_DRAWABLE = frozenset(
    {
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.complex32,
        torch.complex64,
        torch.complex128,
    }
)


def _randn(
    shape: Sequence[int] | torch.Size, generator: torch.Generator, dtype: torch.dtype
) -> torch.Tensor:
    if dtype in _DRAWABLE:
        return torch.randn(shape, generator=generator, dtype=dtype)
    wide = torch.complex64 if dtype.is_complex else torch.float32
    return torch.randn(shape, generator=generator, dtype=wide).to(dtype)


class Gradients:
    """The gradient stream of one run: seeded with ``seed + 1``, drawn step by step.

    Args:
        seed: the run's seed (the same one :func:`seeded_parameters` takes).
        kind: ``"dense"`` (default), ``"sparse"`` (SparseAdam) or ``"closure"`` (LBFGS);
            see the module doc (an optimizer's is :func:`optckpt.optim.specs.gradients_of`).
    """

    def __init__(self, seed: int, kind: str = "dense") -> None:
        if kind not in ("dense", "sparse", "closure"):
            raise ValueError(f"unknown gradient kind {kind!r}")
        self.kind = kind
        self._generator = torch.Generator().manual_seed(seed + 1)

    def draw(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One standard-normal tensor per parameter, with its shape and dtype, in order."""
        return [_randn(p.shape, self._generator, p.dtype) for p in params]

    def prepare(self, params: Sequence[torch.Tensor]) -> Callable[[], torch.Tensor] | None:
        """Draw this step's values and set up the step: the gradients, or LBFGS's closure.

        Returns:
            The closure to pass to ``step`` (``"closure"`` kind), else ``None`` after setting
            every ``p.grad``.
        """
        values = self.draw(params)
        if self.kind == "closure":
            return _quadratic_closure(params, values)
        for p, g in zip(params, values, strict=True):
            p.grad = g.to_sparse() if self.kind == "sparse" else g
        return None


def _quadratic_closure(
    params: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]
) -> Callable[[], torch.Tensor]:
    def closure() -> torch.Tensor:
        loss = torch.zeros((), dtype=torch.float64)
        for p, t in zip(params, targets, strict=True):
            diff = p.detach() - t
            p.grad = diff
            loss += 0.5 * diff.abs().double().pow(2).sum()
        return loss

    return closure


def take_steps(
    optimizer: Any,
    gradients: Gradients,
    steps: int,
    observe: Callable[[list[torch.Tensor]], None] | None = None,
) -> None:
    """Take ``steps`` steps of ``optimizer`` (optckpt's or torch's) on synthetic gradients.

    Gradients are drawn for the optimizer's parameters in its group order; ``observe``, if
    given, sees the parameters with their gradients set, before each step. The gradients are
    dropped after the last step.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for _ in range(steps):
        closure = gradients.prepare(params)
        if observe is not None and closure is None:
            observe(params)
        optimizer.step(closure)
    for p in params:
        p.grad = None
