"""Adadelta, reimplemented to match ``torch.optim.Adadelta`` (``torch/optim/adadelta.py``) bit for bit.

Two implementations, picked per param group as torch picks them: a for-loop over tensors
(``foreach=False``, and the default on the CPU) and ``torch._foreach_*`` ops per device and
dtype (``foreach=True``). torch has no fused Adadelta. Each runs torch's ops in torch's order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from optckpt.optim._functional import (
    check_capturable_devices,
    check_foreach_not_differentiable,
    check_state_steps,
    foreach_add_weight_decay,
    increment_steps,
    run_foreach_or_for_loop,
)
from optckpt.optim._group_step import GroupStepOptimizer, newer_group_keys
from optckpt.optim.base import (
    Hyper,
    ParamsT,
    capturable_supported_devices,
    check_lr,
    check_non_negative,
    group_tensors_by_device_and_dtype,
    to_scalar,
    view_as_real,
)

__all__ = ["Adadelta", "adadelta"]


def adadelta(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    acc_deltas: list[Tensor],
    state_steps: list[Tensor],
    *,
    foreach: bool | None,
    differentiable: bool,
    **hyper: Any,
) -> None:
    """Pick the implementation as torch's functional ``adadelta`` does, and run it."""
    check_state_steps(state_steps)
    tensor_lists = [params, grads, square_avgs, acc_deltas, state_steps]
    run_foreach_or_for_loop(
        _multi_tensor_adadelta,
        _single_tensor_adadelta,
        tensor_lists,
        foreach,
        differentiable,
        hyper,
    )


def _single_tensor_adadelta(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    acc_deltas: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: Hyper,
    rho: Hyper,
    eps: Hyper,
    weight_decay: Hyper,
    maximize: bool,
    differentiable: bool,
    capturable: bool,
    has_complex: bool,
) -> None:
    """One tensor at a time."""
    if capturable:
        check_capturable_devices(
            capturable_supported_devices(supports_xla=False), params, state_steps
        )
    lr = to_scalar(lr)

    for param, grad, square_avg, acc_delta, step in zip(
        params, grads, square_avgs, acc_deltas, state_steps, strict=True
    ):
        step += 1
        grad = grad if not maximize else -grad

        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)

        is_complex = torch.is_complex(param)
        if is_complex:
            square_avg = torch.view_as_real(square_avg)
            acc_delta = torch.view_as_real(acc_delta)
            grad = torch.view_as_real(grad)

        square_avg.mul_(rho).addcmul_(grad, grad, value=1 - rho)
        std = square_avg.add(eps).sqrt_()
        delta = acc_delta.add(eps).sqrt_()
        if differentiable:
            # sqrt_'s output is needed by autograd; the in-place div_ below goes to a copy.
            delta = delta.clone()
        delta.div_(std).mul_(grad)
        acc_delta.mul_(rho).addcmul_(delta, delta, value=1 - rho)

        if is_complex:
            delta = torch.view_as_complex(delta)
        param.add_(delta, alpha=-lr)


def _multi_tensor_adadelta(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    acc_deltas: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: Hyper,
    rho: Hyper,
    eps: Hyper,
    weight_decay: Hyper,
    maximize: bool,
    differentiable: bool,
    capturable: bool,
    has_complex: bool,
) -> None:
    """foreach ops per (device, dtype) bucket."""
    check_foreach_not_differentiable(differentiable)
    if capturable:
        check_capturable_devices(
            capturable_supported_devices(supports_xla=False), params, state_steps
        )
    if not params:
        return
    lr = to_scalar(lr)

    buckets = group_tensors_by_device_and_dtype(
        [params, grads, square_avgs, acc_deltas, state_steps]
    )
    for bucket, _ in buckets.values():
        device_params, device_grads, device_square_avgs, device_acc_deltas = bucket[:4]
        device_state_steps = bucket[4]
        if has_complex:
            view_as_real(device_params, device_grads, device_square_avgs, device_acc_deltas)

        increment_steps(device_state_steps)

        if maximize:
            device_grads = torch._foreach_neg(device_grads)

        if weight_decay != 0:
            device_grads = foreach_add_weight_decay(
                device_grads, device_params, weight_decay, maximize
            )

        torch._foreach_mul_(device_square_avgs, rho)
        torch._foreach_addcmul_(device_square_avgs, device_grads, device_grads, value=1 - rho)

        std = torch._foreach_add(device_square_avgs, eps)
        torch._foreach_sqrt_(std)

        deltas = torch._foreach_add(device_acc_deltas, eps)
        torch._foreach_sqrt_(deltas)
        torch._foreach_div_(deltas, std)
        torch._foreach_mul_(deltas, device_grads)

        torch._foreach_mul_(device_acc_deltas, rho)
        torch._foreach_addcmul_(device_acc_deltas, deltas, deltas, value=1 - rho)

        # A tensor lr as alpha would be read on the host (item()), wrong under graph capture.
        if capturable and isinstance(lr, Tensor):
            torch._foreach_mul_(deltas, -lr)
            torch._foreach_add_(device_params, deltas)
        else:
            torch._foreach_add_(device_params, deltas, alpha=-lr)


class Adadelta(GroupStepOptimizer):
    """Adadelta; ``torch.optim.Adadelta``'s twin.

    Same arguments, defaults, validation, param-group keys and state (``step``,
    ``square_avg`` and ``acc_delta``) as torch's. ``step`` is a 0-dim float32 tensor (float64
    under a float64 default dtype) on the CPU, or on the parameter's device when the group is
    ``capturable``.

    Args:
        params: tensors, ``named_parameters()`` pairs, or param-group dicts.
        lr: coefficient that scales the delta before it is applied, a float or a 1-element
            tensor.
        rho: coefficient of the running averages of squared gradients and deltas.
        eps: term added to the denominator.
        weight_decay: L2 penalty.
        foreach: use the foreach implementation; ``None`` lets torch's rule decide (off on CPU).
        capturable: keep ``step`` on the parameter's device for graph capture (CUDA and the
            like; stepping CPU parameters then fails, as in torch).
        maximize: maximize the objective instead of minimizing it.
        differentiable: let autograd run through the step.

    Raises:
        ValueError: a negative ``lr``, ``eps`` or ``weight_decay``, ``rho`` outside [0, 1], or
            a tensor ``lr`` with more than one element.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1.0,
        rho: float = 0.9,
        eps: float = 1e-6,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        capturable: bool = False,
        maximize: bool = False,
        differentiable: bool = False,
    ) -> None:
        # Validation in torch's order, with torch's exception types.
        check_lr(lr)
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"Invalid rho value: {rho}")
        check_non_negative(eps, "Invalid epsilon value")
        check_non_negative(weight_decay, "Invalid weight_decay value")

        super().__init__(params, locals())

    _STATE_KEYS = "square_avg acc_delta step"
    _SPARSE_ERROR = "Adadelta does not support sparse gradients"
    _functional = staticmethod(adadelta)

    # torch's __setstate__: the group keys older checkpoints lack, and a number step.
    _GROUP_KEY_DEFAULTS = newer_group_keys("foreach maximize differentiable capturable")
    _NUMBER_STATE_KEYS = ("step",)
