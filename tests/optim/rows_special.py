"""Parity rows for SparseAdam, Adafactor, LBFGS and Muon (the harness is ``test_parity.py``).

``test_parity.ROWS`` takes these in with ``rows_from``; this module imports ``Row`` from it,
which works because ``test_parity`` imports this module only after defining ``Row`` (pytest's
default ``prepend`` import mode puts ``tests/optim`` on ``sys.path`` and names that module
``test_parity``).

These four need the harness's optional ``Row`` fields: SparseAdam steps sparse gradients
(``grad``), LBFGS takes one param group (``groups=()``) and a closure (``closure``), Muon
takes 2-D parameters only (``params``). SparseAdam, LBFGS and Muon have one implementation
and no ``foreach`` argument (``impls=("only",)``); Adafactor has a for-loop and a foreach one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from test_parity import Row

from optckpt.optim import LBFGS, Adafactor, Muon, SparseAdam

# --- what the rows feed their optimizers ------------------------------------------------------


def sparse_grad(grad: torch.Tensor, index: int, step: int) -> torch.Tensor:
    """``grad`` as an uncoalesced sparse COO gradient, its entries varying by param and step.

    Even-numbered parameters get a hybrid tensor (sparse along dim 0) holding a subset of the
    rows, with the first row listed twice so that SparseAdam's ``coalesce`` sums them; odd ones
    get a fully sparse tensor of the nonzeros left after masking some entries. Parameter 1 on
    step 2 gets an empty gradient (SparseAdam still counts the step but skips the update).
    """
    if grad.dim() == 0:
        return grad.to_sparse()
    if index == 1 and step == 2:
        return torch.sparse_coo_tensor(
            torch.zeros(1, 0, dtype=torch.long), grad[:0], grad.shape, check_invariants=True
        )
    if index % 2 == 0:
        rows = [r for r in range(grad.shape[0]) if (r + index + step) % 3 != 0] or [0]
        rows.append(rows[0])
        indices = torch.tensor([rows])
        return torch.sparse_coo_tensor(indices, grad[rows], grad.shape, check_invariants=True)
    mask = torch.arange(grad.numel()).reshape(grad.shape) % 4 != (index + step) % 4
    return (grad * mask).to_sparse()


def matrices(dtype: torch.dtype) -> list[torch.Tensor]:
    """2-D parameters only (Muon takes nothing else): tall, wide and square ones.

    A tall matrix takes the transposed path of Muon's Newton-Schulz iteration. One parameter
    of another dtype makes a second (device, dtype) bucket, as in the default parameters.
    """
    other = torch.float64 if dtype == torch.float32 else torch.float32
    shapes = [(4, 3), (3, 5), (2, 2), (6, 2), (1, 4), (5, 5), (3, 3)]
    params = [torch.randn(shape, dtype=dtype) for shape in shapes]
    params.insert(2, torch.randn(3, 2, dtype=other))
    return params


def one_dtype(dtype: torch.dtype) -> list[torch.Tensor]:
    """Parameters of several shapes (a 0-dim one too), all of ``dtype`` (for LBFGS).

    LBFGS flattens all parameters into one vector of their promoted dtype, while torch's
    ``load_state_dict`` casts its state to the first parameter's dtype: with mixed dtypes a
    reloaded LBFGS fails in ``dot`` (torch's as ours), so the row keeps to one dtype.
    """
    shapes = [(4, 3), (5,), (2, 2, 3), (3,), (), (2, 5), (6,)]
    return [torch.randn(shape, dtype=dtype) for shape in shapes]


def objective(params: list[torch.Tensor], step: int, gaps: bool) -> torch.Tensor:
    """A smooth non-quadratic loss of the parameters, different for each step.

    Each parameter (viewed as real) adds ``a * (softplus(2u) + softplus(-2u)) + 0.1 * x^2``
    with ``u = x - c`` (a log-cosh, stable in float32) and seeded ``a`` in [0.5, 1.5) and
    ``c``: convex, with bounded gradients (so even LBFGS's fixed full steps stay finite), and
    far from cubic along a line (so the strong-Wolfe search has to zoom). With ``gaps``, some parameters are left out on some steps (and the last one always),
    so their grads are ``None``.
    """
    generator = torch.Generator().manual_seed(2000 + step)
    loss = torch.zeros((), dtype=torch.float64)
    for i, p in enumerate(params):
        x = torch.view_as_real(p) if p.is_complex() else p
        scale = 0.5 + torch.rand((), generator=generator).item()
        target = torch.randn(x.shape, generator=generator).to(x)  # x's dtype and device
        if gaps and ((step + i) % 3 == 0 or i == len(params) - 1):
            continue
        u = 2 * (x - target)
        log_cosh = torch.nn.functional.softplus(u) + torch.nn.functional.softplus(-u)
        loss = loss + (scale * log_cosh + 0.1 * x.square()).sum()
    return loss


def lbfgs_closure(params: list[torch.Tensor], step: int, gaps: bool) -> Callable[[], Any]:
    """A closure for ``params`` that sets their grads (``None`` where unused) and returns the loss.

    The grads come from autograd on detached leaves that share the parameters' storage, so
    the closure works on plain tensors and is the same function of the parameters' bits for
    torch's LBFGS and ours.
    """

    def closure() -> torch.Tensor:
        leaves = [p.detach().requires_grad_(True) for p in params]
        loss = objective(leaves, step, gaps)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad
        return loss.detach()

    return closure


# --- the rows ------------------------------------------------------------------------------------

ROWS = [
    Row(
        "SparseAdam",
        torch.optim.SparseAdam,
        SparseAdam,
        configs={
            "plain": {"lr": 0.01},
            "betas-eps": {"lr": 0.02, "betas": (0.5, 0.75), "eps": 1e-3},
            "maximize": {"lr": 0.01, "maximize": True},
            "tensor-lr": {"lr": torch.tensor(0.01)},
        },
        groups=({"lr": 0.005, "betas": (0.8, 0.9)}, {"eps": 1e-4, "maximize": True}),
        invalid={
            "zero-lr": {"lr": 0.0},
            "negative-lr": {"lr": -1e-3},
            "tensor-lr-2-elements": {"lr": torch.tensor([0.1, 0.2])},
            "zero-eps": {"eps": 0.0},
            "beta1-one": {"betas": (1.0, 0.999)},
            "beta2-negative": {"betas": (0.9, -0.1)},
            "foreach": {"foreach": True},
        },
        impls=("only",),
        grad=sparse_grad,
    ),
    Row(
        "Adafactor",
        torch.optim.Adafactor,
        Adafactor,
        configs={
            "plain": {},
            # lr above 1 / sqrt(step): the relative step size is the decaying one.
            "large-lr": {"lr": 1.0},
            "wd": {"lr": 0.02, "weight_decay": 0.1},
            "maximize-d": {"maximize": True, "d": 2.0, "weight_decay": 0.05},
            "eps-beta2-decay": {"eps": (1e-6, 1e-2), "beta2_decay": -0.5},
            "zero-eps": {"eps": (0.0, 0.0), "beta2_decay": 0.0},
            "tensor-lr": {"lr": torch.tensor(0.005), "weight_decay": 0.2},
        },
        groups=(
            {"lr": 0.05, "beta2_decay": -0.6, "weight_decay": 0.05},
            {"eps": (1e-5, 1e-3), "d": 1.5, "maximize": True},
        ),
        invalid={
            "negative-lr": {"lr": -1e-3},
            "tensor-lr-2-elements": {"lr": torch.tensor([0.1, 0.2])},
            "positive-beta2-decay": {"beta2_decay": 0.1},
            "negative-eps1": {"eps": (-1e-30, 1e-3)},
            "negative-eps2": {"eps": (None, -1e-3)},
            "d-below-one": {"d": 0.5},
            "negative-wd": {"weight_decay": -0.1},
            "fused": {"fused": True},
        },
        impls=("default", "for-loop", "foreach"),
        number_step=True,
    ),
    Row(
        "LBFGS",
        torch.optim.LBFGS,
        LBFGS,
        configs={
            "defaults": {},
            "fixed-step": {"lr": 0.1, "max_iter": 5, "history_size": 3},
            "strong-wolfe": {"max_iter": 6, "history_size": 4, "line_search_fn": "strong_wolfe"},
            "strong-wolfe-few-evals": {
                "lr": 2.0,
                "max_iter": 10,
                "max_eval": 5,
                "line_search_fn": "strong_wolfe",
            },
            # No evaluation left for the line search: t comes back as the int 0.
            "strong-wolfe-no-evals": {"max_eval": 1, "line_search_fn": "strong_wolfe"},
            "tolerances": {
                "lr": 0.5,
                "max_iter": 8,
                "tolerance_grad": 0.5,
                "tolerance_change": 1e-2,
            },
            # Long steps that overshoot: the line search brackets, zooms, moves away from the
            # bracket's ends and stops on a bracket too small; the last iterations find no
            # descent direction left.
            "strong-wolfe-zoom": {"lr": 2.0, "line_search_fn": "strong_wolfe"},
            # Longer still: the zoom's old high end becomes its new low end.
            "strong-wolfe-long-steps": {
                "lr": 30.0,
                "max_iter": 5,
                "line_search_fn": "strong_wolfe",
            },
            # Already optimal at the start of every step: the loss comes back at once.
            "tolerance-grad-met": {"tolerance_grad": 1e3},
            # Every direction counts as flat: each step stops at its first iteration.
            "tolerance-change-large": {"tolerance_change": 1e3, "max_iter": 3},
            "tensor-lr": {"lr": torch.tensor(0.2), "max_iter": 4, "history_size": 2},
            "unknown-line-search": {"line_search_fn": "armijo"},
        },
        groups=(),
        invalid={
            "negative-lr": {"lr": -1.0},
            "tensor-lr-2-elements": {"lr": torch.tensor([0.1, 0.2])},
            "foreach": {"foreach": False},
        },
        impls=("only",),
        # torch's load casts every tensor of the state to the first parameter's dtype,
        # including ``t``, which is the tensor lr itself (float32) after a fixed step.
        load_casts_state=True,
        params=one_dtype,
        closure=lbfgs_closure,
    ),
    Row(
        "Muon",
        torch.optim.Muon,
        Muon,
        configs={
            "defaults": {},
            "plain": {"lr": 0.02},
            "no-nesterov": {"lr": 0.02, "nesterov": False, "momentum": 0.9},
            "coefficients-steps": {"lr": 0.02, "ns_coefficients": (3.0, -3.2, 1.2), "ns_steps": 3},
            "match-rms-adamw": {"adjust_lr_fn": "match_rms_adamw", "weight_decay": 0.0},
            "original-eps": {"lr": 0.01, "adjust_lr_fn": "original", "eps": 1e-3},
            "tensor-lr": {"lr": torch.tensor(0.01)},
            # Refused at the first step, not in the constructor, in torch as in ours.
            "ns-steps-100": {"ns_steps": 100},
            "two-coefficients": {"ns_coefficients": (3.0, -3.0)},
        },
        groups=(
            {"lr": 0.01, "weight_decay": 0.0, "momentum": 0.8},
            {"nesterov": False, "ns_steps": 2, "adjust_lr_fn": "match_rms_adamw"},
        ),
        invalid={
            "negative-lr": {"lr": -1e-3},
            "tensor-lr-2-elements": {"lr": torch.tensor([0.1, 0.2])},
            "negative-momentum": {"momentum": -0.1},
            "negative-wd": {"weight_decay": -0.1},
            "unknown-adjust-lr-fn": {"adjust_lr_fn": "sqrt"},
            "foreach": {"foreach": True},
        },
        impls=("only",),
        params=matrices,
    ),
]
