"""Rprop, reimplemented to match ``torch.optim.Rprop`` (``torch/optim/rprop.py``) bit for bit.

Two implementations, picked per param group as torch picks them: a for-loop over tensors
(``foreach=False``, and the default on the CPU) and ``torch._foreach_*`` ops per device and
dtype (``foreach=True``). torch has no fused Rprop. Each runs torch's ops in torch's order.
``lr`` only seeds each parameter's ``step_size`` state when that state is created; after that
the step sizes evolve by ``etas`` within ``step_sizes``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from optckpt.optim._functional import (
    check_capturable_devices,
    check_foreach_not_differentiable,
    check_state_steps,
    increment_steps,
    run_foreach_or_for_loop,
)
from optckpt.optim._group_step import GroupStepOptimizer, newer_group_keys
from optckpt.optim.base import (
    Hyper,
    ParamsT,
    capturable_supported_devices,
    check_lr,
    group_tensors_by_device_and_dtype,
    new_step,
    to_scalar,
    view_as_real,
)

__all__ = ["Rprop", "rprop"]


def rprop(
    params: list[Tensor],
    grads: list[Tensor],
    prevs: list[Tensor],
    step_sizes: list[Tensor],
    state_steps: list[Tensor],
    *,
    foreach: bool | None,
    differentiable: bool,
    **hyper: Any,
) -> None:
    """Pick the implementation as torch's functional ``rprop`` does, and run it."""
    check_state_steps(state_steps)
    tensor_lists = [params, grads, prevs, step_sizes, state_steps]
    run_foreach_or_for_loop(
        _multi_tensor_rprop, _single_tensor_rprop, tensor_lists, foreach, differentiable, hyper
    )


def _single_tensor_rprop(
    params: list[Tensor],
    grads: list[Tensor],
    prevs: list[Tensor],
    step_sizes: list[Tensor],
    state_steps: list[Tensor],
    *,
    step_size_min: Hyper,
    step_size_max: Hyper,
    etaminus: Hyper,
    etaplus: Hyper,
    maximize: bool,
    capturable: bool,
    differentiable: bool,
    has_complex: bool,
) -> None:
    """One tensor at a time."""
    for i, param in enumerate(params):
        grad = grads[i]
        grad = grad if not maximize else -grad
        prev = prevs[i]
        step_size = step_sizes[i]
        step = state_steps[i]

        if capturable:
            check_capturable_devices(capturable_supported_devices(), [param], [step])

        step += 1

        if torch.is_complex(param):
            grad = torch.view_as_real(grad)
            prev = torch.view_as_real(prev)
            param = torch.view_as_real(param)
            step_size = torch.view_as_real(step_size)
        sign = grad.mul(prev.clone()).sign() if differentiable else grad.mul(prev).sign()

        # The step size factors: etaplus where the grad kept its sign, etaminus where it
        # flipped, 1 where either is zero (torch.where under capture, masked writes else).
        if capturable:
            sign.copy_(torch.where(sign.gt(0), etaplus, sign))
            sign.copy_(torch.where(sign.lt(0), etaminus, sign))
            sign.copy_(torch.where(sign.eq(0), 1, sign))
        else:
            sign[sign.gt(0)] = etaplus
            sign[sign.lt(0)] = etaminus
            sign[sign.eq(0)] = 1

        step_size.mul_(sign).clamp_(step_size_min, step_size_max)

        # Where the sign flipped, forget the grad (no step now, and no flip seen next time).
        grad = grad.clone(memory_format=torch.preserve_format)
        if capturable:
            grad.copy_(torch.where(sign.eq(etaminus), 0, grad))
        else:
            grad[sign.eq(etaminus)] = 0

        param.addcmul_(grad.sign(), step_size, value=-1)
        prev.copy_(grad)


