"""Parity rows for NAdam, RAdam, RMSprop and Rprop (the harness is ``test_parity.py``).

``test_parity.ROWS`` takes these in with ``rows_from``; this module imports ``Row`` from it,
which works because ``test_parity`` imports this module only after defining ``Row`` (pytest's
default ``prepend`` import mode puts ``tests/optim`` on ``sys.path`` and names that module
``test_parity``).

Every documented option of each optimizer appears in some config (``capturable`` too: on the
CPU torch refuses the step, and ours must refuse it the same way; ``test_adam_variants.py``
runs the capturable arithmetic itself). The two extra groups set hyperparameters of their own.
RAdam's default ``beta2`` crosses the ``rho_t > 5`` threshold within the six steps, so both
its unrectified and its rectified updates run; its ``beta2=0.5`` config never rectifies.
"""

from __future__ import annotations

import torch
from test_parity import Row

from optckpt.optim import NAdam, RAdam, RMSprop, Rprop

ROWS = [
    Row(
        "NAdam",
        torch.optim.NAdam,
        NAdam,
        configs={
            "plain": {"lr": 0.01},
            "wd": {"lr": 0.01, "weight_decay": 0.1},
            "decoupled": {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True},
            "momentum-decay-maximize": {
                "lr": 0.02,
                "momentum_decay": 0.05,
                "maximize": True,
                "weight_decay": 0.05,
            },
            "betas-eps": {"lr": 0.01, "betas": (0.5, 0.75), "eps": 1e-3},
            "tensor-lr": {"lr": torch.tensor(0.01), "weight_decay": 0.1},
            "tensor-lr-decoupled": {
                "lr": torch.tensor(0.02),
                "weight_decay": 0.1,
                "decoupled_weight_decay": True,
            },
            "tensor-lr-1-element": {"lr": torch.tensor([0.01]), "momentum_decay": 0.01},
            "differentiable": {"lr": 0.01, "weight_decay": 0.1, "differentiable": True},
            "capturable": {"lr": 0.01, "capturable": True},
        },
        groups=(
            {"lr": 0.003, "weight_decay": 0.02, "momentum_decay": 0.01},
            {"betas": (0.8, 0.99), "weight_decay": 0.1, "decoupled_weight_decay": True},
        ),
        invalid={
            "negative-lr": {"lr": -1e-3},
            "tensor-lr-2-elements": {"lr": torch.tensor([0.1, 0.2])},
            "negative-eps": {"eps": -1e-8},
            "beta1-one": {"betas": (1.0, 0.999)},
            "beta2-negative": {"betas": (0.9, -0.1)},
            "negative-wd": {"weight_decay": -0.1},
            "negative-momentum-decay": {"momentum_decay": -4e-3},
            "nan-lr": {"lr": float("nan")},
            "string-eps": {"eps": "1e-8"},
        },
        impls=("default", "for-loop", "foreach"),
        number_step=True,
        number_state=("step", "mu_product"),
        # torch's load_state_dict casts mu_product (not step) to the parameter's dtype.
        load_casts_state=True,
        autograd={
            "lr": torch.tensor(0.01),
            "weight_decay": torch.tensor(0.1),
            "decoupled_weight_decay": True,
            "momentum_decay": 0.01,
        },
        # torch's differentiable NAdam saves exp_avg for lr's gradient and then changes it in
        # place on the next step: with a tensor lr it backpropagates through one step only.
        autograd_steps=1,
    ),
    Row(
        "RAdam",
        torch.optim.RAdam,
        RAdam,
        configs={
            "plain": {"lr": 0.01},
            "wd": {"lr": 0.01, "weight_decay": 0.1},
            "decoupled-maximize": {
                "lr": 0.01,
                "weight_decay": 0.1,
                "decoupled_weight_decay": True,
                "maximize": True,
            },
            "wd-maximize": {"lr": 0.02, "weight_decay": 0.05, "maximize": True},
            "betas-eps": {"lr": 0.01, "betas": (0.8, 0.9), "eps": 1e-3},
            "never-rectified": {"lr": 0.01, "betas": (0.9, 0.5)},
            "tensor-lr": {"lr": torch.tensor(0.01), "weight_decay": 0.1},
            "tensor-lr-decoupled": {
                "lr": torch.tensor(0.02),
                "weight_decay": 0.1,
                "decoupled_weight_decay": True,
            },
            "tensor-lr-1-element": {"lr": torch.tensor([0.01]), "maximize": True},
            "differentiable": {"lr": 0.01, "weight_decay": 0.1, "differentiable": True},
            "capturable": {"lr": 0.01, "capturable": True},
        },
        groups=(
            {"lr": 0.003, "weight_decay": 0.02, "betas": (0.7, 0.95)},
            {"eps": 1e-6, "weight_decay": 0.1, "decoupled_weight_decay": True},
        ),
        invalid={
            "negative-lr": {"lr": -1e-3},
            "tensor-lr-2-elements": {"lr": torch.tensor([0.1, 0.2])},
            "negative-eps": {"eps": -1e-8},
            "beta1-one": {"betas": (1.0, 0.999)},
            "beta2-one": {"betas": (0.9, 1.0)},
            "betas-one-element": {"betas": (0.9,)},
            "negative-wd": {"weight_decay": -0.1},
        },
        impls=("default", "for-loop", "foreach"),
        number_step=True,
        autograd={
            "lr": torch.tensor(0.01),
            "weight_decay": torch.tensor(0.1),
            "decoupled_weight_decay": True,
            "betas": (0.9, 0.9),
        },
        autograd_steps=6,
    ),
    Row(
        "RMSprop",
        torch.optim.RMSprop,
        RMSprop,
        configs={
            "plain": {"lr": 0.01},
            "alpha-eps": {"lr": 0.01, "alpha": 0.9, "eps": 1e-3},
            "momentum": {"lr": 0.01, "momentum": 0.9},
            "centered": {"lr": 0.01, "centered": True},
            "centered-momentum-wd-maximize": {
                "lr": 0.01,
                "centered": True,
                "momentum": 0.5,
                "weight_decay": 0.1,
                "maximize": True,
            },
            "wd-maximize": {"lr": 0.02, "weight_decay": 0.05, "maximize": True},
            "tensor-lr": {"lr": torch.tensor(0.01), "centered": True},
            "tensor-lr-momentum": {"lr": torch.tensor(0.01), "momentum": 0.9},
            "tensor-lr-1-element": {"lr": torch.tensor([0.01]), "weight_decay": 0.1},
            "differentiable": {
                "lr": 0.01,
                "momentum": 0.9,
                "centered": True,
                "differentiable": True,
            },
            "capturable": {"lr": 0.01, "capturable": True},
        },
        groups=(
            {"lr": 0.003, "weight_decay": 0.02, "alpha": 0.95},
            {"momentum": 0.7, "centered": True},
        ),
        invalid={
            "negative-lr": {"lr": -1e-3},
            "tensor-lr-2-elements": {"lr": torch.tensor([0.1, 0.2])},
            "negative-eps": {"eps": -1e-8},
            "negative-momentum": {"momentum": -0.5},
            "negative-wd": {"weight_decay": -0.1},
            "negative-alpha": {"alpha": -0.1},
            "nan-alpha": {"alpha": float("nan")},
        },
        impls=("default", "for-loop", "foreach"),
        number_step=True,
        # With weight decay as well, torch's differentiable centered RMSprop cannot
        # backpropagate through two steps (grad_avg, then depending on the parameters, is
        # saved and then lerp_-ed in place); test_adam_variants.py checks ours fails alike.
        autograd={"lr": 0.01, "momentum": 0.9, "centered": True, "alpha": 0.9},
    ),
    Row(
        "Rprop",
        torch.optim.Rprop,
        Rprop,
        configs={
            "plain": {"lr": 0.01},
            "etas-step-sizes": {"lr": 0.05, "etas": (0.3, 1.5), "step_sizes": (1e-3, 0.1)},
            "maximize": {"lr": 0.01, "maximize": True},
            "tensor-lr": {"lr": torch.tensor(0.02), "etas": (0.4, 1.3)},
            "tensor-lr-1-element": {"lr": torch.tensor([0.02])},
            "differentiable": {"lr": 0.01, "differentiable": True},
            "capturable": {"lr": 0.01, "capturable": True},
        },
        groups=(
            {"lr": 0.003, "etas": (0.4, 1.1)},
            {"step_sizes": (1e-4, 0.02), "maximize": True},
        ),
        invalid={
            "negative-lr": {"lr": -1e-3},
            "tensor-lr-2-elements": {"lr": torch.tensor([0.1, 0.2])},
            "etaminus-zero": {"etas": (0.0, 1.2)},
            "etaminus-one": {"etas": (1.0, 1.2)},
            "etaplus-one": {"etas": (0.5, 1.0)},
            "etas-one-element": {"etas": (0.5,)},
        },
        impls=("default", "for-loop", "foreach"),
        number_step=True,
        autograd={"lr": 0.01, "etas": (0.4, 1.3)},
    ),
]
