"""Adamax, reimplemented to match ``torch.optim.Adamax`` (``torch/optim/adamax.py``) bit for bit.

Two implementations, picked per param group as torch picks them: a for-loop over tensors
(``foreach=False``, and the default on the CPU) and ``torch._foreach_*`` ops per device and
dtype (``foreach=True``). torch has no fused Adamax. Each runs torch's ops in torch's order; in
particular the bias correction is a Python float on the plain paths but a tensor of ``step``'s
dtype on the ``capturable`` ones, as in torch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from optckpt.optim._functional import (
    check_capturable_devices,
    check_foreach_not_differentiable,
    check_state_steps,
    for_loop_tensors,
    foreach_maximize_count_decay,
    run_foreach_or_for_loop,
)
from optckpt.optim._group_step import GroupStepOptimizer, newer_group_keys
from optckpt.optim.base import (
    Hyper,
    ParamsT,
    capturable_supported_devices,
    check_betas,
    check_lr,
    check_non_negative,
    get_value,
    group_tensors_by_device_and_dtype,
    to_scalar,
    view_as_real,
)

__all__ = ["Adamax", "adamax"]


def adamax(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_infs: list[Tensor],
    state_steps: list[Tensor],
    *,
    foreach: bool | None,
    differentiable: bool,
    **hyper: Any,
) -> None:
    """Pick the implementation as torch's functional ``adamax`` does, and run it."""
    check_state_steps(state_steps)
    tensor_lists = [params, grads, exp_avgs, exp_infs, state_steps]
    run_foreach_or_for_loop(
        _multi_tensor_adamax, _single_tensor_adamax, tensor_lists, foreach, differentiable, hyper
    )


def _single_tensor_adamax(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_infs: list[Tensor],
    state_steps: list[Tensor],
    *,
    eps: Hyper,
    beta1: Hyper,
    beta2: Hyper,
    lr: Hyper,
    weight_decay: Hyper,
    maximize: bool,
    differentiable: bool,
    capturable: bool,
    has_complex: bool,
) -> None:
    """One tensor at a time."""
    lr = to_scalar(lr)

    for _, param, grad, exp_avg, exp_inf, step_t in for_loop_tensors(
        params, grads, maximize, exp_avgs, exp_infs, state_steps
    ):
        if capturable:
            check_capturable_devices(capturable_supported_devices(), [param], [step_t])

        step_t += 1

        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)

        if torch.is_complex(param):
            param = torch.view_as_real(param)
            grad = torch.view_as_real(grad)
            exp_avg = torch.view_as_real(exp_avg)
            exp_inf = torch.view_as_real(exp_inf)

        # The biased first moment.
        exp_avg.lerp_(grad, 1 - beta1)
        # The exponentially weighted infinity norm.
        if not differentiable:
            torch.maximum(exp_inf.mul_(beta2), grad.abs().add_(eps), out=exp_inf)
        else:
            # maximum(..., out=) is not differentiable: torch stacks both and takes the amax.
            norm_buf = torch.cat(
                [exp_inf.mul_(beta2).unsqueeze(0), grad.abs().add_(eps).unsqueeze_(0)], 0
            )
            exp_inf.copy_(torch.amax(norm_buf, 0, keepdim=False))

        if capturable:
            # The bias correction as a tensor, negated so that addcdiv_ needs no value
            # (torch's workaround for pytorch/pytorch#121238).
            neg_bias_correction = beta1**step_t - 1
            neg_bias_correction.div_(lr)
            denom = exp_inf * neg_bias_correction
            param.addcdiv_(exp_avg, denom)
        else:
            bias_correction = 1 - beta1 ** get_value(step_t)
            clr = lr / bias_correction
            param.addcdiv_(exp_avg, exp_inf, value=-clr)


