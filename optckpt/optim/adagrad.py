"""Adagrad, reimplemented to match ``torch.optim.Adagrad`` (``torch/optim/adagrad.py``) bit for bit.

Three implementations, picked per param group as torch picks them: a for-loop over tensors
(``foreach=False``, and the default on the CPU; the only one that takes sparse gradients),
``torch._foreach_*`` ops per device and dtype (``foreach=True``), and torch's fused ATen kernel
``torch._fused_adagrad_`` (``fused=True``). Each runs torch's ops in torch's order.

Two torch behaviours are kept on purpose: the state (``step`` and ``sum``) of every parameter
is created in the constructor, not on its first gradient; and the accumulator's starting
value is the constructor's ``initial_accumulator_value`` (``defaults``), never a group's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from optckpt.optim._functional import (
    check_foreach_not_differentiable,
    check_no_grad_scale,
    check_state_steps,
    foreach_maximize_count_decay,
    fused_step,
)
from optckpt.optim._group_step import GroupStepOptimizer, newer_group_keys
from optckpt.optim.base import (
    Hyper,
    ParamsT,
    check_lr,
    check_non_negative,
    default_to_fused_or_foreach,
    device_dtype_check_for_fused,
    get_value,
    group_tensors_by_device_and_dtype,
    scalar_dtype,
    scalar_tensor,
    to_scalar,
    view_as_real,
)

__all__ = ["Adagrad", "adagrad"]


def adagrad(
    params: list[Tensor],
    grads: list[Tensor],
    state_sums: list[Tensor],
    state_steps: list[Tensor],
    *,
    fused: bool | None,
    foreach: bool | None,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    differentiable: bool,
    **hyper: Any,
) -> None:
    """Pick the implementation as torch's functional ``adagrad`` does, and run it.

    With neither ``foreach`` nor ``fused`` set, torch's default rule decides (foreach on CUDA,
    the for-loop on the CPU; never fused). fused wins over foreach when a group asks for both.
    """
    check_state_steps(state_steps)
    if fused is None and foreach is None:
        _, foreach = default_to_fused_or_foreach(params, differentiable, use_fused=False)
    if fused:
        impl = _fused_adagrad
    elif foreach:
        impl = _multi_tensor_adagrad
    else:
        impl = _single_tensor_adagrad
    impl(
        params,
        grads,
        state_sums,
        state_steps,
        grad_scale,
        found_inf,
        differentiable=differentiable,
        **hyper,
    )


def _single_tensor_adagrad(
    params: list[Tensor],
    grads: list[Tensor],
    state_sums: list[Tensor],
    state_steps: list[Tensor],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    *,
    lr: Hyper,
    weight_decay: Hyper,
    lr_decay: Hyper,
    eps: Hyper,
    has_sparse_grad: bool,
    maximize: bool,
    differentiable: bool,
    has_complex: bool,
) -> None:
    """One tensor at a time, sparse grads included."""
    check_no_grad_scale(grad_scale, found_inf)
    lr = to_scalar(lr)

    for param, grad, state_sum, step_t in zip(params, grads, state_sums, state_steps, strict=True):
        step_t += 1
        step = get_value(step_t)
        grad = grad if not maximize else -grad

        if weight_decay != 0:
            if grad.is_sparse:
                raise RuntimeError("weight_decay option is not compatible with sparse gradients")
            grad = grad.add(param, alpha=weight_decay)

        clr = lr / (1 + (step - 1) * lr_decay)

        if grad.is_sparse:
            # The update is non-linear, so torch coalesces first (indices must be unique) and
            # touches only the entries the gradient has.
            grad = grad.coalesce()
            grad_indices = grad._indices()
            grad_values = grad._values()
            state_sum.add_(_make_sparse(grad, grad_indices, grad_values.pow(2)))
            std = state_sum.sparse_mask(grad)
            std_values = std._values().sqrt_().add_(eps)
            param.add_(_make_sparse(grad, grad_indices, grad_values / std_values), alpha=-clr)
        else:
            is_complex = torch.is_complex(param)
            if is_complex:
                grad = torch.view_as_real(grad)
                state_sum = torch.view_as_real(state_sum)
                param = torch.view_as_real(param)
            state_sum.addcmul_(grad, grad, value=1)
            # Out of place when differentiable: autograd needs sqrt's output intact.
            std = state_sum.sqrt() + eps if differentiable else state_sum.sqrt().add_(eps)
            param.addcdiv_(grad, std, value=-clr)


def _make_sparse(grad: Tensor, grad_indices: Tensor, values: Tensor) -> Tensor:
    """A sparse COO tensor of ``grad``'s size (torch's ``_make_sparse``)."""
    return torch.sparse_coo_tensor(grad_indices, values, grad.size())


def _multi_tensor_adagrad(
    params: list[Tensor],
    grads: list[Tensor],
    state_sums: list[Tensor],
    state_steps: list[Tensor],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    *,
    lr: Hyper,
    weight_decay: Hyper,
    lr_decay: Hyper,
    eps: Hyper,
    has_sparse_grad: bool,
    maximize: bool,
    differentiable: bool,
    has_complex: bool,
) -> None:
    """foreach ops per (device, dtype) bucket.

    A bucket with a sparse grad runs the for-loop instead, as in torch.
    """
    check_foreach_not_differentiable(differentiable)
    check_no_grad_scale(grad_scale, found_inf)
    if not params:
        return
    lr = to_scalar(lr)

    buckets = group_tensors_by_device_and_dtype([params, grads, state_sums, state_steps])
    for (device_params, device_grads, device_state_sums, device_state_steps), _ in buckets.values():
        device_has_sparse_grad = has_sparse_grad and any(g.is_sparse for g in device_grads)
        if device_has_sparse_grad:
            _single_tensor_adagrad(
                device_params,
                device_grads,
                device_state_sums,
                device_state_steps,
                grad_scale,
                found_inf,
                lr=lr,
                weight_decay=weight_decay,
                lr_decay=lr_decay,
                eps=eps,
                has_sparse_grad=True,
                maximize=maximize,
                differentiable=differentiable,
                has_complex=has_complex,
            )
            continue

        if has_complex:
            view_as_real(device_params, device_grads, device_state_sums)

        device_grads = foreach_maximize_count_decay(
            device_grads, device_params, device_state_steps, weight_decay, maximize
        )

        # Unlike the for-loop, torch negates lr before dividing.
        minus_clr = [-lr / (1 + (get_value(step) - 1) * lr_decay) for step in device_state_steps]

        torch._foreach_addcmul_(device_state_sums, device_grads, device_grads, value=1)

        std = torch._foreach_sqrt(device_state_sums)
        torch._foreach_add_(std, eps)

        if weight_decay != 0 or maximize:
            # The grads are a copy already (negated or decayed): scale them in place.
            torch._foreach_mul_(device_grads, minus_clr)
            numerator = device_grads
        else:
            numerator = torch._foreach_mul(device_grads, minus_clr)

        torch._foreach_addcdiv_(device_params, numerator, std)


def _fused_adagrad(
    params: list[Tensor],
    grads: list[Tensor],
    state_sums: list[Tensor],
    state_steps: list[Tensor],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    *,
    lr: Hyper,
    weight_decay: Hyper,
    lr_decay: Hyper,
    eps: Hyper,
    has_sparse_grad: bool,
    maximize: bool,
    differentiable: bool,
    has_complex: bool,
) -> None:
    """torch's fused kernel per (device, dtype) bucket.

    The arithmetic is the ATen kernel's own (``torch._fused_adagrad_``): the CPU kernel's SIMD
    code cannot be reproduced bit for bit with tensor ops, so fused parity comes from calling
    the same kernel. optckpt owns the bookkeeping around it (the step count, the scaler's
    tensors per device, undoing the step count where the scaler found infs).
    """
    if not params:
        return
    if has_sparse_grad or has_complex:
        raise RuntimeError("`fused` does not support sparse grad or complex param")
    if differentiable:
        raise RuntimeError("adagrad with fused=True does not support differentiable=True")

    fused_step(
        torch._fused_adagrad_,
        [params, grads, state_sums, state_steps],
        grad_scale,
        found_inf,
        lr,
        lr_decay=lr_decay,
        weight_decay=weight_decay,
        eps=eps,
        maximize=maximize,
    )


class Adagrad(GroupStepOptimizer):
    """Adagrad; ``torch.optim.Adagrad``'s twin.

    Same arguments, defaults, validation, param-group keys and state (``step`` and ``sum``,
    created for every parameter at construction) as torch's. ``step`` is a 0-dim float32
    tensor (float64 under a float64 default dtype) on the CPU, or a float32 one on the
    parameter's device when the group is ``fused``.

    Args:
        params: tensors, ``named_parameters()`` pairs, or param-group dicts.
        lr: learning rate, a float or a 1-element tensor.
        lr_decay: learning-rate decay: step ``t`` uses ``lr / (1 + (t - 1) * lr_decay)``.
        weight_decay: L2 penalty.
        initial_accumulator_value: starting value of the sum of squared gradients (taken from
            the constructor for every group, as torch does, even where a group sets its own).
        eps: term added to the denominator.
        foreach: use the foreach implementation; ``None`` lets torch's rule decide (off on CPU).
        maximize: maximize the objective instead of minimizing it.
        differentiable: let autograd run through the step.
        fused: use torch's fused kernel (no sparse gradients, no complex parameters).

    Raises:
        ValueError: a negative ``lr``, ``lr_decay``, ``weight_decay``,
            ``initial_accumulator_value`` or ``eps``, or a tensor ``lr`` with more than one
            element.
        RuntimeError: ``fused`` together with ``differentiable`` or ``foreach``.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        # Validation in torch's order, with torch's exception types.
        check_lr(lr)
        check_non_negative(lr_decay, "Invalid lr_decay value")
        check_non_negative(weight_decay, "Invalid weight_decay value")
        check_non_negative(initial_accumulator_value, "Invalid initial_accumulator_value value")
        check_non_negative(eps, "Invalid epsilon value")

        super().__init__(params, locals())

        if fused:
            self._init_fused(differentiable, foreach)
            self._need_device_dtype_check_for_fused = True

        # torch creates every parameter's state here, from the constructor's
        # initial_accumulator_value (a group's own value is not consulted), and without the
        # fused device/dtype check, which waits for the first step.
        for group in self.param_groups:
            for p in group["params"]:
                self._new_state(p, group, initial_accumulator_value)

    def _new_state(self, p: Tensor, group: dict[str, Any], initial_value: float) -> None:
        """Fresh ``step`` and ``sum`` for ``p``, laid out as torch lays them out."""
        state = self.state[p]
        # torch's note [special device hosting for step]: on the CPU unless fused.
        state["step"] = (
            scalar_tensor(0.0, device=p.device, is_fused=group["fused"])
            if group["fused"]
            else scalar_tensor(0.0)
        )
        # Complex parameters start both the real and the imaginary parts at the value.
        init_value = complex(initial_value, initial_value) if torch.is_complex(p) else initial_value
        state["sum"] = torch.full_like(p, init_value, memory_format=torch.preserve_format)

    _STATE_KEYS = "sum step"
    _NOT_STEP_KEYS = "initial_accumulator_value"
    _FLAGS = "has_sparse_grad has_complex"
    _GRAD_SCALER = True
    _CAPTURE_CHECK = False
    _functional = staticmethod(adagrad)

    # torch's __setstate__: the group keys older checkpoints lack, and a number step.
    _GROUP_KEY_DEFAULTS = newer_group_keys("foreach maximize differentiable fused")
    _NUMBER_STATE_KEYS = ("step",)

    def _number_state_to_tensor(
        self, key: str, value: Any, p: Tensor, group: Mapping[str, Any]
    ) -> Tensor:
        """The tensor a fresh state would have: on the CPU unless the group is ``fused``."""
        if group["fused"]:
            return torch.tensor(
                float(value), dtype=scalar_dtype(is_fused=group["fused"]), device=p.device
            )
        return torch.tensor(float(value), dtype=scalar_dtype())

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Install loaded state as every optimizer does, then convert stray number steps.

        Like torch: if the first state of all still has a number ``step`` (state of
        parameters in no group), every state's ``step`` is converted, with the last group's
        ``fused`` picking the dtype.
        """
        super().__setstate__(state)
        fused = self.param_groups[-1]["fused"] if self.param_groups else None
        state_values = list(self.state.values())
        step_is_tensor = len(state_values) != 0 and torch.is_tensor(state_values[0]["step"])
        if not step_is_tensor:
            for s in state_values:
                s["step"] = torch.tensor(float(s["step"]), dtype=scalar_dtype(is_fused=fused))

    def share_memory(self) -> None:
        """Move every ``sum`` state tensor to shared memory (torch's ``share_memory``)."""
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["sum"].share_memory_()

    def _init_group(
        self,
        group: dict[str, Any],
        params_with_grad: list[Tensor],
        grads: list[Tensor],
        state_sums: list[Tensor],
        state_steps: list[Tensor],
    ) -> tuple[bool, bool]:
        """Collect the group's parameters that have a grad, creating missing state.

        Returns whether any grad is sparse and whether any parameter is complex.
        """
        has_sparse_grad, has_complex = False, False
        for p in group["params"]:
            if p.grad is None:
                continue
            # torch checks the first parameter with a grad once per optimizer...
            self._check_fused_once(p, group)
            has_sparse_grad |= p.grad.is_sparse
            has_complex |= torch.is_complex(p)
            params_with_grad.append(p)
            grads.append(p.grad)
            state = self.state[p]
            if len(state) == 0:
                # ...and each parameter whose state starts here (added or loaded without one).
                if group["fused"]:
                    device_dtype_check_for_fused(p)
                # torch reads the optimizer-wide default here, not the group's value.
                self._new_state(p, group, self.defaults["initial_accumulator_value"])
            state_sums.append(state["sum"])
            state_steps.append(state["step"])
        return has_sparse_grad, has_complex
