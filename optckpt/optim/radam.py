"""RAdam, reimplemented to match ``torch.optim.RAdam`` (``torch/optim/radam.py``) bit for bit.

Two implementations, picked per param group as torch picks them: a for-loop over tensors
(``foreach=False``, and the default on the CPU) and ``torch._foreach_*`` ops per device and
dtype (``foreach=True``). torch has no fused RAdam. Each runs torch's ops in torch's order; the
two are not the same arithmetic (the for-loop divides ``exp_avg`` by the bias correction and
multiplies by the rectification, the foreach path folds everything into one per-tensor factor
applied with ``addcmul_``), so each is mirrored separately. The SMA length ``rho_t`` and the
rectification term are Python floats on the plain paths and tensors on the ``capturable`` ones.
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
    foreach_add_weight_decay,
    increment_steps,
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

__all__ = ["RAdam", "radam"]


def radam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    foreach: bool | None,
    differentiable: bool,
    **hyper: Any,
) -> None:
    """Pick the implementation as torch's functional ``radam`` does, and run it."""
    check_state_steps(state_steps)
    tensor_lists = [params, grads, exp_avgs, exp_avg_sqs, state_steps]
    run_foreach_or_for_loop(
        _multi_tensor_radam, _single_tensor_radam, tensor_lists, foreach, differentiable, hyper
    )


def _single_tensor_radam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    beta1: Hyper,
    beta2: Hyper,
    lr: Hyper,
    weight_decay: Hyper,
    eps: Hyper,
    decoupled_weight_decay: bool,
    differentiable: bool,
    maximize: bool,
    capturable: bool,
    has_complex: bool,
) -> None:
    """One tensor at a time."""
    lr = to_scalar(lr)

    for _, param, grad, exp_avg, exp_avg_sq, step_t in for_loop_tensors(
        params, grads, maximize, exp_avgs, exp_avg_sqs, state_steps
    ):
        if capturable:
            check_capturable_devices(capturable_supported_devices(), [param], [step_t])

        if torch.is_complex(param):
            param = torch.view_as_real(param)
            grad = torch.view_as_real(grad)
            exp_avg = torch.view_as_real(exp_avg)
            exp_avg_sq = torch.view_as_real(exp_avg_sq)

        step_t += 1
        step: Hyper = step_t if capturable else get_value(step_t)

        if weight_decay != 0:
            if decoupled_weight_decay:
                param.mul_(1 - lr * weight_decay)
            else:
                grad = grad.add(param, alpha=weight_decay)

        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step

        bias_corrected_exp_avg = exp_avg / bias_correction1

        # The maximum and the current length of the approximated SMA (torch's expressions,
        # evaluated in its order).
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * step * (beta2**step) / bias_correction2

        if capturable:
            update = torch.where(
                rho_t > 5.0,
                _compute_rect(rho_t, rho_inf)
                * _compute_adaptive_lr(exp_avg_sq, bias_correction2, eps, differentiable),
                1.0,
            )
            param.add_(bias_corrected_exp_avg * lr * update, alpha=-1.0)
        elif rho_t > 5.0:
            param.add_(
                bias_corrected_exp_avg
                * lr
                * _compute_adaptive_lr(exp_avg_sq, bias_correction2, eps, differentiable)
                * _compute_rect(rho_t, rho_inf),
                alpha=-1.0,
            )
        else:
            param.add_(bias_corrected_exp_avg * lr, alpha=-1.0)


def _compute_rect(rho_t: Hyper, rho_inf: float) -> Hyper:
    """The variance rectification term (nested in torch's ``_single_tensor_radam``)."""
    return ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5


def _compute_adaptive_lr(
    exp_avg_sq: Tensor, bias_correction2: Hyper, eps: Hyper, differentiable: bool
) -> Tensor:
    """sqrt(1 - beta2^t) / (sqrt(v) + eps) (nested in torch's ``_single_tensor_radam``)."""
    exp_avg_sq_sqrt = exp_avg_sq.sqrt()
    exp_avg_sq_sqrt = exp_avg_sq_sqrt.add(eps) if differentiable else exp_avg_sq_sqrt.add_(eps)
    rect: Tensor = (bias_correction2**0.5) / exp_avg_sq_sqrt
    return rect


