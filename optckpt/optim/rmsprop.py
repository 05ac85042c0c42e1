"""RMSprop, reimplemented to match ``torch.optim.RMSprop`` (``torch/optim/rmsprop.py``) bit for bit.

Two implementations, picked per param group as torch picks them: a for-loop over tensors
(``foreach=False``, and the default on the CPU) and ``torch._foreach_*`` ops per device and
dtype (``foreach=True``). torch has no fused RMSprop. Each runs torch's ops in torch's order.
``step`` is counted in the state but never enters the arithmetic.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from optckpt.optim._functional import (
    check_capturable_devices,
    check_foreach_not_differentiable,
    check_state_steps,
    foreach_maximize_count_decay,
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
    new_step,
    to_scalar,
    view_as_real,
)

__all__ = ["RMSprop", "rmsprop"]


def rmsprop(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    grad_avgs: list[Tensor],
    momentum_buffer_list: list[Tensor],
    state_steps: list[Tensor],
    *,
    foreach: bool | None,
    differentiable: bool,
    **hyper: Any,
) -> None:
    """Pick the implementation as torch's functional ``rmsprop`` does, and run it."""
    check_state_steps(state_steps)
    tensor_lists = [params, grads, square_avgs, grad_avgs, momentum_buffer_list, state_steps]
    run_foreach_or_for_loop(
        _multi_tensor_rmsprop, _single_tensor_rmsprop, tensor_lists, foreach, differentiable, hyper
    )


def _single_tensor_rmsprop(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    grad_avgs: list[Tensor],
    momentum_buffer_list: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: Hyper,
    alpha: Hyper,
    eps: Hyper,
    weight_decay: Hyper,
    momentum: Hyper,
    centered: bool,
    maximize: bool,
    differentiable: bool,
    capturable: bool,
    has_complex: bool,
) -> None:
    """One tensor at a time."""
    lr = to_scalar(lr)

    for i, param in enumerate(params):
        step = state_steps[i]

        if capturable:
            check_capturable_devices(capturable_supported_devices(), [param], [step])

        grad = grads[i]
        grad = grad if not maximize else -grad
        square_avg = square_avgs[i]

        step += 1

        # Weight decay before the complex view, as in torch.
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)

        is_complex_param = torch.is_complex(param)
        if is_complex_param:
            param = torch.view_as_real(param)
            grad = torch.view_as_real(grad)
            square_avg = torch.view_as_real(square_avg)

        square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)

        if centered:
            grad_avg = grad_avgs[i]
            if is_complex_param:
                grad_avg = torch.view_as_real(grad_avg)
            grad_avg.lerp_(grad, 1 - alpha)
            avg = square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
        else:
            avg = square_avg.sqrt()

        avg = avg.add(eps) if differentiable else avg.add_(eps)

        if momentum > 0:
            buf = momentum_buffer_list[i]
            if is_complex_param:
                buf = torch.view_as_real(buf)
            buf.mul_(momentum).addcdiv_(grad, avg)
            param.add_(buf, alpha=-lr)
        else:
            param.addcdiv_(grad, avg, value=-lr)


def _multi_tensor_rmsprop(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    grad_avgs: list[Tensor],
    momentum_buffer_list: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: Hyper,
    alpha: Hyper,
    eps: Hyper,
    weight_decay: Hyper,
    momentum: Hyper,
    centered: bool,
    maximize: bool,
    differentiable: bool,
    capturable: bool,
    has_complex: bool,
) -> None:
    """foreach ops per (device, dtype) bucket."""
    if not params:
        return
    check_foreach_not_differentiable(differentiable)
    if capturable:
        # torch's RMSprop lists XLA here, unlike its other foreach optimizers.
        check_capturable_devices(capturable_supported_devices(), params, state_steps)

    lr = to_scalar(lr)
    buckets = group_tensors_by_device_and_dtype(
        [params, grads, square_avgs, grad_avgs, momentum_buffer_list, state_steps]
    )
    for bucket, _ in buckets.values():
        device_params, device_grads, device_square_avgs = bucket[:3]
        device_grad_avgs, device_momentum_buffers, device_state_steps = bucket[3:]

        if has_complex:
            state_and_grads = [device_grads, device_square_avgs]
            if momentum > 0:
                state_and_grads.append(device_momentum_buffers)
            if centered:
                state_and_grads.append(device_grad_avgs)
            view_as_real(device_params, *state_and_grads)

        device_grads = foreach_maximize_count_decay(
            device_grads, device_params, device_state_steps, weight_decay, maximize
        )

        torch._foreach_mul_(device_square_avgs, alpha)
        torch._foreach_addcmul_(device_square_avgs, device_grads, device_grads, value=1 - alpha)

        if centered:
            torch._foreach_lerp_(device_grad_avgs, device_grads, 1 - alpha)
            avg = torch._foreach_addcmul(
                device_square_avgs, device_grad_avgs, device_grad_avgs, value=-1
            )
            torch._foreach_sqrt_(avg)
            torch._foreach_add_(avg, eps)
        else:
            avg = torch._foreach_sqrt(device_square_avgs)
            torch._foreach_add_(avg, eps)

        # A tensor lr under capture multiplies as a tensor: a number ``alpha``/``value`` would
        # read it with .item() once, at capture time.
        if momentum > 0:
            torch._foreach_mul_(device_momentum_buffers, momentum)
            torch._foreach_addcdiv_(device_momentum_buffers, device_grads, avg)
            if capturable and isinstance(lr, Tensor):
                momentum_lr = torch._foreach_mul(device_momentum_buffers, -lr)
                torch._foreach_add_(device_params, momentum_lr)
            else:
                torch._foreach_add_(device_params, device_momentum_buffers, alpha=-lr)
        elif capturable and isinstance(lr, Tensor):
            torch._foreach_div_(avg, -lr)
            torch._foreach_addcdiv_(device_params, device_grads, avg)
        else:
            torch._foreach_addcdiv_(device_params, device_grads, avg, value=-lr)