def _multi_tensor_rprop(
    params: list[Tensor],
    grads: list[Tensor],
    prevs: list[Tensor],
    step_sizes: list[Tensor],
    state_steps: list[Tensor],
    *,
    step_size_min: Hyper,
    step_size_max: Hyper,
    etaminus: Hyper,
    etaplus: Hyper,
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
        check_capturable_devices(capturable_supported_devices(), params, state_steps)

    buckets = group_tensors_by_device_and_dtype([params, grads, prevs, step_sizes, state_steps])
    for bucket, _ in buckets.values():
        device_params, device_grads, device_prevs, device_step_sizes = bucket[:4]
        device_state_steps = bucket[4]

        increment_steps(device_state_steps)

        if has_complex:
            view_as_real(device_params, device_grads, device_prevs, device_step_sizes)

        signs = torch._foreach_mul(device_grads, device_prevs)
        if maximize:
            torch._foreach_neg_(signs)

        # prev ends the step holding this step's (masked) grads: torch works in its memory.
        torch._foreach_copy_(device_prevs, device_grads)
        if maximize:
            torch._foreach_neg_(device_prevs)
        device_grads = device_prevs

        torch._foreach_sign_(signs)
        if capturable:
            for sign in signs:
                sign.copy_(torch.where(sign.gt(0), etaplus, sign))
                sign.copy_(torch.where(sign.lt(0), etaminus, sign))
                sign.copy_(torch.where(sign.eq(0), 1, sign))
        else:
            for sign in signs:
                sign[sign.gt(0)] = etaplus
                sign[sign.lt(0)] = etaminus
                sign[sign.eq(0)] = 1

        torch._foreach_mul_(device_step_sizes, signs)
        for step_size in device_step_sizes:
            step_size.clamp_(step_size_min, step_size_max)

        device_grads = list(device_grads)
        for i in range(len(device_grads)):
            device_grads[i].copy_(torch.where(signs[i].eq(etaminus), 0, device_grads[i]))
        del signs

        grad_signs = [grad.sign() for grad in device_grads]
        torch._foreach_addcmul_(device_params, grad_signs, device_step_sizes, value=-1)


class Rprop(GroupStepOptimizer):
    """Resilient backpropagation; ``torch.optim.Rprop``'s twin.

    Same arguments, defaults, validation, param-group keys and state (``step``, ``prev`` and
    ``step_size``) as torch's. ``step`` is a 0-dim float32 tensor (float64 under a float64
    default dtype) on the CPU, or on the parameter's device when the group is ``capturable``.

    Args:
        params: tensors, ``named_parameters()`` pairs, or param-group dicts.
        lr: the initial step size, a float or a 1-element tensor.
        etas: the multiplicative decrease and increase factors ``(etaminus, etaplus)``.
        step_sizes: the minimal and maximal step sizes.
        capturable: keep ``step`` on the parameter's device for graph capture (CUDA and the
            like; stepping CPU parameters then fails, as in torch).
        foreach: use the foreach implementation; ``None`` lets torch's rule decide (off on CPU).
        maximize: maximize the objective instead of minimizing it.
        differentiable: let autograd run through the step.

    Raises:
        ValueError: a negative ``lr``, a tensor ``lr`` with more than one element, or etas
            not satisfying ``0 < etaminus < 1 < etaplus``.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        etas: tuple[float, float] = (0.5, 1.2),
        step_sizes: tuple[float, float] = (1e-6, 50),
        *,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
    ) -> None:
        # Validation in torch's order, with torch's exception types (step_sizes unchecked).
        check_lr(lr)
        if not 0.0 < etas[0] < 1.0 < etas[1]:
            raise ValueError(f"Invalid eta values: {etas[0]}, {etas[1]}")

        super().__init__(params, locals())

    _STATE_KEYS = "prev step_size step"
    _NOT_STEP_KEYS = "lr"
    _SPLIT_KEYS: ClassVar[Mapping[str, str]] = {
        "etas": "etaminus etaplus",
        "step_sizes": "step_size_min step_size_max",
    }
    _SPARSE_ERROR = "Rprop does not support sparse gradients"
    _functional = staticmethod(rprop)

    # torch's __setstate__: the group keys older checkpoints lack, and a number step.
    _GROUP_KEY_DEFAULTS = newer_group_keys("foreach maximize differentiable capturable")
    _NUMBER_STATE_KEYS = ("step",)

    def _init_state(
        self, p: Tensor, grad: Tensor, state: dict[str, Any], group: Mapping[str, Any]
    ) -> None:
        """step, prev, and step_size shaped like the grad, as in torch. A complex parameter is
        two independent real numbers, so its imaginary step size starts at lr too."""
        state["step"] = new_step(0.0, p, group)
        state["prev"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if p.dtype.is_complex:
            state["step_size"] = torch.full_like(grad, complex(group["lr"], group["lr"]))
        else:
            state["step_size"] = torch.full_like(grad, to_scalar(group["lr"]))
