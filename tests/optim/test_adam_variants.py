"""NAdam, RAdam, RMSprop and Rprop against ``torch.optim``, beyond the parity table.

The table rows live in ``rows_adam_variants.py``; here are the behaviours the table cannot
express (``test_base`` checks the constructor signatures): the ``capturable``
arithmetic (torch refuses it on the CPU, so both sides are allowed the CPU here and run it),
differentiable runs that torch itself cannot backpropagate through, and a state whose group
options changed.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import sys
from typing import Any

import pytest
import torch
from test_parity import (
    DTYPES,
    ROWS,
    all_params,
    assert_bitwise_equal,
    build,
    run_against_torch,
    same_outcome,
    set_grads,
    tensors_in,
)

from optckpt.optim import NAdam, RAdam, RMSprop, Rprop

OURS = (NAdam, RAdam, RMSprop, Rprop)
# From test_parity's table (importing rows_adam_variants first would be a circular import).
ROW = {row.name: row for row in ROWS if row.ours in OURS}


# --- capturable, with the CPU allowed --------------------------------------------------------

CAPTURABLE_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "NAdam": {
        "plain": {"lr": 0.01},
        "wd-maximize": {"lr": 0.02, "weight_decay": 0.1, "maximize": True, "momentum_decay": 0.05},
        "decoupled-tensor-lr": {
            "lr": torch.tensor(0.01),
            "weight_decay": 0.1,
            "decoupled_weight_decay": True,
        },
    },
    "RAdam": {
        "plain": {"lr": 0.01},
        "wd-maximize": {"lr": 0.02, "weight_decay": 0.05, "maximize": True},
        "decoupled-tensor-lr": {
            "lr": torch.tensor(0.01),
            "weight_decay": 0.1,
            "decoupled_weight_decay": True,
        },
        "never-rectified": {"lr": 0.01, "betas": (0.9, 0.5)},
    },
    "RMSprop": {
        "plain": {"lr": 0.01},
        "centered-momentum-wd-maximize": {
            "lr": 0.01,
            "centered": True,
            "momentum": 0.5,
            "weight_decay": 0.1,
            "maximize": True,
        },
        "tensor-lr": {"lr": torch.tensor(0.01), "centered": True},
        "tensor-lr-momentum": {"lr": torch.tensor(0.01), "momentum": 0.9},
    },
    "Rprop": {
        "plain": {"lr": 0.01},
        "etas-maximize": {"lr": 0.05, "etas": (0.3, 1.5), "step_sizes": (1e-3, 0.1)},
        "tensor-lr": {"lr": torch.tensor(0.02), "maximize": True},
    },
}


@pytest.fixture
def cpu_may_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let ``capturable=True`` step CPU tensors, in torch's four modules and in ours.

    Only the device check changes; the capturable arithmetic (tensor bias corrections,
    ``torch.where`` instead of masked writes, ...) then runs on the CPU on both sides.
    """

    def devices(supports_xla: bool = True) -> list[str]:
        return ["cpu"]

    for name in CAPTURABLE_CONFIGS:
        module = name.lower()
        importlib.import_module(f"torch.optim.{module}")
        monkeypatch.setattr(
            sys.modules[f"torch.optim.{module}"], "_get_capturable_supported_devices", devices
        )
        ours = importlib.import_module(f"optckpt.optim.{module}")
        monkeypatch.setattr(ours, "capturable_supported_devices", devices)


@pytest.mark.usefixtures("cpu_may_capture")
@pytest.mark.parametrize("dtype", ["float32", "float64", "complex64"])
@pytest.mark.parametrize(
    "impl", [{"foreach": False}, {"foreach": True}], ids=["for-loop", "foreach"]
)
@pytest.mark.parametrize(
    ("name", "config"),
    [(name, config) for name, configs in CAPTURABLE_CONFIGS.items() for config in configs],
)
def test_capturable_steps_match_torch(
    name: str, config: str, impl: dict[str, Any], dtype: str
) -> None:
    """The capturable paths, stepped and cross-loaded (which moves ``step`` to float32)."""
    row = ROW[name]
    kwargs = {**CAPTURABLE_CONFIGS[name][config], "capturable": True, **impl}
    # torch really steps here: the fixture's patch is what makes this more than a refusal.
    probe = build(row.torch_cls, [torch.randn(3, dtype=DTYPES[dtype])], row, kwargs)
    set_grads(all_params(probe), 1, gaps=False)
    probe.step()
    run_against_torch(row, kwargs, DTYPES[dtype], gaps=True)


@pytest.mark.usefixtures("cpu_may_capture")
@pytest.mark.parametrize("name", ["NAdam", "RAdam", "RMSprop", "Rprop"])
def test_capturable_differentiable_for_loop_matches_torch(name: str) -> None:
    """capturable and differentiable together: the for-loop's tensor path with autograd on."""
    row = ROW[name]
    kwargs = {**next(iter(CAPTURABLE_CONFIGS[name].values())), "capturable": True}
    run_against_torch(row, {**kwargs, "differentiable": True}, torch.float64, gaps=True)


# --- differentiable runs torch cannot always backpropagate through ---------------------------


