"""SGD, reimplemented to match ``torch.optim.SGD`` (``torch/optim/sgd.py``) bit for bit.

Three implementations, picked per param group as torch picks them: a for-loop over tensors
(``foreach=False``, and the default on the CPU), ``torch._foreach_*`` ops per device and dtype
(``foreach=True``), and torch's fused ATen kernel ``torch._fused_sgd_`` (``fused=True``).
Each runs torch's ops in torch's order, which is what makes the results bit-identical.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from optckpt.optim._functional import check_no_grad_scale, foreach_add_weight_decay
from optckpt.optim._group_step import GroupStepOptimizer, newer_group_keys
from optckpt.optim.base import (
    Hyper,
    ParamsT,
    default_to_fused_or_foreach,
    group_tensors_by_device_and_dtype,
    to_scalar,
)

__all__ = ["SGD", "sgd"]


def sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    *,
    has_sparse_grad: bool,
    foreach: bool | None,
    fused: bool | None,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    **hyper: Any,
) -> None:
    """Pick the implementation as torch's functional ``sgd`` does, and run it.

    With neither ``foreach`` nor ``fused`` set, torch's default rule decides (foreach on CUDA,
    the for-loop on the CPU; torch passes ``differentiable=False`` here). foreach wins over
    fused when a group asks for both.
    """
    if foreach is None and fused is None:
        fused, foreach = default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
    if foreach:
        impl = _multi_tensor_sgd
    elif fused:
        impl = _fused_sgd
    else:
        impl = _single_tensor_sgd
    impl(
        params,
        grads,
        momentum_buffer_list,
        grad_scale,
        found_inf,
        has_sparse_grad=has_sparse_grad,
        **hyper,
    )


def _single_tensor_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    *,
    weight_decay: Hyper,
    momentum: Hyper,
    lr: Hyper,
    dampening: Hyper,
    nesterov: bool,
    maximize: bool,
    has_sparse_grad: bool,
) -> None:
    """One tensor at a time."""
    check_no_grad_scale(grad_scale, found_inf)
    lr = to_scalar(lr)

    for i, param in enumerate(params):
        grad = grads[i] if not maximize else -grads[i]

        if weight_decay != 0:
            if isinstance(weight_decay, Tensor) and weight_decay.requires_grad:
                # The differentiable path: torch adds into the grad in place, through a clone
                # of the parameter so that autograd sees the parameter's old value.
                grad = grad.addcmul_(param.clone(), weight_decay)
            else:
                grad = grad.add(param, alpha=weight_decay)

        if momentum != 0:
            buf = momentum_buffer_list[i]
            if buf is None:
                # torch starts the buffer at the first gradient, undampened.
                buf = grad.detach().clone()
                momentum_buffer_list[i] = buf
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - dampening)
            grad = grad.add(buf, alpha=momentum) if nesterov else buf

        if isinstance(lr, Tensor) and lr.requires_grad:
            param.addcmul_(grad, lr, value=-1)
        else:
            param.add_(grad, alpha=-lr)


def _multi_tensor_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    *,
    weight_decay: Hyper,
    momentum: Hyper,
    lr: Hyper,
    dampening: Hyper,
    nesterov: bool,
    maximize: bool,
    has_sparse_grad: bool,
) -> None:
    """foreach ops per (device, dtype) bucket."""
    check_no_grad_scale(grad_scale, found_inf)
    if not params:
        return
    lr = to_scalar(lr)

    buckets = group_tensors_by_device_and_dtype(
        [params, grads, momentum_buffer_list], with_indices=True
    )
    for (device_params, device_grads, device_bufs), indices in buckets.values():
        device_has_sparse_grad = has_sparse_grad and any(g.is_sparse for g in device_grads)

        if maximize:
            device_grads = torch._foreach_neg(device_grads)

        if weight_decay != 0:
            device_grads = foreach_add_weight_decay(
                device_grads, device_params, weight_decay, maximize
            )

        if momentum != 0:
            if all(buf is not None for buf in device_bufs):
                bufs = device_bufs
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, device_grads, alpha=1 - dampening)
            else:
                # Some buffers are new: torch falls back to per-tensor ops for the bucket and
                # writes the new buffers back into the caller's list through ``indices``.
                bufs = []
                for i, buf in enumerate(device_bufs):
                    if buf is None:
                        buf = device_grads[i].detach().clone()
                        device_bufs[i] = momentum_buffer_list[indices[i]] = buf
                    else:
                        buf.mul_(momentum).add_(device_grads[i], alpha=1 - dampening)
                    bufs.append(buf)

            if nesterov:
                torch._foreach_add_(device_grads, bufs, alpha=momentum)
            else:
                device_grads = bufs

        if not device_has_sparse_grad:
            torch._foreach_add_(device_params, device_grads, alpha=-lr)
        else:
            # foreach ops do not take sparse tensors.
            for param, grad in zip(device_params, device_grads, strict=True):
                param.add_(grad, alpha=-lr)


def _fused_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    *,
    weight_decay: Hyper,
    momentum: Hyper,
    lr: Hyper,
    dampening: Hyper,
    nesterov: bool,
    maximize: bool,
    has_sparse_grad: bool,
) -> None:
    """torch's fused kernel ``torch._fused_sgd_`` per (device, dtype).

    The arithmetic is the ATen kernel's own: the CPU kernel's SIMD code cannot be reproduced
    bit for bit with tensor ops, so fused parity comes from calling the same kernel.
    """
    if not params:
        return
    if has_sparse_grad:
        raise RuntimeError("`_fused_sgd` does not support sparse gradients")
    grad_scales = {grad_scale.device: grad_scale} if grad_scale is not None else {}
    found_infs = {found_inf.device: found_inf} if found_inf is not None else {}

    no_momentum_buffer = momentum == 0
    # On the first step the kernel fills uninitialized buffers itself.
    is_first_step = all(b is None for b in momentum_buffer_list) and not no_momentum_buffer
    if is_first_step:
        for i, g in enumerate(grads):
            momentum_buffer_list[i] = torch.empty_like(g)

    buckets = group_tensors_by_device_and_dtype([params, grads, momentum_buffer_list])
    for (device, _), ((device_params, device_grads, device_bufs), _) in buckets.items():
        device_grad_scale = (
            grad_scales.setdefault(device, grad_scale.to(device))
            if grad_scale is not None
            else None
        )
        device_found_inf = (
            found_infs.setdefault(device, found_inf.to(device)) if found_inf is not None else None
        )
        torch._fused_sgd_(
            device_params,
            device_grads,
            [] if no_momentum_buffer else device_bufs,
            weight_decay=weight_decay,
            momentum=momentum,
            lr=lr,
            dampening=dampening,
            nesterov=nesterov,
            maximize=maximize,
            is_first_step=is_first_step,
            grad_scale=device_grad_scale,
            found_inf=device_found_inf,
        )


class SGD(GroupStepOptimizer):
    """Stochastic gradient descent, optionally with momentum; ``torch.optim.SGD``'s twin.

    Same arguments, defaults, validation, param-group keys and state
    (``momentum_buffer``, only when ``momentum != 0``) as torch's.

    Args:
        params: tensors, ``named_parameters()`` pairs, or param-group dicts.
        lr: learning rate, a float or a 1-element tensor.
        momentum: momentum factor.
        dampening: dampening for momentum.
        weight_decay: L2 penalty, a float or a tensor.
        nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        maximize: maximize the objective instead of minimizing it.
        foreach: use the foreach implementation; ``None`` lets torch's rule decide (off on CPU).
        differentiable: let autograd run through the step.
        fused: use torch's fused kernel.

    Raises:
        ValueError: a negative ``lr``, ``momentum`` or ``weight_decay``, a tensor ``lr`` with
            more than one element, or ``nesterov`` without momentum or with dampening.
        RuntimeError: ``fused`` together with ``differentiable`` or ``foreach``.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        # Validation in torch's order, with torch's exception types.
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")

        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, locals())

        if fused:
            self._init_fused(differentiable, foreach)
            self._need_device_dtype_check_for_fused = True

    _STATE_KEYS = "momentum_buffer"
    _NOT_STEP_KEYS = "differentiable"
    _FLAGS = "has_sparse_grad"
    _GRAD_SCALER = True
    _CAPTURE_CHECK = False
    _functional = staticmethod(sgd)

    # torch's __setstate__: the group keys older checkpoints lack (SGD has no step).
    _GROUP_KEY_DEFAULTS = newer_group_keys("nesterov maximize foreach differentiable", fused=False)

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        momentum_buffer_list: list[Tensor | None],
    ) -> bool:
        """Collect the group's parameters that have a grad; return whether a grad is sparse."""
        has_sparse_grad = False
        for p in group["params"]:
            if p.grad is None:
                continue
            self._check_fused_once(p, group)
            params.append(p)
            grads.append(p.grad)
            if p.grad.is_sparse:
                has_sparse_grad = True
            if group["momentum"] != 0:
                momentum_buffer_list.append(self.state[p].get("momentum_buffer"))
        return has_sparse_grad

    def _after_group_step(self, group: Mapping[str, Any], lists: tuple[list[Any], ...]) -> None:
        """Store the momentum buffers the functional created in the list (torch's step does)."""
        params, _, momentum_buffer_list = lists
        if group["momentum"] != 0:
            for p, buf in zip(params, momentum_buffer_list, strict=True):
                self.state[p]["momentum_buffer"] = buf
