"""Adamax, reimplemented to match ``torch.optim.Adamax`` (``torch/optim/adamax.py``) bit for bit.

Two implementations, picked per param group as torch picks them: a for-loop over tensors
(``foreach=False``, and the default on the CPU) and ``torch._foreach_*`` ops per device and
dtype (``foreach=True``). torch has no fused Adamax. Each runs torch's ops in torch's order; in
particular the bias correction is a Python float on the plain paths but a tensor of ``step``'s
dtype on the ``capturable`` ones, as in torch.
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
    get_value,
    group_tensors_by_device_and_dtype,
    new_step,
    to_scalar,
    use_grad_for_differentiable,
    view_as_real,
)

__all__ = ["Adamax"]


class Adamax(Optimizer):
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
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not eps >= 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")

        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
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
        params_with_grad: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_infs: list[Tensor],
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
            params_with_grad.append(p)
            if p.grad.is_sparse:
                raise RuntimeError("Adamax does not support sparse gradients")
            grads.append(p.grad)

            state = self.state[p]
            if len(state) == 0:
                state["step"] = new_step(0.0, p, group)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_inf"] = torch.zeros_like(p, memory_format=torch.preserve_format)

            exp_avgs.append(state["exp_avg"])
            exp_infs.append(state["exp_inf"])
            state_steps.append(state["step"])
        return has_complex

    @use_grad_for_differentiable
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one Adamax step over every param group.

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
            params_with_grad: list[Tensor] = []
            grads: list[Tensor] = []
            exp_avgs: list[Tensor] = []
            exp_infs: list[Tensor] = []
            state_steps: list[Tensor] = []
            beta1, beta2 = group["betas"]
            has_complex = self._init_group(
                group, params_with_grad, grads, exp_avgs, exp_infs, state_steps
            )
            _adamax(
                params_with_grad,
                grads,
                exp_avgs,
                exp_infs,
                state_steps,
                eps=group["eps"],
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                foreach=group["foreach"],
                maximize=group["maximize"],
                differentiable=group["differentiable"],
                capturable=group["capturable"],
                has_complex=has_complex,
            )
        return loss


def _adamax(
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
    """Pick the implementation as torch's functional ``adamax`` does, and run it.

    With ``foreach`` unset, torch's default rule decides (foreach on CUDA, the for-loop on the
    CPU).
    """
    if not all(isinstance(t, Tensor) for t in state_steps):
        raise RuntimeError(
            "API has changed, `state_steps` argument must contain a list of singleton tensors"
        )
    if foreach is None:
        _, foreach = default_to_fused_or_foreach(params, differentiable, use_fused=False)
    impl = _adamax_foreach if foreach else _adamax_for_loop
    impl(
        params,
        grads,
        exp_avgs,
        exp_infs,
        state_steps,
        differentiable=differentiable,
        **hyper,
    )


def _adamax_for_loop(
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
    """One tensor at a time (torch's ``_single_tensor_adamax``)."""
    lr = to_scalar(lr)

    for i, param in enumerate(params):
        grad = grads[i] if not maximize else -grads[i]
        exp_avg = exp_avgs[i]
        exp_inf = exp_infs[i]
        step_t = state_steps[i]

        if capturable:
            # torch's for-loop allows XLA here, its foreach path does not.
            supported = capturable_supported_devices()
            if not (param.device.type == step_t.device.type and param.device.type in supported):
                raise AssertionError(
                    "If capturable=True, params and state_steps must be on supported "
                    f"devices: {supported}."
                )

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


def _adamax_foreach(
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
    """foreach ops per (device, dtype) bucket (torch's ``_multi_tensor_adamax``)."""
    if differentiable:
        raise AssertionError("_foreach ops don't support autograd")
    if not params:
        return
    if capturable:
        supported = capturable_supported_devices(supports_xla=False)
        if not all(
            p.device.type == step.device.type and p.device.type in supported
            for p, step in zip(params, state_steps, strict=True)
        ):
            raise AssertionError(
                "If capturable=True, params and state_steps must be on supported "
                f"devices: {supported}."
            )
    lr = to_scalar(lr)

    buckets = group_tensors_by_device_and_dtype([params, grads, exp_avgs, exp_infs, state_steps])
    for bucket, _ in buckets.values():
        grouped_params, grouped_grads, grouped_exp_avgs, grouped_exp_infs = bucket[:4]
        grouped_state_steps = bucket[4]

        if has_complex:
            view_as_real(grouped_params, grouped_grads, grouped_exp_avgs, grouped_exp_infs)

        if maximize:
            grouped_grads = torch._foreach_neg(grouped_grads)

        # Steps on the CPU: torch adds a wrapped CPU scalar once (the alpha picks the overload)
        # rather than letting foreach wrap 1 for every tensor.
        if grouped_state_steps[0].is_cpu:
            torch._foreach_add_(grouped_state_steps, torch.tensor(1.0, device="cpu"), alpha=1.0)
        else:
            torch._foreach_add_(grouped_state_steps, 1)

        if weight_decay != 0:
            if maximize:
                # Reuses the negated copy made above, as torch does.
                torch._foreach_add_(grouped_grads, grouped_params, alpha=weight_decay)
            else:
                grouped_grads = torch._foreach_add(
                    grouped_grads, grouped_params, alpha=weight_decay
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