def _multi_tensor_radam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    beta1: Hyper,
    beta2: Hyper,
    lr: Hyper,
    weight_decay: Hyper,
    eps: Hyper,
    decoupled_weight_decay: bool,
    differentiable: bool,
    maximize: bool,
    capturable: bool,
    has_complex: bool,
) -> None:
    """foreach ops per (device, dtype) bucket."""
    if not params:
        return
    check_foreach_not_differentiable(differentiable)
    if capturable:
        check_capturable_devices(
            capturable_supported_devices(supports_xla=False), params, state_steps
        )

    lr = to_scalar(lr)
    buckets = group_tensors_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs, state_steps])
    for bucket, _ in buckets.values():
        device_params, device_grads, device_exp_avgs, device_exp_avg_sqs = bucket[:4]
        device_state_steps = bucket[4]

        increment_steps(device_state_steps)

        if has_complex:
            view_as_real(device_params, device_grads, device_exp_avgs, device_exp_avg_sqs)

        if maximize:
            device_grads = torch._foreach_neg(device_grads)

        rho_inf = 2 / (1 - beta2) - 1
        bias_correction1: Any
        bias_correction2: Any
        rho_t_list: Any
        if capturable:
            # rho_t = rho_inf - 2 t beta2^t / (1 - beta2^t), as tensors.
            bias_correction1 = torch._foreach_pow(beta2, device_state_steps)
            torch._foreach_neg_(bias_correction1)
            torch._foreach_add_(bias_correction1, 1)
            bias_correction2 = torch._foreach_pow(beta2, device_state_steps)
            torch._foreach_mul_(bias_correction2, device_state_steps)
            torch._foreach_mul_(bias_correction2, 2)
            torch._foreach_div_(bias_correction2, bias_correction1)
            torch._foreach_neg_(bias_correction2)
            torch._foreach_add_(bias_correction2, rho_inf)
            rho_t_list = bias_correction2
        else:
            rho_t_list = [
                rho_inf
                - 2 * get_value(step) * (beta2 ** get_value(step)) / (1 - beta2 ** get_value(step))
                for step in device_state_steps
            ]

        if weight_decay != 0:
            if decoupled_weight_decay:
                torch._foreach_mul_(device_params, 1 - lr * weight_decay)
            else:
                device_grads = foreach_add_weight_decay(
                    device_grads, device_params, weight_decay, maximize
                )

        torch._foreach_lerp_(device_exp_avgs, device_grads, 1 - beta1)
        torch._foreach_mul_(device_exp_avg_sqs, beta2)
        torch._foreach_addcmul_(device_exp_avg_sqs, device_grads, device_grads, 1 - beta2)
        del device_grads

        rects: list[Any]
        unrect_step_size: Any
        if capturable:
            num = torch._foreach_sub(rho_t_list, 4)
            sub2 = torch._foreach_sub(rho_t_list, 2)
            torch._foreach_mul_(num, sub2)
            del sub2
            torch._foreach_mul_(num, rho_inf)
            rho_inf = (rho_inf - 4) * (rho_inf - 2)
            denom = torch._foreach_mul(rho_t_list, rho_inf)
            torch._foreach_div_(num, denom)
            del denom
            torch._foreach_sqrt_(num)

            # torch has no foreach where: one torch.where per tensor.
            rects = [
                torch.where(rho_t > 5.0, n, 0.0) for n, rho_t in zip(num, rho_t_list, strict=True)
            ]
            del num, rho_t_list
            unrect_step_size = [torch.where(rect > 0, 0.0, 1.0) for rect in rects]
            torch._foreach_mul_(unrect_step_size, lr)

            bias_correction1 = torch._foreach_pow(beta1, device_state_steps)
            torch._foreach_neg_(bias_correction1)
            torch._foreach_add_(bias_correction1, 1)

            torch._foreach_div_(unrect_step_size, bias_correction1)
            torch._foreach_neg_(unrect_step_size)

            bias_correction2 = torch._foreach_pow(beta2, device_state_steps)
            torch._foreach_neg_(bias_correction2)
            torch._foreach_add_(bias_correction2, 1)
            torch._foreach_sqrt_(bias_correction2)
            torch._foreach_mul_(bias_correction2, lr)
            torch._foreach_mul_(bias_correction2, rects)
            del rects
            torch._foreach_neg_(bias_correction2)
            torch._foreach_div_(bias_correction2, bias_correction1)
            del bias_correction1
        else:
            # Python numbers per tensor (tensors with a tensor lr); the int 0 of an
            # unrectified step is torch's too.
            rects = [
                ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
                ** 0.5
                if rho_t > 5
                else 0
                for rho_t in rho_t_list
            ]
            unrectified = [0 if rect > 0 else 1.0 for rect in rects]
            bias_correction1 = [1 - beta1 ** get_value(step) for step in device_state_steps]
            unrect_step_size = [
                (lr * rect / bc) * -1
                for rect, bc in zip(unrectified, bias_correction1, strict=True)
            ]
            bias_correction2 = [
                ((1 - beta2 ** get_value(step)) ** 0.5) * (lr * rect / bc) * -1
                for step, rect, bc in zip(device_state_steps, rects, bias_correction1, strict=True)
            ]

        # buffer = sqrt(1 - beta2^t) * rect_step_size / (sqrt(v) + eps) + unrect_step_size
        buffer = torch._foreach_sqrt(device_exp_avg_sqs)
        torch._foreach_add_(buffer, eps)
        torch._foreach_div_(buffer, bias_correction2)
        torch._foreach_reciprocal_(buffer)
        torch._foreach_add_(buffer, unrect_step_size)
        torch._foreach_addcmul_(device_params, device_exp_avgs, buffer)


