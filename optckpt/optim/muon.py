"""Muon, reimplemented to match ``torch.optim.Muon`` (``torch/optim/_muon.py``) bit for bit.

Momentum SGD whose update is orthogonalized by a few Newton-Schulz iterations, for 2-D
parameters only. torch has one implementation, a for-loop over tensors (asking its
functional API for foreach raises; the class takes no ``foreach`` argument), and
:func:`_single_tensor_muon` runs its ops in its order, including the iterations in bfloat16.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from optckpt.optim.base import (
    Hyper,
    Optimizer,
    ParamsT,
    check_lr,
    check_non_negative,
    evaluate_closure,
    to_scalar,
)

__all__ = ["Muon"]

# torch's constants, from Keller Jordan's Muon post (https://kellerjordan.github.io/posts/muon/).
EPS = 1e-7
DEFAULT_A = 3.4445
DEFAULT_B = -4.7750
DEFAULT_C = 2.0315
DEFAULT_NS_STEPS = 5


class Muon(Optimizer):
    """Muon; ``torch.optim.Muon``'s twin.

    Same arguments, defaults, validation, param-group keys and state (``momentum_buffer``)
    as torch's. Every parameter must be 2-D.

    Args:
        params: 2-D tensors, ``named_parameters()`` pairs, or param-group dicts.
        lr: learning rate, a float or a 1-element tensor.
        weight_decay: decoupled weight decay coefficient.
        momentum: momentum factor.
        nesterov: use Nesterov momentum.
        ns_coefficients: the ``(a, b, c)`` of the quintic Newton-Schulz iteration.
        eps: floor of the gradient's norm before the iterations.
        ns_steps: the number of Newton-Schulz iterations (fewer than 100).
        adjust_lr_fn: how the lr scales with the shape ``(A, B)``: ``None`` or ``"original"``
            (``sqrt(max(1, A / B))``) or ``"match_rms_adamw"`` (``0.2 * sqrt(max(A, B))``).

    Raises:
        ValueError: a tensor ``lr`` with more than one element, a negative ``lr``,
            ``momentum`` or ``weight_decay``, an unknown ``adjust_lr_fn``, or a parameter
            that is not 2-D.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = (DEFAULT_A, DEFAULT_B, DEFAULT_C),
        eps: float = EPS,
        ns_steps: int = DEFAULT_NS_STEPS,
        adjust_lr_fn: str | None = None,
    ) -> None:
        # Validation in torch's order, with torch's exception types.
        check_lr(lr, "Learning rate should be >= 0 but is")
        check_non_negative(momentum, "momentum should be >= 0 but is")
        check_non_negative(weight_decay, "weight decay should be >= 0 but is")
        if adjust_lr_fn is not None and adjust_lr_fn not in ["original", "match_rms_adamw"]:
            raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")

        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_coefficients": ns_coefficients,
            "eps": eps,
            "ns_steps": ns_steps,
            "adjust_lr_fn": adjust_lr_fn,
        }
        super().__init__(params, defaults)

        # torch checks the shapes after building the groups (a group added later is not
        # checked).
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(
                        "Muon only supports 2D parameters whereas we found a parameter with "
                        f"size: {p.size()}"
                    )

    def _init_group(
        self,
        group: dict[str, Any],
        params_with_grad: list[Tensor],
        grads: list[Tensor],
        muon_momentum_bufs: list[Tensor],
    ) -> bool:
        """Collect the group's parameters that have a grad, creating their buffer on first use.

        Returns whether any is complex: never, since a complex parameter raises (as in torch).
        """
        sparse_error = "Muon does not support sparse gradients"
        complex_error = "Muon does not support complex parameters"
        for _, grad, state in self._params_with_grad(
            group, params_with_grad, grads, sparse_error, complex_error
        ):
            if "momentum_buffer" not in state:
                # Zeros, unlike SGD's buffer, which starts at the first gradient.
                state["momentum_buffer"] = torch.zeros_like(
                    grad, memory_format=torch.preserve_format
                )
            muon_momentum_bufs.append(state["momentum_buffer"])
        return False

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one Muon step over every param group; see :meth:`Optimizer.step`.

        Raises:
            RuntimeError: a parameter is complex or has a sparse gradient.
            ValueError: a gradient is not 2-D, or ``ns_steps`` or ``ns_coefficients`` is
                invalid (checked at the first step, as in torch).
        """
        loss = evaluate_closure(closure)

        for group in self.param_groups:
            params_with_grad: list[Tensor] = []
            grads: list[Tensor] = []
            muon_momentum_bufs: list[Tensor] = []
            has_complex = self._init_group(group, params_with_grad, grads, muon_momentum_bufs)
            _single_tensor_muon(
                params_with_grad,
                grads,
                muon_momentum_bufs,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                momentum=group["momentum"],
                nesterov=group["nesterov"],
                ns_coefficients=group["ns_coefficients"],
                eps=group["eps"],
                ns_steps=group["ns_steps"],
                adjust_lr_fn=group["adjust_lr_fn"],
                has_complex=has_complex,
            )
        return loss


def _zeropower_via_newtonschulz(
    grad: Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float
) -> Tensor:
    """Orthogonalize ``grad`` (2-D) with ``ns_steps`` quintic Newton-Schulz iterations.

    torch's function of the same name: in bfloat16, on the wide orientation of the matrix,
    after scaling it to a spectral norm of at most 1. The result approximates ``U S' V^T``
    with ``S'`` near 1 (not exactly ``U V^T``; see torch's docstring).

    Raises:
        ValueError: ``ns_steps`` is 100 or more, ``grad`` is not 2-D, or there are not
            exactly three coefficients.
    """
    if ns_steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    if len(grad.shape) != 2:
        raise ValueError("Input tensor gradient must be a 2D matrix")
    if len(ns_coefficients) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")
    a, b, c = ns_coefficients
    ortho_grad = grad.bfloat16()
    if grad.size(0) > grad.size(1):
        ortho_grad = ortho_grad.T
    # The Frobenius norm bounds the spectral norm.
    ortho_grad.div_(ortho_grad.norm().clamp(min=eps))
    for _ in range(ns_steps):
        gram_matrix = ortho_grad @ ortho_grad.T
        gram_update = torch.addmm(gram_matrix, gram_matrix, gram_matrix, beta=b, alpha=c)
        ortho_grad = torch.addmm(ortho_grad, gram_update, ortho_grad, beta=a)
    if grad.size(0) > grad.size(1):
        ortho_grad = ortho_grad.T
    return ortho_grad


def _adjust_lr(lr: Hyper, adjust_lr_fn: str | None, param_shape: torch.Size) -> Hyper:
    """The lr scaled for a parameter of shape ``(A, B)`` (torch's ``_adjust_lr``).

    Any other ``adjust_lr_fn`` (one set on a group after construction) leaves lr unscaled,
    as in torch.
    """
    rows, cols = param_shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        adjusted_ratio = math.sqrt(max(1, rows / cols))
    elif adjust_lr_fn == "match_rms_adamw":
        adjusted_ratio = 0.2 * math.sqrt(max(rows, cols))
    else:
        adjusted_ratio = 1.0
    return lr * adjusted_ratio


def _single_tensor_muon(
    params: list[Tensor],
    grads: list[Tensor],
    muon_momentum_bufs: list[Tensor],
    *,
    lr: Hyper,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    ns_coefficients: tuple[float, float, float],
    ns_steps: int,
    eps: float,
    adjust_lr_fn: str | None,
    has_complex: bool,
) -> None:
    """One tensor at a time."""
    lr = to_scalar(lr)
    if has_complex:
        raise ValueError("Complex parameters are not supported")

    for i, param in enumerate(params):
        grad = grads[i]
        if grad.ndim != 2:
            raise ValueError("Param gradient must be a 2D matrix")

        buf = muon_momentum_bufs[i]
        buf.lerp_(grad, 1 - momentum)
        update = grad.lerp(buf, momentum) if nesterov else buf

        update = _zeropower_via_newtonschulz(update, ns_coefficients, ns_steps, eps)
        adjusted_lr = _adjust_lr(lr, adjust_lr_fn, param.shape)

        # Decoupled weight decay with the unadjusted lr, then the step with the adjusted one.
        param.mul_(1 - lr * weight_decay)
        param.add_(update, alpha=-adjusted_lr)
