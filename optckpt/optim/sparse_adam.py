"""SparseAdam, reimplemented to match ``torch.optim.SparseAdam`` (``torch/optim/sparse_adam.py``).

A masked Adam for dense parameters with sparse gradients (``nn.Embedding(sparse=True)``): only
the entries a gradient holds update the moments and the parameter. torch has one
implementation (its functional ``sparse_adam`` in ``torch/optim/_functional.py``), a loop over
tensors with no ``foreach`` or ``fused`` variant; :func:`sparse_adam` runs its ops in its
order. Unlike most optimizers, the ``step`` state is a Python ``int``, in torch as here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from optckpt.optim.base import Optimizer, ParamsT, check_betas, evaluate_closure, to_scalar

__all__ = ["SparseAdam", "sparse_adam"]


class SparseAdam(Optimizer):
    """Adam for sparse gradients; ``torch.optim.SparseAdam``'s twin.

    Same arguments, defaults, validation, param-group keys (``lr``, ``betas``, ``eps``,
    ``maximize``) and state (``step``, a Python ``int``; ``exp_avg`` and ``exp_avg_sq``) as
    torch's. Parameters must be dense and real; gradients must be sparse.

    Args:
        params: tensors, ``named_parameters()`` pairs, or param-group dicts.
        lr: learning rate, a float or a 1-element tensor.
        betas: the running-average coefficients of the gradient and its square.
        eps: term added to the denominator.
        maximize: maximize the objective instead of minimizing it.

    Raises:
        ValueError: a tensor ``lr`` with more than one element, an ``lr`` or ``eps`` that is
            not positive, a beta outside [0, 1), or a sparse or complex parameter.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        maximize: bool = False,
    ) -> None:
        # Validation in torch's order, with torch's exception types.
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not lr > 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not eps > 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        check_betas(betas)

        defaults = {"lr": lr, "betas": betas, "eps": eps, "maximize": maximize}
        super().__init__(params, defaults)

        # torch checks the parameters after building the groups, listing every offender as
        # [group index, index in the group].
        sparse_params = []
        complex_params = []
        for index, param_group in enumerate(self.param_groups):
            if not isinstance(param_group, dict):
                raise AssertionError(
                    f"param_groups must be a list of dicts, but got {type(param_group)}"
                )
            for d_index, d_param in enumerate(param_group["params"]):
                if d_param.is_sparse:
                    sparse_params.append([index, d_index])
                if d_param.is_complex():
                    complex_params.append([index, d_index])
        if sparse_params:
            raise ValueError(
                f"Sparse params at indices {sparse_params}: SparseAdam requires dense "
                "parameter tensors"
            )
        if complex_params:
            raise ValueError(
                f"Complex params at indices {complex_params}: SparseAdam does not support "
                "complex parameters"
            )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one SparseAdam step over every param group; see :meth:`Optimizer.step`.

        Raises:
            RuntimeError: a parameter has a dense gradient.
        """
        loss = evaluate_closure(closure)

        for group in self.param_groups:
            params_with_grad: list[Tensor] = []
            grads: list[Tensor] = []
            exp_avgs: list[Tensor] = []
            exp_avg_sqs: list[Tensor] = []
            state_steps: list[int] = []
            beta1, beta2 = group["betas"]
            # torch reads maximize with .get: groups saved before it existed step without it.
            maximize = group.get("maximize", False)

            for p in group["params"]:
                if p.grad is None:
                    continue
                params_with_grad.append(p)
                if not p.grad.is_sparse:
                    raise RuntimeError(
                        "SparseAdam does not support dense gradients, please consider Adam instead"
                    )
                grads.append(p.grad)

                state = self.state[p]
                if len(state) == 0:
                    # A Python int step (never a tensor, never converted), as in torch.
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])

                # torch counts the step here, before the update, even for an empty gradient
                # (whose update the functional then skips).
                state["step"] += 1
                state_steps.append(state["step"])

            sparse_adam(
                params_with_grad,
                grads,
                exp_avgs,
                exp_avg_sqs,
                state_steps,
                eps=group["eps"],
                beta1=beta1,
                beta2=beta2,
                lr=to_scalar(group["lr"]),
                maximize=maximize,
            )

        return loss


def sparse_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[int],
    *,
    eps: float,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    maximize: bool,
) -> None:
    """One tensor at a time (torch's functional ``sparse_adam``).

    Only the gradient's coalesced entries are updated: the old moments there are read with
    ``sparse_mask``, the moment deltas are added back as sparse tensors with the gradient's
    indices, and so is the parameter update.
    """
    for i, param in enumerate(params):
        grad = grads[i] if not maximize else -grads[i]
        # The update is non-linear, so duplicate indices must be summed first.
        grad = grad.coalesce()
        grad_values = grad._values()
        if grad_values.numel() == 0:
            continue

        exp_avg = exp_avgs[i]
        exp_avg_sq = exp_avg_sqs[i]
        step = state_steps[i]

        # old <- b * old + (1 - b) * new, written as old += (1 - b) * (new - old).
        old_exp_avg_values = exp_avg.sparse_mask(grad)._values()
        exp_avg_update_values = grad_values.sub(old_exp_avg_values).mul_(1 - beta1)
        exp_avg.add_(_like_grad(grad, exp_avg_update_values))
        old_exp_avg_sq_values = exp_avg_sq.sparse_mask(grad)._values()
        exp_avg_sq_update_values = grad_values.pow(2).sub_(old_exp_avg_sq_values).mul_(1 - beta2)
        exp_avg_sq.add_(_like_grad(grad, exp_avg_sq_update_values))

        # The new moment values, by dense addition of the old ones (torch avoids another
        # sparse_mask); both buffers are reused in place.
        numer = exp_avg_update_values.add_(old_exp_avg_values)
        exp_avg_sq_update_values.add_(old_exp_avg_sq_values)
        denom = exp_avg_sq_update_values.sqrt_().add_(eps)
        del exp_avg_update_values, exp_avg_sq_update_values

        # Python floats from the int step.
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr * math.sqrt(bias_correction2) / bias_correction1

        param.add_(_like_grad(grad, -step_size * numer.div_(denom)))


def _like_grad(grad: Tensor, values: Tensor) -> Tensor:
    """A sparse tensor with the (coalesced) gradient's indices and size, holding ``values``.

    torch's ``make_sparse``: for 0-dim indices or values it builds an empty sparse tensor of
    the gradient's size instead, so that update adds nothing.
    """
    grad_indices = grad._indices()
    constructor = grad.new
    if grad_indices.dim() == 0 or values.dim() == 0:
        return constructor().resize_as_(grad)
    return constructor(grad_indices, values, grad.size())
