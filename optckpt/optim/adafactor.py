"""Adafactor, reimplemented to match ``torch.optim.Adafactor`` (``torch/optim/_adafactor.py``).

Two implementations, picked per param group as torch picks them: a for-loop over tensors
(``foreach=False`` or ``None``: unlike most optimizers, torch's Adafactor never defaults to
foreach) and ``torch._foreach_*`` ops per device, dtype and dimensionality
(``foreach=True``). Each runs torch's ops in torch's order. Parameters of two or more
dimensions keep a factored second moment (``row_var`` and ``col_var``, over the last two
dimensions); vectors and scalars keep a full ``variance``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, cast

import torch
from torch import Tensor

from optckpt.optim._functional import check_no_grad_scale, for_loop_tensors, increment_steps
from optckpt.optim.base import (
    Hyper,
    Optimizer,
    ParamsT,
    check_lr,
    check_non_negative,
    evaluate_closure,
    group_tensors_by_device_and_dtype,
    scalar_tensor,
    to_scalar,
)

__all__ = ["Adafactor", "adafactor"]


class Adafactor(Optimizer):
    """Adafactor; ``torch.optim.Adafactor``'s twin.

    Same arguments, defaults, validation, param-group keys and state as torch's: ``step`` (a
    0-dim float32 tensor, float64 under a float64 default dtype, on the CPU), and either
    ``row_var`` and ``col_var`` (for a gradient of two or more dimensions) or ``variance``.

    Args:
        params: tensors, ``named_parameters()`` pairs, or param-group dicts.
        lr: learning rate (the cap of the relative step size), a float or a 1-element tensor.
        beta2_decay: the decay rate of the second-moment coefficient (``step ** beta2_decay``).
        eps: ``(eps1, eps2)``: eps1 floors the second moment (``None``: the machine epsilon
            of the first stepped parameter's dtype), eps2 floors the parameter's RMS.
        d: clipping threshold of the update's RMS.
        weight_decay: decoupled weight decay coefficient.
        foreach: use the foreach implementation (``None`` is the for-loop, as in torch).
        maximize: maximize the objective instead of minimizing it.

    Raises:
        ValueError: a tensor ``lr`` with more than one element, a negative ``lr``, ``eps1``,
            ``eps2`` or ``weight_decay``, a positive ``beta2_decay``, or ``d`` below 1.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
    ) -> None:
        # Validation in torch's order, with torch's exception types.
        check_lr(lr, "Learning rate should be >= 0 but is")
        if not beta2_decay <= 0.0:
            raise ValueError(f"beta2_decay should be <= 0 but is: {beta2_decay}")
        if eps[0] is not None and not eps[0] >= 0.0:
            raise ValueError(f"epsilon1 should be >= 0 but is: {eps[0]}")
        check_non_negative(eps[1], "epsilon2 should be >= 0 but is")
        if not d >= 1.0:
            raise ValueError(f"Clipping threshold d should be >= 1 but is: {d}")
        check_non_negative(weight_decay, "weight_decay should be >= 0 but is")

        defaults = {
            "lr": lr,
            "beta2_decay": beta2_decay,
            "eps": eps,
            "d": d,
            "weight_decay": weight_decay,
            "foreach": foreach,
            "maximize": maximize,
        }
        super().__init__(params, defaults)

    # torch's __setstate__: foreach where older checkpoints lack it, and a number step.
    _GROUP_KEY_DEFAULTS: ClassVar[Mapping[str, Any]] = {"foreach": None}
    _NUMBER_STATE_KEYS = ("step",)

    def _number_state_to_tensor(
        self, key: str, value: Any, p: Tensor, group: Mapping[str, Any]
    ) -> Tensor:
        """The tensor a fresh step would be: always on the CPU, whatever keys a loaded group
        holds (Adafactor has no ``capturable`` or ``fused``)."""
        return scalar_tensor(float(value))

    def _init_group(
        self,
        group: dict[str, Any],
        params_with_grad: list[Tensor],
        grads: list[Tensor],
        row_vars: list[Tensor | None],
        col_vars: list[Tensor | None],
        variances: list[Tensor | None],
        state_steps: list[Tensor],
    ) -> bool:
        """Collect the group's parameters that have a grad, creating their state on first use.

        Returns whether any is complex: never, since a complex parameter raises (as in torch).
        """
        sparse_error = "Adafactor does not support sparse gradients"
        complex_error = "Adafactor does not support complex parameters"
        for _, grad, state in self._params_with_grad(
            group, params_with_grad, grads, sparse_error, complex_error
        ):
            if len(state) == 0:
                # On the CPU, as torch hosts it (Adafactor has no capturable or fused mode).
                state["step"] = scalar_tensor(0.0)
                if grad.dim() > 1:
                    # The factors: the mean square over the last dimension (a column of
                    # rows) and over the penultimate one (a row of columns).
                    row_shape = list(grad.shape)
                    row_shape[-1] = 1
                    state["row_var"] = grad.new_zeros(row_shape)
                    col_shape = list(grad.shape)
                    col_shape[-2] = 1
                    state["col_var"] = grad.new_zeros(col_shape)
                else:
                    state["variance"] = torch.zeros_like(grad, memory_format=torch.preserve_format)

            row_vars.append(state.get("row_var", None))
            col_vars.append(state.get("col_var", None))
            variances.append(state.get("variance", None))
            state_steps.append(state["step"])
        return False

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one Adafactor step over every param group; see :meth:`Optimizer.step`.

        Raises:
            RuntimeError: a parameter is complex or has a sparse gradient.
        """
        self._accelerator_graph_capture_health_check()

        loss = evaluate_closure(closure)

        for group in self.param_groups:
            params_with_grad: list[Tensor] = []
            grads: list[Tensor] = []
            row_vars: list[Tensor | None] = []
            col_vars: list[Tensor | None] = []
            variances: list[Tensor | None] = []
            state_steps: list[Tensor] = []
            eps1, eps2 = group["eps"]
            has_complex = self._init_group(
                group, params_with_grad, grads, row_vars, col_vars, variances, state_steps
            )
            adafactor(
                params_with_grad,
                grads,
                row_vars,
                col_vars,
                variances,
                state_steps,
                foreach=group["foreach"],
                grad_scale=getattr(self, "grad_scale", None),
                found_inf=getattr(self, "found_inf", None),
                has_complex=has_complex,
                d=group["d"],
                lr=group["lr"],
                beta2_decay=group["beta2_decay"],
                weight_decay=group["weight_decay"],
                eps1=eps1,
                eps2=eps2,
                maximize=group["maximize"],
            )
        return loss


def adafactor(
    params: list[Tensor],
    grads: list[Tensor],
    row_vars: list[Tensor | None],
    col_vars: list[Tensor | None],
    variances: list[Tensor | None],
    state_steps: list[Tensor],
    *,
    foreach: bool | None,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    **hyper: Any,
) -> None:
    """Pick the implementation as torch's functional ``adafactor`` does, and run it.

    Only ``foreach=True`` picks the foreach implementation; ``None`` is the for-loop on every
    device (torch does not apply its default foreach rule here).
    """
    if not all(isinstance(t, Tensor) for t in state_steps):
        raise RuntimeError("`state_steps` argument must contain a list of singleton tensors")
    impl = _multi_tensor_adafactor if foreach else _single_tensor_adafactor
    impl(params, grads, row_vars, col_vars, variances, state_steps, grad_scale, found_inf, **hyper)


def _single_tensor_adafactor(
    params: list[Tensor],
    grads: list[Tensor],
    row_vars: list[Tensor | None],
    col_vars: list[Tensor | None],
    variances: list[Tensor | None],
    state_steps: list[Tensor],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    *,
    d: float,
    lr: Hyper,
    beta2_decay: float,
    weight_decay: float,
    eps1: float | None,
    eps2: float,
    maximize: bool,
    has_complex: bool,
) -> None:
    """One tensor at a time."""
    check_no_grad_scale(
        grad_scale, found_inf, "Grad scaling should occur outside of optimizer.step()"
    )
    lr = to_scalar(lr)

    for _, param, grad, step_t, row_var, col_var, variance in for_loop_tensors(
        params, grads, maximize, state_steps, row_vars, col_vars, variances
    ):
        if eps1 is None:
            # Set once, from the first parameter, and kept for the rest of the group: torch
            # assigns the loop's shared eps1, so a later parameter of another dtype uses the
            # first one's epsilon.
            eps1 = torch.finfo(param.dtype).eps

        step_t += 1
        step_float = step_t.item()

        # Python floats (or 0-dim tensors, with a tensor lr) from the step's value.
        one_minus_beta2_t = step_float**beta2_decay
        rho_t = min(lr, 1 / (step_float**0.5))
        alpha = max(eps2, param.norm(2).item() / (param.numel() ** 0.5)) * rho_t

        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)

        if grad.dim() > 1:
            if row_var is None or col_var is None:
                raise AssertionError(
                    "row_var and col_var should be defined when grad is multidimensional"
                )
            # (g * g).mean(dim=-1) without materializing g * g, as torch computes it.
            row_mean = torch.norm(grad, dim=-1, keepdim=True).square_().div_(grad.size(-1))
            row_var.lerp_(row_mean, one_minus_beta2_t)
            col_mean = torch.norm(grad, dim=-2, keepdim=True).square_().div_(grad.size(-2))
            col_var.lerp_(col_mean, one_minus_beta2_t)
            var_estimate = row_var @ col_var
            var_estimate.div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=eps1))
        else:
            if variance is None:
                raise AssertionError("variance should be defined when grad is a vector")
            grad_squared = grad * grad
            variance.lerp_(grad_squared, one_minus_beta2_t)
            # A copy, so that the update does not write into the state.
            var_estimate = variance.clone()

        # eps1 is squared because the estimate goes through a square root next.
        update = var_estimate.clamp_(min=eps1 * eps1).rsqrt_()
        update.mul_(grad)
        denom = max(1.0, update.norm(2).item() / ((update.numel() ** 0.5) * d))
        param.add_(update, alpha=-alpha / denom)


def _group_tensors_by_device_dtype_and_is_multidim(
    tensorlists: list[list[Any]],
) -> dict[tuple[torch.device, torch.dtype, bool], list[list[Any]]]:
    """Split the lists by device, dtype and whether the grad has 2+ dimensions.

    torch's ``_group_tensors_by_device_dtype_and_is_multidim``: each (device, dtype) bucket is
    split into a factored (matrix) and a vector bucket, in the order first met, so that every
    foreach bucket is all factored or all not. The grads are the second list.
    """
    buckets = group_tensors_by_device_and_dtype(tensorlists)
    split: dict[tuple[torch.device, torch.dtype, bool], list[list[Any]]] = {}
    for (device, dtype), (lists, _) in buckets.items():
        for j, grad in enumerate(lists[1]):
            if grad is None:
                raise AssertionError("grad should not be None")
            key = (device, dtype, grad.dim() > 1)
            if key not in split:
                split[key] = [[] for _ in lists]
            for i in range(len(lists)):
                split[key][i].append(lists[i][j])
    return split


def _multi_tensor_adafactor(
    params: list[Tensor],
    grads: list[Tensor],
    row_vars: list[Tensor | None],
    col_vars: list[Tensor | None],
    variances: list[Tensor | None],
    state_steps: list[Tensor],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    *,
    d: float,
    lr: Hyper,
    beta2_decay: float,
    weight_decay: float,
    eps1: float | None,
    eps2: float,
    maximize: bool,
    has_complex: bool,
) -> None:
    """foreach ops per (device, dtype, factored) bucket."""
    if len(params) == 0:
        return
    check_no_grad_scale(
        grad_scale, found_inf, "Grad scaling should occur outside of optimizer.step()"
    )
    lr = to_scalar(lr)

    buckets = _group_tensors_by_device_dtype_and_is_multidim(
        [params, grads, row_vars, col_vars, variances, state_steps]
    )
    for (_, dtype, is_multidim), bucket in buckets.items():
        device_params = cast("list[Tensor]", bucket[0])
        device_grads = cast("list[Tensor]", bucket[1])
        device_state_steps = cast("list[Tensor]", bucket[5])
        if eps1 is None:
            # As in the for-loop: set from the first bucket's dtype, kept for the rest.
            eps1 = torch.finfo(dtype).eps

        if maximize:
            device_grads = list(torch._foreach_neg(device_grads))

        increment_steps(device_state_steps)

        # Python floats per tensor, from each step's value (torch also builds the unused
        # beta2_t = 1 - step ** beta2_decay list; it changes nothing).
        one_minus_beta2_ts = [s.item() ** beta2_decay for s in device_state_steps]
        rho_ts = [min(lr, 1 / (s.item() ** 0.5)) for s in device_state_steps]
        alphas = [
            max(eps2, p.norm(2).item() / (p.numel() ** 0.5)) * r
            for p, r in zip(device_params, rho_ts, strict=True)
        ]

        if weight_decay != 0:
            torch._foreach_mul_(device_params, 1 - lr * weight_decay)

        if is_multidim:
            device_row_vars = cast("list[Tensor]", bucket[2])
            device_col_vars = cast("list[Tensor]", bucket[3])
            if device_row_vars[0] is None or device_col_vars[0] is None:
                raise AssertionError(
                    "row_var and col_var should be defined when grad is multidimensional"
                )
            # (g * g).mean(dim=-1) without materializing g * g: norms, squared, divided.
            row_means = [torch.norm(grad, dim=-1, keepdim=True) for grad in device_grads]
            torch._foreach_mul_(row_means, row_means)
            torch._foreach_div_(row_means, [grad.size(-1) for grad in device_grads])
            torch._foreach_lerp_(device_row_vars, row_means, one_minus_beta2_ts)
            del row_means

            col_means = [torch.norm(grad, dim=-2, keepdim=True) for grad in device_grads]
            torch._foreach_mul_(col_means, col_means)
            torch._foreach_div_(col_means, [grad.size(-2) for grad in device_grads])
            torch._foreach_lerp_(device_col_vars, col_means, one_minus_beta2_ts)
            del col_means

            var_estimates = [
                row_var @ col_var
                for row_var, col_var in zip(device_row_vars, device_col_vars, strict=True)
            ]
            row_var_means = [row_var.mean(dim=-2, keepdim=True) for row_var in device_row_vars]
            torch._foreach_clamp_min_(row_var_means, eps1)
            torch._foreach_div_(var_estimates, row_var_means)
            del row_var_means
        else:
            device_variances = cast("list[Tensor]", bucket[4])
            if device_variances[0] is None:
                raise AssertionError("variance should be defined when grad is a vector")
            grads_squared = torch._foreach_mul(device_grads, device_grads)
            torch._foreach_lerp_(device_variances, grads_squared, one_minus_beta2_ts)
            del grads_squared
            # Copies, so that the update does not write into the state.
            var_estimates = [v.clone() for v in device_variances]

        # eps1 is squared because the estimates go through a square root next.
        torch._foreach_clamp_min_(var_estimates, eps1 * eps1)
        torch._foreach_rsqrt_(var_estimates)
        torch._foreach_mul_(var_estimates, device_grads)
        updates = var_estimates

        alphas = [
            -a / (max(1.0, update.norm(2).item() / ((update.numel() ** 0.5) * d)))
            for a, update in zip(alphas, updates, strict=True)
        ]
        torch._foreach_mul_(updates, alphas)
        torch._foreach_add_(device_params, updates)