def backward_through_steps(
    cls: type, kwargs: dict[str, Any], steps: int
) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
    """``steps`` differentiable steps from leaves; the gradients of a loss on the result."""
    torch.manual_seed(0)
    leaves = [
        torch.randn(shape, dtype=torch.float64, requires_grad=True) for shape in [(3, 2), (4,)]
    ]
    kwargs = copy.deepcopy(kwargs)
    hyper = tensors_in(kwargs)
    for t in hyper:
        t.data = t.data.double()
        t.requires_grad_(True)
    params = [leaf.clone() for leaf in leaves]
    optimizer = cls(params, differentiable=True, **kwargs)
    for step in range(1, steps + 1):
        set_grads(params, step, gaps=False)
        optimizer.step()
    loss = sum((p * p).sum() for p in params)
    return params, torch.autograd.grad(loss, leaves + hyper)


@pytest.mark.parametrize(
    ("name", "kwargs", "steps"),
    [
        # torch saves exp_avg for lr's gradient, then lerp_s it in place on the next step.
        pytest.param("NAdam", {"lr": torch.tensor(0.01)}, 3, id="NAdam-tensor-lr-3-steps"),
        pytest.param("NAdam", {"lr": 0.01, "weight_decay": 0.1}, 3, id="NAdam-3-steps"),
        # A tensor weight_decay becomes add's alpha, which must be a number.
        pytest.param("NAdam", {"weight_decay": torch.tensor(0.1)}, 1, id="NAdam-tensor-wd"),
        pytest.param(
            "RAdam",
            {"lr": torch.tensor(0.01), "weight_decay": 0.1, "betas": (0.9, 0.9)},
            6,
            id="RAdam-tensor-lr-6-steps",
        ),
        # centered with weight decay: grad_avg (which then depends on the parameters) is
        # saved for backward, then lerp_-ed in place on the next step.
        pytest.param(
            "RMSprop",
            {"lr": 0.01, "centered": True, "weight_decay": 0.1},
            2,
            id="RMSprop-centered-wd-2-steps",
        ),
        pytest.param(
            "RMSprop",
            {"lr": 0.01, "centered": True, "momentum": 0.9, "weight_decay": 0.1},
            1,
            id="RMSprop-centered-wd-1-step",
        ),
        pytest.param(
            "RMSprop",
            {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.1},
            3,
            id="RMSprop-momentum-wd-3-steps",
        ),
        # A tensor lr becomes add_'s alpha / addcdiv_'s value, which must be numbers.
        pytest.param("RMSprop", {"lr": torch.tensor(0.01)}, 1, id="RMSprop-tensor-lr"),
        # A tensor lr fills step_size with full_like, whose fill value must be a number.
        pytest.param("Rprop", {"lr": torch.tensor(0.01)}, 1, id="Rprop-tensor-lr"),
        pytest.param("Rprop", {"lr": 0.01, "maximize": True}, 4, id="Rprop-4-steps"),
    ],
)
def test_differentiable_runs_succeed_or_fail_like_torch(
    name: str, kwargs: dict[str, Any], steps: int
) -> None:
    """Where torch's differentiable step or its backward fails, ours fails alike; else the
    parameters and the gradients (of the leaves and tensor hyperparameters) are torch's."""
    ours_cls, theirs_cls = ROW[name].ours, ROW[name].torch_cls
    results: dict[str, Any] = {}
    if same_outcome(
        lambda: results.setdefault("ours", backward_through_steps(ours_cls, kwargs, steps)),
        lambda: results.setdefault("theirs", backward_through_steps(theirs_cls, kwargs, steps)),
    ):
        assert_bitwise_equal(list(results["ours"][0]), list(results["theirs"][0]), "params")
        assert_bitwise_equal(list(results["ours"][1]), list(results["theirs"][1]), "gradients")


# --- state that no longer fits its group ----------------------------------------------------


@pytest.mark.parametrize(
    ("name", "before", "after"),
    [
        pytest.param("RMSprop", {"momentum": 0.0}, {"momentum": 0.9}, id="RMSprop-momentum-on"),
        pytest.param("RMSprop", {"centered": False}, {"centered": True}, id="RMSprop-centered-on"),
        pytest.param("RMSprop", {"momentum": 0.9}, {"momentum": 0.0}, id="RMSprop-momentum-off"),
    ],
)
@pytest.mark.parametrize("foreach", [False, True])
def test_group_options_changed_after_the_state_was_made(
    name: str, before: dict[str, Any], after: dict[str, Any], foreach: bool
) -> None:
    """State made under one option, stepped under another: torch's KeyError, or its steps."""
    row = dataclasses.replace(ROW[name], groups=())
    optimizers = []
    for cls in (row.ours, row.torch_cls):
        torch.manual_seed(0)
        optimizer = cls([torch.randn(3), torch.randn(2, 2)], lr=0.01, foreach=foreach, **before)
        set_grads(all_params(optimizer), 1, gaps=False)
        optimizer.step()
        for key, value in after.items():
            optimizer.param_groups[0][key] = value
        set_grads(all_params(optimizer), 2, gaps=False)
        optimizers.append(optimizer)
    ours, theirs = optimizers
    if same_outcome(ours.step, theirs.step):
        assert_bitwise_equal(all_params(ours), all_params(theirs), "params")
        assert_bitwise_equal(ours.state_dict(), theirs.state_dict(), "state_dict")
