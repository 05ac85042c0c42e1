"""Adam, reimplemented to match ``torch.optim.Adam`` (``torch/optim/adam.py``) bit for bit.

Three implementations, picked per param group as torch picks them: a for-loop over tensors
(``foreach=False``, and the default on the CPU), ``torch._foreach_*`` ops per device and dtype
(``foreach=True``), and torch's fused ATen kernels ``torch._fused_adam_`` /
``torch._fused_adamw_`` (``fused=True``). Each runs torch's ops in torch's order; in
particular the bias corrections are Python floats (float64) on the plain paths but tensors of
``step``'s dtype (float32) on the ``capturable`` and ``differentiable`` paths, as in torch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from optckpt.optim._functional import (
    check_capturable_devices,
    check_foreach_not_differentiable,
    check_no_grad_scale,
    check_state_steps,
    for_loop_tensors,
    foreach_add_weight_decay,
    fused_step,
    increment_steps,
)
from optckpt.optim._group_step import GroupStepOptimizer, newer_group_keys
from optckpt.optim.base import (
    Hyper,
    ParamsT,
    capturable_supported_devices,
    check_betas,
    check_lr,
    check_non_negative,
    default_to_fused_or_foreach,
    device_dtype_check_for_fused,
    get_value,
    group_tensors_by_device_and_dtype,
    new_step,
    to_scalar,
    view_as_real,
)

__all__ = ["Adam", "adam"]


def adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    foreach: bool | None,
    fused: bool | None,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    lr: Hyper,
    capturable: bool,
    differentiable: bool,
    **hyper: Any,
) -> None:
    """Pick the implementation as torch's functional ``adam`` does, and run it.

    With neither ``foreach`` nor ``fused`` set, torch's default rule decides (foreach on CUDA,
    except with a tensor ``lr`` and ``capturable=False``; the for-loop on the CPU). fused wins
    over foreach when a group asks for both.
    """
    if fused is None and foreach is None:
        _, foreach = default_to_fused_or_foreach(params, differentiable, use_fused=False)
        if foreach and isinstance(lr, Tensor) and not capturable:
            foreach = False
    check_state_steps(state_steps)
    if fused:
        impl = _fused_adam
    elif foreach:
        impl = _multi_tensor_adam
    else:
        impl = _single_tensor_adam
    impl(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        state_steps,
        grad_scale,
        found_inf,
        lr=lr,
        capturable=capturable,
        differentiable=differentiable,
        **hyper,
    )


def _single_tensor_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    *,
    amsgrad: bool,
    has_complex: bool,
    beta1: Hyper,
    beta2: Hyper,
    lr: Hyper,
    weight_decay: Hyper,
    eps: Hyper,
    maximize: bool,
    capturable: bool,
    differentiable: bool,
    decoupled_weight_decay: bool,
) -> None:
    """One tensor at a time."""
    check_no_grad_scale(grad_scale, found_inf)
    lr = to_scalar(lr)
    beta1 = to_scalar(beta1)
    beta2 = to_scalar(beta2)
    # A tensor beta1 is the lerp weight: torch moves it to each parameter's device and dtype
    # once, and keeps the copies.
    beta1_by_device_dtype = (
        {(beta1.device, beta1.dtype): beta1} if isinstance(beta1, Tensor) else None
    )

    for i, param, grad, exp_avg, exp_avg_sq, step_t in for_loop_tensors(
        params, grads, maximize, exp_avgs, exp_avg_sqs, state_steps
    ):
        if capturable:
            check_capturable_devices(capturable_supported_devices(), [param], [step_t])

        step_t += 1

        if weight_decay != 0:
            if decoupled_weight_decay:
                param.mul_(1 - lr * weight_decay)
            elif differentiable and isinstance(weight_decay, Tensor) and weight_decay.requires_grad:
                grad = grad.addcmul_(param.clone(), weight_decay)
            else:
                grad = grad.add(param, alpha=weight_decay)

        if torch.is_complex(param):
            grad = torch.view_as_real(grad)
            exp_avg = torch.view_as_real(exp_avg)
            exp_avg_sq = torch.view_as_real(exp_avg_sq)
            if amsgrad:
                max_exp_avg_sqs[i] = torch.view_as_real(max_exp_avg_sqs[i])
            param = torch.view_as_real(param)

        if beta1_by_device_dtype is not None:
            key = (param.device, param.dtype)
            if key not in beta1_by_device_dtype:
                beta1_by_device_dtype[key] = beta1.to(
                    device=param.device, dtype=param.dtype, non_blocking=True
                )
            device_beta1: Hyper = beta1_by_device_dtype[key]
        else:
            device_beta1 = beta1

        # The first and second moments.
        exp_avg.lerp_(grad, 1 - device_beta1)
        if differentiable and isinstance(beta2, Tensor) and beta2.requires_grad:
            # torch uses lerp here: addcmul's value cannot be a tensor that needs grad.
            exp_avg_sq.lerp_(torch.square(grad), weight=1 - beta2)
        else:
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

        if capturable or differentiable:
            # Bias corrections as tensors of step's dtype, never leaving the device.
            step = step_t
            if differentiable and isinstance(beta1, Tensor) and beta1.requires_grad:
                bias_correction1 = 1 - beta1 ** step.clone()
            else:
                bias_correction1 = 1 - beta1**step
            if differentiable and isinstance(beta2, Tensor) and beta2.requires_grad:
                bias_correction2 = 1 - beta2 ** step.clone()
            else:
                bias_correction2 = 1 - beta2**step

            step_size = lr / bias_correction1
            step_size_neg = step_size.neg()
            bias_correction2_sqrt = bias_correction2.sqrt()

            if amsgrad:
                max_exp_avg_sq = (
                    max_exp_avg_sqs[i].clone() if differentiable else max_exp_avg_sqs[i]
                )
                max_exp_avg_sqs[i].copy_(torch.maximum(max_exp_avg_sq, exp_avg_sq))
                second_moment = max_exp_avg_sqs[i]
            else:
                second_moment = exp_avg_sq
            # torch folds -step_size into the denominator: addcdiv_'s value must be a number.
            denom = (second_moment.sqrt() / (bias_correction2_sqrt * step_size_neg)).add_(
                eps / step_size_neg
            )
            param.addcdiv_(exp_avg.clone() if differentiable else exp_avg, denom)
        else:
            # Bias corrections as Python floats from the step's value.
            step = get_value(step_t)
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            step_size = lr / bias_correction1
            bias_correction2_sqrt = bias_correction2**0.5

            if amsgrad:
                torch.maximum(max_exp_avg_sqs[i], exp_avg_sq, out=max_exp_avg_sqs[i])
                denom = (max_exp_avg_sqs[i].sqrt() / bias_correction2_sqrt).add_(eps)
            else:
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            param.addcdiv_(exp_avg, denom, value=-step_size)

        if amsgrad and torch.is_complex(params[i]):
            max_exp_avg_sqs[i] = torch.view_as_complex(max_exp_avg_sqs[i])


def _multi_tensor_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    *,
    amsgrad: bool,
    has_complex: bool,
    beta1: Hyper,
    beta2: Hyper,
    lr: Hyper,
    weight_decay: Hyper,
    eps: Hyper,
    maximize: bool,
    capturable: bool,
    differentiable: bool,
    decoupled_weight_decay: bool,
) -> None:
    """foreach ops per (device, dtype) bucket."""
    if not params:
        return
    for what, hyper in (("lr", lr), ("beta1", beta1), ("beta2", beta2)):
        if isinstance(hyper, Tensor):
            if not capturable:
                # torch raises RuntimeError for lr but ValueError for the betas.
                error = RuntimeError if what == "lr" else ValueError
                raise error(
                    f"{what} as a Tensor is not supported for capturable=False and foreach=True"
                )
            if hyper.numel() != 1:
                raise ValueError(f"Tensor {what} must be 1-element")
    if capturable:
        check_capturable_devices(
            capturable_supported_devices(supports_xla=False), params, state_steps
        )
    check_no_grad_scale(grad_scale, found_inf)
    check_foreach_not_differentiable(differentiable)

    lr = to_scalar(lr)
    beta1 = to_scalar(beta1)
    beta2 = to_scalar(beta2)
    buckets = group_tensors_by_device_and_dtype(
        [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps]
    )
    # A tensor beta1 off the CPU is copied to each bucket's device once.
    beta1_by_device = (
        {beta1.device: beta1} if isinstance(beta1, Tensor) and str(beta1.device) != "cpu" else None
    )

    for bucket, _ in buckets.values():
        device_params, device_grads, device_exp_avgs, device_exp_avg_sqs = bucket[:4]
        device_max_exp_avg_sqs, device_state_steps = bucket[4], bucket[5]

        device = device_params[0].device
        if beta1_by_device is not None and device not in beta1_by_device:
            beta1_by_device[device] = beta1.to(device=device, non_blocking=True)
        device_beta1: Hyper = beta1_by_device[device] if beta1_by_device else beta1

        if has_complex:
            moments = [device_exp_avgs, device_exp_avg_sqs]
            if amsgrad:
                moments.append(device_max_exp_avg_sqs)
            view_as_real(device_params, device_grads, *moments)

        if maximize:
            device_grads = torch._foreach_neg(device_grads)

        increment_steps(device_state_steps)

        if weight_decay != 0:
            if decoupled_weight_decay:
                torch._foreach_mul_(device_params, 1 - lr * weight_decay)
            else:
                device_grads = foreach_add_weight_decay(
                    device_grads, device_params, weight_decay, maximize
                )

        torch._foreach_lerp_(device_exp_avgs, device_grads, 1 - device_beta1)
        torch._foreach_mul_(device_exp_avg_sqs, beta2)
        # _foreach_addcmul_ takes only a number as value: a tensor beta2 scales the grads first.
        if isinstance(beta2, Tensor):
            scaled_device_grads = torch._foreach_mul(device_grads, 1 - beta2)
            value: float = 1.0
        else:
            scaled_device_grads = device_grads
            value = 1 - beta2
        torch._foreach_addcmul_(device_exp_avg_sqs, scaled_device_grads, device_grads, value)
        del device_grads, scaled_device_grads

        if capturable:
            # Bias corrections as tensors: step_size = -lr / (1 - beta1^t) and
            # bias_correction2_sqrt = sqrt(1 - beta2^t), with no host sync.
            bias_correction1 = torch._foreach_pow(beta1, device_state_steps)
            bias_correction2 = torch._foreach_pow(beta2, device_state_steps)
            torch._foreach_sub_(bias_correction1, 1)
            torch._foreach_sub_(bias_correction2, 1)
            torch._foreach_neg_(bias_correction2)
            torch._foreach_div_(bias_correction1, lr)
            torch._foreach_reciprocal_(bias_correction1)
            torch._foreach_sqrt_(bias_correction2)
            step_size = bias_correction1
            bias_correction2_sqrt = bias_correction2

            exp_avg_sq_sqrt = _foreach_second_moment_sqrt(
                amsgrad, device_max_exp_avg_sqs, device_exp_avg_sqs
            )
            torch._foreach_div_(exp_avg_sq_sqrt, bias_correction2_sqrt)
            torch._foreach_add_(exp_avg_sq_sqrt, eps)
            torch._foreach_div_(exp_avg_sq_sqrt, step_size)
            torch._foreach_addcdiv_(device_params, device_exp_avgs, exp_avg_sq_sqrt)
        else:
            # Bias corrections as Python floats, one per tensor.
            steps = [get_value(s) for s in device_state_steps]
            bias_corrections1 = [1 - beta1**s for s in steps]
            bias_corrections2 = [1 - beta2**s for s in steps]
            step_sizes = [(lr / bc) * -1 for bc in bias_corrections1]
            bias_corrections2_sqrt = [bc**0.5 for bc in bias_corrections2]

            exp_avg_sq_sqrt = _foreach_second_moment_sqrt(
                amsgrad, device_max_exp_avg_sqs, device_exp_avg_sqs
            )
            torch._foreach_div_(exp_avg_sq_sqrt, bias_corrections2_sqrt)
            torch._foreach_add_(exp_avg_sq_sqrt, eps)
            torch._foreach_addcdiv_(device_params, device_exp_avgs, exp_avg_sq_sqrt, step_sizes)


def _foreach_second_moment_sqrt(
    amsgrad: bool, max_exp_avg_sqs: list[Tensor], exp_avg_sqs: list[Tensor]
) -> list[Tensor]:
    """sqrt of the second moment; with AMSGrad, of its running maximum (updated here)."""
    if amsgrad:
        torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
        return list(torch._foreach_sqrt(max_exp_avg_sqs))
    return list(torch._foreach_sqrt(exp_avg_sqs))


def _fused_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    *,
    amsgrad: bool,
    has_complex: bool,
    beta1: Hyper,
    beta2: Hyper,
    lr: Hyper,
    weight_decay: Hyper,
    eps: Hyper,
    maximize: bool,
    capturable: bool,
    differentiable: bool,
    decoupled_weight_decay: bool,
) -> None:
    """torch's fused kernels per (device, dtype) bucket.

    The arithmetic is the ATen kernel's own (``torch._fused_adam_``, or ``_fused_adamw_`` for
    decoupled weight decay): the CPU kernel's SIMD code (and its float64 scalar tail in
    float32) cannot be reproduced bit for bit with tensor ops, so fused parity comes from
    calling the same kernel. optckpt owns the bookkeeping around it.
    """
    if not params:
        return
    if differentiable:
        raise RuntimeError("Adam with fused=True does not support differentiable=True")
    beta1 = to_scalar(beta1)
    beta2 = to_scalar(beta2)
    kernel = torch._fused_adamw_ if decoupled_weight_decay else torch._fused_adam_
    fused_step(
        kernel,
        [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps],
        grad_scale,
        found_inf,
        lr,
        amsgrad=amsgrad,
        beta1=beta1,
        beta2=beta2,
        weight_decay=weight_decay,
        eps=eps,
        maximize=maximize,
    )


class Adam(GroupStepOptimizer):
    """Adam (and, with ``decoupled_weight_decay=True``, AdamW); ``torch.optim.Adam``'s twin.

    Same arguments, defaults, validation, param-group keys and state (``step``, ``exp_avg``,
    ``exp_avg_sq``, and ``max_exp_avg_sq`` with ``amsgrad``) as torch's. ``step`` is a 0-dim
    float32 tensor (float64 under a float64 default dtype) on the CPU, or on the parameter's
    device when the group is ``capturable`` or ``fused``.

    Args:
        params: tensors, ``named_parameters()`` pairs, or param-group dicts.
        lr: learning rate, a float or a 1-element tensor.
        betas: the running-average coefficients, both floats or both 1-element tensors.
        eps: term added to the denominator.
        weight_decay: L2 penalty (decoupled, as in AdamW, with ``decoupled_weight_decay``).
        amsgrad: use the AMSGrad variant.
        foreach: use the foreach implementation; ``None`` lets torch's rule decide (off on CPU).
        maximize: maximize the objective instead of minimizing it.
        capturable: keep ``step`` on the parameter's device for graph capture (CUDA and the
            like; stepping CPU parameters then fails, as in torch).
        differentiable: let autograd run through the step.
        fused: use torch's fused kernel.
        decoupled_weight_decay: decay the weights directly instead of through the gradient.

    Raises:
        ValueError: a negative ``lr``, ``eps`` or ``weight_decay``, a beta outside [0, 1),
            betas of mixed types, multi-element tensors, or a tensor ``lr`` or beta with
            ``foreach=True`` and ``capturable=False``.
        RuntimeError: ``fused`` together with ``differentiable`` or ``foreach``.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
    ) -> None:
        # Validation in torch's order, with torch's exception types.
        if isinstance(lr, Tensor) and foreach and not capturable:
            raise ValueError(
                "lr as a Tensor is not supported for capturable=False and foreach=True"
            )
        check_lr(lr)
        check_non_negative(eps, "Invalid epsilon value")
        check_betas(betas)
        check_non_negative(weight_decay, "Invalid weight_decay value")
        if not (
            (isinstance(betas[0], float) and isinstance(betas[1], float))
            or (isinstance(betas[0], Tensor) and isinstance(betas[1], Tensor))
        ):
            raise ValueError("betas must be either both floats or both Tensors")
        for index, beta in enumerate(betas):
            if isinstance(beta, Tensor):
                if not capturable and foreach:
                    raise ValueError(
                        f"betas[{index}] as a Tensor is not supported for capturable=False "
                        "and foreach=True"
                    )
                if beta.numel() != 1:
                    raise ValueError(f"Tensor betas[{index}] must be 1-element")
        betas = (to_scalar(betas[0]), to_scalar(betas[1]))

        super().__init__(params, locals())

        if fused:
            self._init_fused(differentiable, foreach)

    _STATE_KEYS = "exp_avg exp_avg_sq max_exp_avg_sq step"
    _GRAD_SCALER = True
    _functional = staticmethod(adam)

    # torch's __setstate__: the group keys older checkpoints lack, and a number step.
    _GROUP_KEY_DEFAULTS = newer_group_keys(
        "amsgrad maximize foreach capturable differentiable decoupled_weight_decay fused"
    )
    _NUMBER_STATE_KEYS = ("step",)

    def _init_group(
        self,
        group: dict[str, Any],
        params_with_grad: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        max_exp_avg_sqs: list[Tensor],
        state_steps: list[Tensor],
    ) -> bool:
        sparse_error = "Adam does not support sparse gradients, please consider SparseAdam instead"
        for p, _, state in self._params_with_grad(group, params_with_grad, grads, sparse_error):
            if len(state) == 0:
                if group["fused"]:
                    device_dtype_check_for_fused(p)
                state["step"] = new_step(0.0, p, group)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )

            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if group["amsgrad"]:
                max_exp_avg_sqs.append(state["max_exp_avg_sq"])
            if group["differentiable"] and state["step"].requires_grad:
                raise RuntimeError(
                    "`requires_grad` is not supported for `step` in differentiable mode"
                )
            # A group added or loaded later can carry a tensor lr past the constructor's check.
            if group["foreach"] and torch.is_tensor(group["lr"]) and not group["capturable"]:
                raise RuntimeError(
                    "lr as a Tensor is not supported for capturable=False and foreach=True"
                )
            state_steps.append(state["step"])
        return any(torch.is_complex(p) for p in params_with_grad)
