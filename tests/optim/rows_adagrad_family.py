"""Parity rows for Adagrad, Adadelta, Adamax and ASGD (the harness is ``test_parity.py``).

``test_parity.ROWS`` takes these in; this module imports ``Row`` from it, which works because
``test_parity`` imports this module only after defining ``Row`` (pytest's default ``prepend``
import mode puts ``tests/optim`` on ``sys.path`` and names that module ``test_parity``).

Every option of each optimizer appears in some config; the two extra groups set
hyperparameters of their own (for Adagrad, also an ``initial_accumulator_value`` that torch
ignores for the group's state, which ours must ignore too).
"""

from __future__ import annotations

import torch
from test_parity import Row

from optckpt.optim import ASGD, Adadelta, Adagrad, Adamax

ROWS = [
    Row(
        "Adagrad",
        torch.optim.Adagrad,
        Adagrad,
        configs={
            "plain": {"lr": 0.1},
            "lr-decay": {"lr": 0.1, "lr_decay": 0.05},
            "wd": {"lr": 0.1, "weight_decay": 0.1},
            "maximize": {"lr": 0.1, "maximize": True, "lr_decay": 0.1},
            "wd-maximize": {"lr": 0.05, "weight_decay": 0.2, "maximize": True},
            "initial-accumulator-eps": {
                "lr": 0.05,
                "initial_accumulator_value": 0.5,
                "eps": 1e-3,
            },
            "tensor-lr": {"lr": torch.tensor(0.07), "lr_decay": 0.01},
            "differentiable": {"lr": 0.1, "weight_decay": 0.1, "differentiable": True},
        },
        groups=(
            {"lr": 0.03, "lr_decay": 0.1, "initial_accumulator_value": 0.2},
            {"weight_decay": 0.05, "eps": 1e-6},
        ),
        invalid={
            "negative-lr": {"lr": -0.1},
            "tensor-lr-2-elements": {"lr": torch.tensor([0.1, 0.2])},
            "negative-lr-decay": {"lr_decay": -0.1},
            "negative-wd": {"weight_decay": -0.1},
            "negative-initial-accumulator": {"initial_accumulator_value": -0.1},
            "negative-eps": {"eps": -1e-10},
            "fused-and-foreach": {"fused": True, "foreach": True},
            "fused-and-differentiable": {"fused": True, "differentiable": True},
        },
        number_step=True,
        autograd={"lr": 0.1, "lr_decay": 0.05, "weight_decay": 0.1},
    ),
    Row(
        "Adadelta",
        torch.optim.Adadelta,
        Adadelta,
        configs={
            "plain": {},
            "rho-eps": {"lr": 0.5, "rho": 0.5, "eps": 1e-3},
            "rho-one": {"rho": 1.0},
            "wd": {"weight_decay": 0.1},
            "maximize": {"lr": 0.8, "maximize": True},
            "wd-maximize": {"weight_decay": 0.2, "maximize": True},
            "tensor-lr": {"lr": torch.tensor(0.7)},
            "capturable": {"capturable": True},
            "differentiable": {"lr": 0.9, "weight_decay": 0.1, "differentiable": True},
        },
        groups=({"lr": 0.3, "rho": 0.95}, {"weight_decay": 0.05, "eps": 1e-4, "rho": 0.0}),
        invalid={
            "negative-lr": {"lr": -1.0},
            "tensor-lr-2-elements": {"lr": torch.tensor([0.1, 0.2])},
            "rho-above-one": {"rho": 1.1},
            "negative-rho": {"rho": -0.1},
            "negative-eps": {"eps": -1e-6},
            "negative-wd": {"weight_decay": -0.1},
            "fused": {"fused": True},
        },
        impls=("default", "for-loop", "foreach"),
        number_step=True,
        autograd={"lr": 0.9, "rho": 0.8, "weight_decay": 0.1},
    ),
    Row(
        "Adamax",
        torch.optim.Adamax,
        Adamax,
        configs={
            "plain": {},
            "betas-eps": {"lr": 0.02, "betas": (0.5, 0.8), "eps": 1e-3},
            "list-betas": {"betas": [0.8, 0.9]},
            "wd": {"weight_decay": 0.1},
            "maximize": {"lr": 0.01, "maximize": True},
            "wd-maximize": {"lr": 0.01, "weight_decay": 0.2, "maximize": True},
            "tensor-lr": {"lr": torch.tensor(0.01)},
            "capturable": {"capturable": True},
            "differentiable": {"lr": 0.01, "weight_decay": 0.1, "differentiable": True},
        },
        groups=({"lr": 0.005, "weight_decay": 0.02}, {"betas": (0.8, 0.99), "eps": 1e-6}),
        invalid={
            "negative-lr": {"lr": -1e-3},
            "tensor-lr-2-elements": {"lr": torch.tensor([0.1, 0.2])},
            "negative-eps": {"eps": -1e-8},
            "beta1-one": {"betas": (1.0, 0.999)},
            "beta2-negative": {"betas": (0.9, -0.1)},
            "negative-wd": {"weight_decay": -0.1},
            "fused": {"fused": True},
        },
        impls=("default", "for-loop", "foreach"),
        number_step=True,
        autograd={"lr": 0.01, "betas": (0.8, 0.9), "weight_decay": 0.1},
        # torch's differentiable Adamax updates exp_avg in place after addcdiv_ saved it, so
        # backpropagating through a second step fails (in ours as in torch; see
        # test_adagrad_family.py).
        autograd_steps=1,
    ),
    Row(
        "ASGD",
        torch.optim.ASGD,
        ASGD,
        configs={
            "plain": {"lr": 0.05},
            # A small t0 starts the averaging (mu < 1) within the run.
            "t0-averaging": {"lr": 0.05, "t0": 2},
            "lambd-alpha": {"lr": 0.1, "lambd": 0.01, "alpha": 0.5, "t0": 0.0},
            "wd": {"lr": 0.05, "weight_decay": 0.1, "t0": 3},
            "maximize": {"lr": 0.05, "maximize": True},
            "wd-maximize": {"lr": 0.05, "weight_decay": 0.1, "maximize": True, "t0": 1},
            "tensor-lr": {"lr": torch.tensor(0.05), "t0": 3},
            "capturable": {"capturable": True},
            "differentiable": {"lr": 0.05, "t0": 1, "weight_decay": 0.1, "differentiable": True},
        },
        groups=({"lr": 0.02, "lambd": 1e-3, "t0": 1.0}, {"alpha": 0.9, "weight_decay": 0.05}),
        invalid={
            "negative-lr": {"lr": -0.01},
            "tensor-lr-2-elements": {"lr": torch.tensor([0.1, 0.2])},
            "negative-wd": {"weight_decay": -0.1},
            "fused": {"fused": True},
        },
        impls=("default", "for-loop", "foreach"),
        number_step=True,
        number_state=("step", "eta", "mu"),
        # torch's load casts eta and mu (0-dim, of the scalar dtype) to the parameter's dtype.
        load_casts_state=True,
        autograd={"lr": 0.05, "t0": 1, "lambd": 0.01, "weight_decay": 0.1},
    ),
]