def _multi_tensor_adamax(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_infs: list[Tensor],
    state_steps: list[Tensor],
    *,
    eps: Hyper,
    beta1: Hyper,
    beta2: Hyper,
    lr: Hyper,
    weight_decay: Hyper,
    maximize: bool,
    differentiable: bool,
    capturable: bool,
    has_complex: bool,
) -> None:
    """foreach ops per (device, dtype) bucket."""
    check_foreach_not_differentiable(differentiable)
    if not params:
        return
    if capturable:
        check_capturable_devices(
            capturable_supported_devices(supports_xla=False), params, state_steps
        )
    lr = to_scalar(lr)

    buckets = group_tensors_by_device_and_dtype([params, grads, exp_avgs, exp_infs, state_steps])
    for bucket, _ in buckets.values():
        grouped_params, grouped_grads, grouped_exp_avgs, grouped_exp_infs = bucket[:4]
        grouped_state_steps = bucket[4]

        if has_complex:
            view_as_real(grouped_params, grouped_grads, grouped_exp_avgs, grouped_exp_infs)

        grouped_grads = foreach_maximize_count_decay(
            grouped_grads, grouped_params, grouped_state_steps, weight_decay, maximize
        )

        # The biased first moment.
        torch._foreach_lerp_(grouped_exp_avgs, grouped_grads, 1 - beta1)

        # The exponentially weighted infinity norm.
        torch._foreach_mul_(grouped_exp_infs, beta2)
        # abs in place only where the grads are already a copy (negated or decayed).
        if not maximize and weight_decay == 0:
            grouped_grads = torch._foreach_abs(grouped_grads)
        else:
            torch._foreach_abs_(grouped_grads)
        torch._foreach_add_(grouped_grads, eps)
        torch._foreach_maximum_(grouped_exp_infs, grouped_grads)

        if capturable:
            # The bias correction as tensors: (beta1^t - 1) / lr, with no host sync.
            bias_corrections = torch._foreach_pow(beta1, grouped_state_steps)
            torch._foreach_sub_(bias_corrections, 1)
            torch._foreach_div_(bias_corrections, lr)
            denom = torch._foreach_mul(grouped_exp_infs, bias_corrections)
            torch._foreach_addcdiv_(grouped_params, grouped_exp_avgs, denom)
        else:
            bias_corrections_f = [1 - beta1 ** get_value(step) for step in grouped_state_steps]
            step_size = [(get_value(lr) / bc) * -1 for bc in bias_corrections_f]
            torch._foreach_addcdiv_(grouped_params, grouped_exp_avgs, grouped_exp_infs, step_size)


class Adamax(GroupStepOptimizer):
    """Adamax (Adam with the infinity norm); ``torch.optim.Adamax``'s twin.

    Same arguments, defaults, validation, param-group keys and state (``step``, ``exp_avg``
    and ``exp_inf``) as torch's. ``step`` is a 0-dim float32 tensor (float64 under a float64
    default dtype) on the CPU, or on the parameter's device when the group is ``capturable``.

    Args:
        params: tensors, ``named_parameters()`` pairs, or param-group dicts.
        lr: learning rate, a float or a 1-element tensor.
        betas: coefficients of the running average and of the decayed infinity norm (stored
            as given, a tuple or a list).
        eps: term added to the denominator.
        weight_decay: L2 penalty.
        foreach: use the foreach implementation; ``None`` lets torch's rule decide (off on CPU).
        maximize: maximize the objective instead of minimizing it.
        differentiable: let autograd run through the step.
        capturable: keep ``step`` on the parameter's device for graph capture (CUDA and the
            like; stepping CPU parameters then fails, as in torch).

    Raises:
        ValueError: a negative ``lr``, ``eps`` or ``weight_decay``, a beta outside [0, 1), or
            a tensor ``lr`` with more than one element.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
    ) -> None:
        # Validation in torch's order, with torch's exception types.
        check_lr(lr)
        check_non_negative(eps, "Invalid epsilon value")
        check_betas(betas)
        check_non_negative(weight_decay, "Invalid weight_decay value")
        super().__init__(params, locals())

    _STATE_KEYS = "exp_avg exp_inf step"
    _SPARSE_ERROR = "Adamax does not support sparse gradients"
    _functional = staticmethod(adamax)

    # torch's __setstate__: the group keys older checkpoints lack, and a number step.
    _GROUP_KEY_DEFAULTS = newer_group_keys("foreach maximize differentiable capturable")
    _NUMBER_STATE_KEYS = ("step",)