class RAdam(GroupStepOptimizer):
    """RAdam (Adam with a rectified adaptive learning rate); ``torch.optim.RAdam``'s twin.

    Same arguments, defaults, validation, param-group keys and state (``step``, ``exp_avg``
    and ``exp_avg_sq``) as torch's. ``step`` is a 0-dim float32 tensor (float64 under a
    float64 default dtype) on the CPU, or on the parameter's device when the group is
    ``capturable``.

    Args:
        params: tensors, ``named_parameters()`` pairs, or param-group dicts.
        lr: learning rate, a float or a 1-element tensor.
        betas: the running-average coefficients (stored as given).
        eps: term added to the denominator.
        weight_decay: L2 penalty (decoupled, as in AdamW, with ``decoupled_weight_decay``).
        decoupled_weight_decay: decay the weights directly instead of through the gradient.
        foreach: use the foreach implementation; ``None`` lets torch's rule decide (off on CPU).
        maximize: maximize the objective instead of minimizing it.
        capturable: keep ``step`` on the parameter's device for graph capture (CUDA and the
            like; stepping CPU parameters then fails, as in torch).
        differentiable: let autograd run through the step.

    Raises:
        ValueError: a negative ``lr``, ``eps`` or ``weight_decay``, a beta outside [0, 1), or
            a tensor ``lr`` with more than one element.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        decoupled_weight_decay: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        # Validation in torch's order, with torch's exception types.
        check_lr(lr)
        check_non_negative(eps, "Invalid epsilon value")
        check_betas(betas)
        check_non_negative(weight_decay, "Invalid weight_decay value")

        super().__init__(params, locals())

    _STATE_KEYS = "exp_avg exp_avg_sq step"
    _SPARSE_ERROR = "RAdam does not support sparse gradients"
    _functional = staticmethod(radam)

    # torch's __setstate__: the group keys older checkpoints lack, and a number step.
    _GROUP_KEY_DEFAULTS = newer_group_keys(
        "foreach maximize differentiable decoupled_weight_decay capturable"
    )
    _NUMBER_STATE_KEYS = ("step",)
