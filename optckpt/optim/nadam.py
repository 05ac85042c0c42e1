"""NAdam, reimplemented to match ``torch.optim.NAdam`` (``torch/optim/nadam.py``) bit for bit.

Two implementations, picked per param group as torch picks them: a for-loop over tensors
(``foreach=False``, and the default on the CPU) and ``torch._foreach_*`` ops per device and
dtype (``foreach=True``). torch has no fused NAdam. Each runs torch's ops in torch's order. The
momentum cache ``mu`` and the bias correction are Python floats (float64) on the plain paths,
while the running product ``mu_product`` is state: a 0-dim tensor of ``step``'s dtype, so the
step sizes derived from it mix float32 tensor values with Python floats exactly as torch does.
"""

from __future__ import annotations

from collections.abc import Mapping
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
    new_step,
    to_scalar,
    view_as_real,
)

__all__ = ["NAdam", "nadam"]


def nadam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    mu_products: list[Tensor],
    state_steps: list[Tensor],
    *,
    foreach: bool | None,
    differentiable: bool,
    **hyper: Any,
) -> None:
    """Pick the implementation as torch's functional ``nadam`` does, and run it."""
    check_state_steps(state_steps)
    check_state_steps(mu_products, "mu_products")
    tensor_lists = [params, grads, exp_avgs, exp_avg_sqs, mu_products, state_steps]
    run_foreach_or_for_loop(
        _multi_tensor_nadam, _single_tensor_nadam, tensor_lists, foreach, differentiable, hyper
    )


def _single_tensor_nadam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    mu_products: list[Tensor],
    state_steps: list[Tensor],
    *,
    beta1: Hyper,
    beta2: Hyper,
    lr: Hyper,
    weight_decay: Hyper,
    momentum_decay: Hyper,
    eps: Hyper,
    decoupled_weight_decay: bool,
    maximize: bool,
    capturable: bool,
    differentiable: bool,
    has_complex: bool,
) -> None:
    """One tensor at a time."""
    lr = to_scalar(lr)

    for _, param, grad, exp_avg, exp_avg_sq, mu_product, step_t in for_loop_tensors(
        params, grads, maximize, exp_avgs, exp_avg_sqs, mu_products, state_steps
    ):
        # torch views complex tensors as real before its capturable check.
        if torch.is_complex(param):
            param = torch.view_as_real(param)
            grad = torch.view_as_real(grad)
            exp_avg = torch.view_as_real(exp_avg)
            exp_avg_sq = torch.view_as_real(exp_avg_sq)

        if capturable:
            check_capturable_devices(
                capturable_supported_devices(),
                [param],
                [mu_product],
                [step_t],
                names="params, mu_products and state_steps",
            )

        step_t += 1
        # A tensor step (capturable) keeps the schedule on the device; else Python floats.
        step: Hyper = step_t if capturable else get_value(step_t)

        bias_correction2 = 1 - beta2**step

        if weight_decay != 0:
            if decoupled_weight_decay:
                param.mul_(1 - lr * weight_decay)
            else:
                grad = grad.add(param, alpha=weight_decay)

        # The momentum cache mu_t and mu_{t+1}.
        mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))
        mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * momentum_decay)))

        mu_product *= mu

        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = exp_avg_sq.div(bias_correction2).sqrt()

        if differentiable or capturable:
            denom = denom.add(eps)
            # torch scales grad and exp_avg by tensors (autograd tracks them) instead of
            # passing addcdiv_ a number ``value``.
            mu_product_next = mu_product * mu_next
            grad = grad * (-lr * (1.0 - mu) / (1.0 - mu_product))
            exp_avg = exp_avg * (-lr * mu_next / (1.0 - mu_product_next))
            param.addcdiv_(grad, denom)
            param.addcdiv_(exp_avg, denom)
        else:
            mu_product_next = get_value(mu_product) * mu_next
            denom.add_(eps)
            param.addcdiv_(grad, denom, value=(-lr * (1.0 - mu) / (1.0 - get_value(mu_product))))
            param.addcdiv_(exp_avg, denom, value=(-lr * mu_next) / (1.0 - mu_product_next))