class RMSprop(GroupStepOptimizer):
    """RMSprop, optionally centered and with momentum; ``torch.optim.RMSprop``'s twin.

    Same arguments (all positional-or-keyword, as in torch), defaults, validation,
    param-group keys and state (``step``, ``square_avg``, ``momentum_buffer`` when
    ``momentum > 0`` and ``grad_avg`` when ``centered``) as torch's. ``step`` is a 0-dim
    float32 tensor (float64 under a float64 default dtype) on the CPU, or on the parameter's
    device when the group is ``capturable``.

    Args:
        params: tensors, ``named_parameters()`` pairs, or param-group dicts.
        lr: learning rate, a float or a 1-element tensor.
        alpha: smoothing constant of the squared-gradient average.
        eps: term added to the denominator.
        weight_decay: L2 penalty.
        momentum: momentum factor.
        centered: normalize by the estimated variance of the gradient instead of its second
            moment.
        capturable: keep ``step`` on the parameter's device for graph capture (CUDA and the
            like; stepping CPU parameters then fails, as in torch).
        foreach: use the foreach implementation; ``None`` lets torch's rule decide (off on CPU).
        maximize: maximize the objective instead of minimizing it.
        differentiable: let autograd run through the step.

    Raises:
        ValueError: a negative ``lr``, ``eps``, ``momentum``, ``weight_decay`` or ``alpha``,
            or a tensor ``lr`` with more than one element.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
    ) -> None:
        # Validation in torch's order, with torch's exception types (alpha is only checked
        # for being non-negative, as in torch).
        check_lr(lr)
        check_non_negative(eps, "Invalid epsilon value")
        check_non_negative(momentum, "Invalid momentum value")
        check_non_negative(weight_decay, "Invalid weight_decay value")
        check_non_negative(alpha, "Invalid alpha value")

        super().__init__(params, locals())

    _STATE_KEYS = "square_avg grad_avg momentum_buffer step"
    _functional = staticmethod(rmsprop)

    # torch's __setstate__: the group keys older checkpoints lack, and a number step.
    _GROUP_KEY_DEFAULTS = newer_group_keys(
        "momentum centered foreach maximize differentiable capturable"
    )
    _NUMBER_STATE_KEYS = ("step",)

    def _init_group(
        self,
        group: dict[str, Any],
        params_with_grad: list[Tensor],
        grads: list[Tensor],
        square_avgs: list[Tensor],
        grad_avgs: list[Tensor],
        momentum_buffer_list: list[Tensor],
        state_steps: list[Tensor],
    ) -> bool:
        sparse_error = "RMSprop does not support sparse gradients"
        for p, _, state in self._params_with_grad(group, params_with_grad, grads, sparse_error):
            if len(state) == 0:
                state["step"] = new_step(0.0, p, group)
                state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["momentum"] > 0:
                    state["momentum_buffer"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
                if group["centered"]:
                    state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            square_avgs.append(state["square_avg"])
            state_steps.append(state["step"])
            # Like torch, a group whose momentum or centered changed after the state was made
            # fails here with a KeyError.
            if group["momentum"] > 0:
                momentum_buffer_list.append(state["momentum_buffer"])
            if group["centered"]:
                grad_avgs.append(state["grad_avg"])
        return any(torch.is_complex(p) for p in params_with_grad)
