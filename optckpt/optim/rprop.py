"""Rprop, reimplemented to match ``torch.optim.Rprop`` (``torch/optim/rprop.py``) bit for bit.

Two implementations, picked per param group as torch picks them: a for-loop over tensors
(``foreach=False``, and the default on the CPU) and ``torch._foreach_*`` ops per device and
dtype (``foreach=True``). torch has no fused Rprop. Each runs torch's ops in torch's order.
``lr`` only seeds each parameter's ``step_size`` state when that state is created; after that
the step sizes evolve by ``etas`` within ``step_sizes``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from optckpt.optim.base import (
    Hyper,
    Optimizer,
    ParamsT,
    capturable_supported_devices,
    default_to_fused_or_foreach,
    group_tensors_by_device_and_dtype,
    new_step,
    to_scalar,
    use_grad_for_differentiable,
    view_as_real,
)

__all__ = ["Rprop"]


class Rprop(Optimizer):
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
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 < etas[0] < 1.0 < etas[1]:
            raise ValueError(f"Invalid eta values: {etas[0]}, {etas[1]}")

        defaults = {
            "lr": lr,
            "etas": etas,
            "step_sizes": step_sizes,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            "capturable": capturable,
        }
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Install loaded state; fill missing group keys and turn a number ``step`` into a tensor.

        Checkpoints from torch < 1.12 hold ``step`` as a Python number; torch converts it to
        the tensor a fresh step would be, and so do we.
        """
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group.setdefault("maximize", False)
            group.setdefault("differentiable", False)
            group.setdefault("capturable", False)
            for p in group["params"]:
                p_state = self.state.get(p, {})
                if len(p_state) != 0 and not torch.is_tensor(p_state["step"]):
                    p_state["step"] = new_step(float(p_state["step"]), p, group)

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        prevs: list[Tensor],
        step_sizes: list[Tensor],
        state_steps: list[Tensor],
    ) -> bool:
        """Collect the group's parameters that have a grad, creating their state on first use.

        Returns whether any of them is complex.
        """
        has_complex = False
        for p in group["params"]:
            if p.grad is None:
                continue
            has_complex |= torch.is_complex(p)
            params.append(p)
            grad = p.grad
            if grad.is_sparse:
                raise RuntimeError("Rprop does not support sparse gradients")
            grads.append(grad)

            state = self.state[p]
            if len(state) == 0:
                state["step"] = new_step(0.0, p, group)
                state["prev"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                # Shaped like the grad, as in torch. A complex parameter is two independent
                # real numbers, so its imaginary step size starts at lr too.
                if p.dtype.is_complex:
                    state["step_size"] = torch.full_like(grad, complex(group["lr"], group["lr"]))
                else:
                    state["step_size"] = torch.full_like(grad, to_scalar(group["lr"]))

            prevs.append(state["prev"])
            step_sizes.append(state["step_size"])
            state_steps.append(state["step"])
        return has_complex

    @use_grad_for_differentiable
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one Rprop step over every param group.

        Args:
            closure: re-evaluates the model and returns the loss (run with grad enabled).

        Returns:
            The closure's loss, or ``None``.
        """
        self._accelerator_graph_capture_health_check()

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            prevs: list[Tensor] = []
            step_sizes: list[Tensor] = []
            state_steps: list[Tensor] = []
            etaminus, etaplus = group["etas"]
            step_size_min, step_size_max = group["step_sizes"]
            has_complex = self._init_group(group, params, grads, prevs, step_sizes, state_steps)
            _rprop(
                params,
                grads,
                prevs,
                step_sizes,
                state_steps,
                step_size_min=step_size_min,
                step_size_max=step_size_max,
                etaminus=etaminus,
                etaplus=etaplus,
                foreach=group["foreach"],
                maximize=group["maximize"],
                differentiable=group["differentiable"],
                capturable=group["capturable"],
                has_complex=has_complex,
            )
        return loss


def _rprop(
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
    """Pick the implementation as torch's functional ``rprop`` does, and run it.

    With ``foreach`` unset, torch's default rule decides (foreach on CUDA, the for-loop on the
    CPU).
    """
    if not all(isinstance(t, Tensor) for t in state_steps):
        raise RuntimeError(
            "API has changed, `state_steps` argument must contain a list of singleton tensors"
        )
    if foreach is None:
        _, foreach = default_to_fused_or_foreach(params, differentiable, use_fused=False)
    impl = _rprop_foreach if foreach else _rprop_for_loop
    impl(params, grads, prevs, step_sizes, state_steps, differentiable=differentiable, **hyper)


def _rprop_for_loop(
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
    """One tensor at a time (torch's ``_single_tensor_rprop``)."""
    for i, param in enumerate(params):
        grad = grads[i]
        grad = grad if not maximize else -grad
        prev = prevs[i]
        step_size = step_sizes[i]
        step = state_steps[i]

        if capturable:
            supported = capturable_supported_devices()
            if not (param.device.type == step.device.type and param.device.type in supported):
                raise AssertionError(
                    "If capturable=True, params and state_steps must be on supported "
                    f"devices: {supported}."
                )

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


def _rprop_foreach(
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
    """foreach ops per (device, dtype) bucket (torch's ``_multi_tensor_rprop``)."""
    if not params:
        return
    if differentiable:
        raise AssertionError("_foreach ops don't support autograd")
    if capturable:
        supported = capturable_supported_devices()
        if not all(
            p.device.type == s.device.type and p.device.type in supported
            for p, s in zip(params, state_steps, strict=True)
        ):
            raise AssertionError(
                "If capturable=True, params and state_steps must be on supported "
                f"devices: {supported}."
            )

    buckets = group_tensors_by_device_and_dtype([params, grads, prevs, step_sizes, state_steps])
    for bucket, _ in buckets.values():
        device_params, device_grads, device_prevs, device_step_sizes = bucket[:4]
        device_state_steps = bucket[4]

        # Steps on the CPU: torch adds a wrapped CPU scalar once (the alpha picks the overload).
        if device_state_steps[0].is_cpu:
            torch._foreach_add_(device_state_steps, torch.tensor(1.0, device="cpu"), alpha=1.0)
        else:
            torch._foreach_add_(device_state_steps, 1)

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