def _multi_tensor_nadam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    mu_products: list[Tensor],
    state_steps: list[Tensor],
    *,
    beta1: Hyper,
    beta2: Hyper,
    lr: Hyper,
    weight_decay: Hyper,
    momentum_decay: Hyper,
    eps: Hyper,
    decoupled_weight_decay: bool,
    maximize: bool,
    capturable: bool,
    differentiable: bool,
    has_complex: bool,
) -> None:
    """foreach ops per (device, dtype) bucket."""
    if not params:
        return
    check_foreach_not_differentiable(differentiable)
    if capturable:
        check_capturable_devices(
            capturable_supported_devices(supports_xla=False),
            params,
            mu_products,
            state_steps,
            names="params, mu_products, and state_steps",
        )

    lr = to_scalar(lr)
    buckets = group_tensors_by_device_and_dtype(
        [params, grads, exp_avgs, exp_avg_sqs, mu_products, state_steps]
    )
    for bucket, _ in buckets.values():
        device_params, device_grads, device_exp_avgs, device_exp_avg_sqs = bucket[:4]
        device_mu_products, device_state_steps = bucket[4], bucket[5]

        if has_complex:
            view_as_real(device_params, device_grads, device_exp_avgs, device_exp_avg_sqs)

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

        torch._foreach_lerp_(device_exp_avgs, device_grads, 1 - beta1)
        torch._foreach_mul_(device_exp_avg_sqs, beta2)
        torch._foreach_addcmul_(device_exp_avg_sqs, device_grads, device_grads, 1 - beta2)

        exp_avg_sq_sqrt = torch._foreach_sqrt(device_exp_avg_sqs)

        mus: Any
        mu_nexts: Any
        bias_correction_sqrt: Any
        if capturable:
            # mus = beta1 * (1 - 0.5 * 0.96 ** (step * momentum_decay)), as tensors.
            exponent = torch._foreach_mul(device_state_steps, momentum_decay)
            mus = torch._foreach_pow(0.96, exponent)
            torch._foreach_mul_(mus, -0.5)
            torch._foreach_add_(mus, 1.0)
            torch._foreach_mul_(mus, beta1)

            # mu_nexts = beta1 * (1 - 0.5 * 0.96 ** ((step + 1) * momentum_decay)).
            torch._foreach_add_(exponent, momentum_decay)
            mu_nexts = torch._foreach_pow(0.96, exponent)
            torch._foreach_mul_(mu_nexts, -0.5)
            torch._foreach_add_(mu_nexts, 1.0)
            torch._foreach_mul_(mu_nexts, beta1)
            del exponent

            bias_correction_sqrt = torch._foreach_pow(beta2, device_state_steps)
            torch._foreach_sub_(bias_correction_sqrt, 1.0)
            torch._foreach_neg_(bias_correction_sqrt)
            torch._foreach_sqrt_(bias_correction_sqrt)
        else:
            steps = [get_value(s) for s in device_state_steps]
            bias_correction_sqrt = [(1 - beta2**s) ** 0.5 for s in steps]
            mus = [beta1 * (1.0 - 0.5 * (0.96 ** (s * momentum_decay))) for s in steps]
            mu_nexts = [beta1 * (1.0 - 0.5 * (0.96 ** ((s + 1) * momentum_decay))) for s in steps]

        torch._foreach_mul_(device_mu_products, mus)

        torch._foreach_div_(exp_avg_sq_sqrt, bias_correction_sqrt)
        torch._foreach_add_(exp_avg_sq_sqrt, eps)
        del bias_correction_sqrt

        if capturable:
            # step_size_grads = -lr * (1 - mu) / (1 - mu_product), in mus' memory.
            torch._foreach_sub_(mus, 1.0)
            torch._foreach_mul_(mus, lr)
            denom = torch._foreach_sub(device_mu_products, 1.0)
            torch._foreach_neg_(denom)
            torch._foreach_div_(mus, denom)
            step_size_grads = mus
            del denom

            # step_size_expavg = -lr * mu_next / (1 - mu_product * mu_next), in mu_nexts'.
            denom = torch._foreach_mul(device_mu_products, mu_nexts)
            torch._foreach_mul_(mu_nexts, lr)
            torch._foreach_sub_(denom, 1.0)
            torch._foreach_div_(mu_nexts, denom)
            step_size_expavg = mu_nexts
            del denom

            numerator = torch._foreach_mul(step_size_grads, device_grads)
            torch._foreach_addcmul_(numerator, step_size_expavg, device_exp_avgs)
            torch._foreach_addcdiv_(device_params, numerator, exp_avg_sq_sqrt)
        else:
            # Python floats from the (float32) mu_product values, one per tensor.
            step_sizes_grads = [
                (get_value(lr) * (1.0 - mu) / (1.0 - get_value(mu_product))) * -1
                for mu_product, mu in zip(device_mu_products, mus, strict=True)
            ]
            step_sizes_expavg = [
                (get_value(lr) * mu_next / (1.0 - get_value(mu_product) * mu_next)) * -1
                for mu_product, mu_next in zip(device_mu_products, mu_nexts, strict=True)
            ]
            torch._foreach_addcdiv_(device_params, device_grads, exp_avg_sq_sqrt, step_sizes_grads)
            torch._foreach_addcdiv_(
                device_params, device_exp_avgs, exp_avg_sq_sqrt, step_sizes_expavg
            )


