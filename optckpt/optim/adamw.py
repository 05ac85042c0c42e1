"""AdamW, matching ``torch.optim.AdamW`` (``torch/optim/adamw.py``): Adam with decoupled decay.

As in torch, AdamW is :class:`~optckpt.optim.adam.Adam` with ``decoupled_weight_decay=True``
and a different ``weight_decay`` default; it has no step of its own.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from optckpt.optim.adam import Adam
from optckpt.optim.base import ParamsT

__all__ = ["AdamW"]


class AdamW(Adam):
    """AdamW; ``torch.optim.AdamW``'s twin (same arguments, defaults, groups and state).

    Args:
        params: tensors, ``named_parameters()`` pairs, or param-group dicts.
        lr: learning rate, a float or a 1-element tensor.
        betas: the running-average coefficients, both floats or both 1-element tensors.
        eps: term added to the denominator.
        weight_decay: decoupled weight decay coefficient.
        amsgrad: use the AMSGrad variant.
        maximize: maximize the objective instead of minimizing it.
        foreach: use the foreach implementation; ``None`` lets torch's rule decide (off on CPU).
        capturable: keep ``step`` on the parameter's device for graph capture.
        differentiable: let autograd run through the step.
        fused: use torch's fused kernel.

    Raises:
        ValueError, RuntimeError: as :class:`~optckpt.optim.adam.Adam`.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Install loaded state; ``decoupled_weight_decay`` is always True, as in torch.

        torch forces it so that any state loaded into AdamW (even one saved by Adam) keeps
        AdamW's update.
        """
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
