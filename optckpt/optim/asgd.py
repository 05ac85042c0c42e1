"""ASGD, reimplemented to match ``torch.optim.ASGD`` (``torch/optim/asgd.py``) bit for bit.

Two implementations, picked per param group as torch picks them: a for-loop over tensors
(``foreach=False``, and the default on the CPU) and ``torch._foreach_*`` ops per device and
dtype (``foreach=True``). torch has no fused ASGD. Each runs torch's ops in torch's order.

The two do not agree with each other in the last bits, because torch's do not: the for-loop
decays the parameter and then subtracts ``eta * grad``, while foreach subtracts
``eta * (grad + lambd * param)`` in one ``addcmul``. Each matches its torch counterpart.

The state holds three 0-dim tensors on the parameter's device (``step``, ``eta`` and ``mu``,
of torch's scalar dtype) besides the average ``ax``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from optckpt.optim._functional import (
    check_capturable_devices,
    check_foreach_not_differentiable,
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
    check_lr,
    check_non_negative,
    get_value,
    group_tensors_by_device_and_dtype,
    scalar_dtype,
    to_scalar,
    view_as_real,
)

__all__ = ["ASGD", "asgd"]


def asgd(
    params: list[Tensor],
    grads: list[Tensor],
    axs: list[Tensor],
    mus: list[Tensor],
    etas: list[Tensor],
    state_steps: list[Tensor],
    *,
    foreach: bool | None,
    differentiable: bool,
    **hyper: Any,
) -> None:
    """Pick the implementation as torch's functional ``asgd`` does, and run it.

    Unlike its siblings, torch's ``asgd`` does not check that the steps are tensors.
    """
    tensor_lists = [params, grads, axs, mus, etas, state_steps]
    run_foreach_or_for_loop(
        _multi_tensor_asgd, _single_tensor_asgd, tensor_lists, foreach, differentiable, hyper
    )


def _single_tensor_asgd(
    params: list[Tensor],
    grads: list[Tensor],
    axs: list[Tensor],
    mus: list[Tensor],
    etas: list[Tensor],
    state_steps: list[Tensor],
    *,
    lambd: Hyper,
    lr: Hyper,
    t0: Hyper,
    alpha: Hyper,
    weight_decay: Hyper,
    maximize: bool,
    differentiable: bool,
    capturable: bool,
    has_complex: bool,
) -> None:
    """One tensor at a time."""
    lr = to_scalar(lr)

    for _, param, grad, mu, ax, eta, step_t in for_loop_tensors(
        params, grads, maximize, mus, axs, etas, state_steps
    ):
        if capturable:
            check_capturable_devices(
                capturable_supported_devices(),
                [param],
                [mu],
                [eta],
                [step_t],
                names="params, mus, etas, and state_steps",
            )

        if torch.is_complex(param):
            grad = torch.view_as_real(grad)
            param = torch.view_as_real(param)
            ax = torch.view_as_real(ax)

        step_t += 1

        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)

        if capturable:
            param.mul_(1 - lambd * eta)
            param.addcmul_(grad, eta, value=-1)
        else:
            eta_value = get_value(eta)
            param.mul_(1 - lambd * eta_value)  # the decay term
            param.add_(grad, alpha=-eta_value)

        # Averaging; before t0 (mu == 1) the average is the parameter itself.
        if capturable or mu.item() != 1:
            ax.add_(param.sub(ax).mul_(mu))
        else:
            ax.copy_(param)

        if capturable:
            eta.copy_(lr / ((1 + lambd * lr * step_t) ** alpha))
            mu.copy_(1 / torch.maximum(step_t - t0, torch.ones_like(step_t)))
        else:
            # New eta and mu from Python floats, copied into the state tensors.
            step = get_value(step_t)
            eta.copy_(torch.as_tensor(lr / ((1 + lambd * lr * step) ** alpha)))
            mu.copy_(torch.as_tensor(1 / max(1, step - t0)))


def _multi_tensor_asgd(
    params: list[Tensor],
    grads: list[Tensor],
    axs: list[Tensor],
    mus: list[Tensor],
    etas: list[Tensor],
    state_steps: list[Tensor],
    *,
    lambd: Hyper,
    lr: Hyper,
    t0: Hyper,
    alpha: Hyper,
    weight_decay: Hyper,
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
        check_capturable_devices(
            capturable_supported_devices(supports_xla=False),
            params,
            mus,
            etas,
            state_steps,
            names="params, mus, etas, and state_steps",
        )
    lr = to_scalar(lr)

    buckets = group_tensors_by_device_and_dtype([params, grads, axs, mus, etas, state_steps])
    for (device, _), (bucket, _) in buckets.items():
        grouped_params, grouped_grads, grouped_axs = bucket[:3]
        grouped_mus, grouped_etas, grouped_state_steps = bucket[3:]

        if has_complex:
            view_as_real(grouped_params, grouped_grads, grouped_axs)

        if maximize:
            grouped_grads = torch._foreach_neg(grouped_grads)

        increment_steps(grouped_state_steps)

        # intermediate = grad (+ weight_decay * param) + lambd * param, so that
        # param * (1 - lambd * eta) - eta * grad becomes param - eta * intermediate.
        if weight_decay != 0:
            intermediate = foreach_add_weight_decay(
                grouped_grads, grouped_params, weight_decay, maximize
            )
            torch._foreach_add_(intermediate, grouped_params, alpha=lambd)
        else:
            intermediate = torch._foreach_add(grouped_grads, grouped_params, alpha=lambd)

        torch._foreach_addcmul_(grouped_params, intermediate, grouped_etas, value=-1)
        del intermediate

        # Averaging: ax += mu * (param - ax). torch uses no lerp here (its weight would have to
        # match the bucket's dtype).
        intermediate = torch._foreach_sub(grouped_params, grouped_axs)
        torch._foreach_addcmul_(grouped_axs, intermediate, grouped_mus)
        del intermediate

        if capturable:
            # mu = 1 / max(step - t0, 1)
            new_mus = torch._foreach_sub(grouped_state_steps, t0)
            torch._foreach_maximum_(new_mus, 1.0)
            torch._foreach_reciprocal_(new_mus)
            torch._foreach_copy_(grouped_mus, new_mus)
            del new_mus

            # eta = lr / ((1 + lambd * lr * step) ^ alpha)
            new_etas = torch._foreach_mul(grouped_state_steps, lambd)
            torch._foreach_mul_(new_etas, lr)
            torch._foreach_add_(new_etas, 1)
            torch._foreach_pow_(new_etas, alpha)
            torch._foreach_reciprocal_(new_etas)
            torch._foreach_mul_(new_etas, lr)
            torch._foreach_copy_(grouped_etas, new_etas)
        else:
            # eta from tensor arithmetic on the step (its dtype), mu from a Python float.
            new_eta_list = [
                torch.as_tensor(lr / ((1 + lambd * lr * step) ** alpha), device=device)
                for step in grouped_state_steps
            ]
            new_mu_list = [
                torch.as_tensor(1 / max(1, get_value(step) - t0), device=device)
                for step in grouped_state_steps
            ]
            torch._foreach_copy_(grouped_etas, new_eta_list)
            torch._foreach_copy_(grouped_mus, new_mu_list)


class ASGD(GroupStepOptimizer):
    """Averaged stochastic gradient descent; ``torch.optim.ASGD``'s twin.

    Same arguments (``foreach``, ``maximize``, ``differentiable`` and ``capturable`` are
    positional too, as in torch), defaults, validation, param-group keys and state (``step``,
    ``eta``, ``mu`` and ``ax``) as torch's. ``step``, ``eta`` and ``mu`` are 0-dim float32
    tensors (float64 under a float64 default dtype) on the parameter's device, whether or not
    the group is ``capturable``.

    Args:
        params: tensors, ``named_parameters()`` pairs, or param-group dicts.
        lr: learning rate, a float or a 1-element tensor.
        lambd: decay term.
        alpha: power for the ``eta`` update.
        t0: the step at which averaging starts.
        weight_decay: L2 penalty.
        foreach: use the foreach implementation; ``None`` lets torch's rule decide (off on CPU).
        maximize: maximize the objective instead of minimizing it.
        differentiable: let autograd run through the step.
        capturable: compute ``eta`` and ``mu`` on the device for graph capture (CUDA and the
            like; stepping CPU parameters then fails, as in torch).

    Raises:
        ValueError: a negative ``lr`` or ``weight_decay``, or a tensor ``lr`` with more than
            one element (``lambd``, ``alpha`` and ``t0`` are not checked, as in torch).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        lambd: float = 1e-4,
        alpha: float = 0.75,
        t0: float = 1e6,
        weight_decay: float = 0,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
    ) -> None:
        # Validation in torch's order, with torch's exception types.
        check_lr(lr)
        check_non_negative(weight_decay, "Invalid weight_decay value")

        super().__init__(params, locals())

    _STATE_KEYS = "ax mu eta step"
    _SPARSE_ERROR = "ASGD does not support sparse gradients"
    _functional = staticmethod(asgd)

    # torch's __setstate__: the group keys older checkpoints lack; step, eta and mu saved
    # as numbers become tensors.
    _GROUP_KEY_DEFAULTS = newer_group_keys("foreach maximize differentiable capturable")
    _NUMBER_STATE_KEYS = ("step", "eta", "mu")

    def _number_state_to_tensor(
        self, key: str, value: Any, p: Tensor, group: Mapping[str, Any]
    ) -> Tensor:
        """A tensor of torch's scalar dtype on the parameter's device, whether or not capturable.

        eta and mu are converted as they are (no ``float()``), as torch does.
        """
        return torch.tensor(
            float(value) if key == "step" else value, dtype=scalar_dtype(), device=p.device
        )

    def _init_state(
        self, p: Tensor, grad: Tensor, state: dict[str, Any], group: Mapping[str, Any]
    ) -> None:
        """Unlike most optimizers, torch puts the scalar state on the parameter's device even
        without capturable; eta starts at the group's lr."""
        state["step"] = torch.zeros((), device=p.device, dtype=scalar_dtype())
        state["eta"] = (
            torch.as_tensor(to_scalar(group["lr"]), device=p.device, dtype=scalar_dtype())
            .clone()
            .detach()
        )
        state["mu"] = torch.ones((), device=p.device, dtype=scalar_dtype())
        state["ax"] = torch.zeros_like(p, memory_format=torch.preserve_format)