class NAdam(GroupStepOptimizer):
    """NAdam (Adam with Nesterov momentum); ``torch.optim.NAdam``'s twin.

    Same arguments, defaults, validation, param-group keys and state (``step``,
    ``mu_product``, ``exp_avg`` and ``exp_avg_sq``) as torch's. ``step`` and ``mu_product`` are
    0-dim float32 tensors (float64 under a float64 default dtype) on the CPU, or on the
    parameter's device when the group is ``capturable``.

    Args:
        params: tensors, ``named_parameters()`` pairs, or param-group dicts.
        lr: learning rate, a float or a 1-element tensor.
        betas: the running-average coefficients (stored as given).
        eps: term added to the denominator.
        weight_decay: L2 penalty (decoupled, as in AdamW, with ``decoupled_weight_decay``).
        momentum_decay: the momentum decay ``psi`` of the momentum cache schedule.
        decoupled_weight_decay: decay the weights directly (NAdamW) instead of through the
            gradient.
        foreach: use the foreach implementation; ``None`` lets torch's rule decide (off on CPU).
        maximize: maximize the objective instead of minimizing it.
        capturable: keep ``step`` and ``mu_product`` on the parameter's device for graph
            capture (CUDA and the like; stepping CPU parameters then fails, as in torch).
        differentiable: let autograd run through the step.

    Raises:
        ValueError: a negative ``lr``, ``eps``, ``weight_decay`` or ``momentum_decay``, a beta
            outside [0, 1), or a tensor ``lr`` with more than one element.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum_decay: float = 4e-3,
        decoupled_weight_decay: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        # Validation in torch's order, with torch's exception types. Unlike Adam, torch takes
        # a tensor lr with foreach=True here (the foreach path reads it with .item()).
        check_lr(lr)
        check_non_negative(eps, "Invalid epsilon value")
        check_betas(betas)
        check_non_negative(weight_decay, "Invalid weight_decay value")
        check_non_negative(momentum_decay, "Invalid momentum_decay value")

        super().__init__(params, locals())

    _STATE_KEYS = "exp_avg exp_avg_sq mu_product step"
    _SPARSE_ERROR = "NAdam does not support sparse gradients"
    _functional = staticmethod(nadam)

    # torch's __setstate__: the group keys older checkpoints lack; step and mu_product
    # saved as numbers become the tensors a fresh step would hold.
    _GROUP_KEY_DEFAULTS = newer_group_keys(
        "maximize foreach capturable differentiable decoupled_weight_decay"
    )
    _NUMBER_STATE_KEYS = ("step", "mu_product")

    def _init_state(
        self, p: Tensor, grad: Tensor, state: dict[str, Any], group: Mapping[str, Any]
    ) -> None:
        """torch's key order: step, mu_product (a step-like scalar that starts at 1), exp_avg,
        exp_avg_sq."""
        state["step"] = new_step(0.0, p, group)
        state["mu_product"] = new_step(1.0, p, group)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
