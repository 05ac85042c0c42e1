"""Adagrad, Adadelta, Adamax and ASGD against ``torch.optim``, beyond the parity table.

The table rows live in ``rows_adagrad_family.py``; here are the behaviours the table cannot
express (``test_base`` checks the constructor signatures): Adagrad's sparse gradients, its
state created at construction from the optimizer-wide ``initial_accumulator_value``, its
``__setstate__`` and ``share_memory``, and torch's differentiable Adamax failing after one
step.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pytest
import torch
from checks import changed_in_2_13
from test_parity import all_params, assert_bitwise_equal, assert_same_run, same_outcome, set_grads

from optckpt.optim import Adagrad, Adamax


def sparse_grad(step: int) -> torch.Tensor:
    """A sparse gradient of a (4, 3) weight with a repeated row index (so it needs coalescing)."""
    generator = torch.Generator().manual_seed(step)
    values = torch.randn(3, 3, generator=generator)
    return torch.sparse_coo_tensor(torch.tensor([[0, 2, 0]]), values, (4, 3), check_invariants=True)


@pytest.mark.parametrize("impl", [{"foreach": False}, {"foreach": True}, {}])
@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"lr": 0.5}, id="plain"),
        pytest.param({"lr": 0.5, "lr_decay": 0.1, "maximize": True}, id="decay-maximize"),
        pytest.param({"lr": 0.5, "initial_accumulator_value": 0.3, "eps": 1e-3}, id="init-eps"),
    ],
)
def test_adagrad_sparse_grads_step_like_torch(kwargs: dict[str, Any], impl: dict[str, Any]) -> None:
    """torch's sparse path (coalesce, masked sqrt); foreach falls back to it per bucket."""
    opts = []
    for cls in (Adagrad, torch.optim.Adagrad):
        dense = torch.arange(6.0).reshape(3, 2)
        weight = torch.arange(12.0).reshape(4, 3)
        opts.append(cls([weight, dense], **kwargs, **impl))
    for step in range(1, 5):
        for opt in opts:
            weight, dense = all_params(opt)
            weight.grad = sparse_grad(step)
            dense.grad = torch.full((3, 2), 0.1 * step)
            opt.step()
        assert_same_run(opts[0], opts[1], f"after step {step}")


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"weight_decay": 0.1}, id="weight-decay"),
        pytest.param({"fused": True}, id="fused"),
        pytest.param({"foreach": True, "weight_decay": 0.1}, id="foreach-weight-decay"),
    ],
)
def test_adagrad_refuses_sparse_grads_like_torch(kwargs: dict[str, Any]) -> None:
    steps = []
    for cls in (Adagrad, torch.optim.Adagrad):
        weight = torch.zeros(4, 3)
        weight.grad = sparse_grad(1)
        steps.append(cls([weight], **kwargs).step)
    assert not same_outcome(*steps)


@changed_in_2_13("a group added later has no Adagrad state (KeyError: 'sum' on its step)")
@pytest.mark.parametrize("impl", [{"foreach": False}, {"foreach": True}, {"fused": True}])
def test_adagrad_state_of_added_groups_uses_the_default_accumulator_value(
    impl: dict[str, Any],
) -> None:
    """State exists from construction; a group added later gets its state on its first grad,
    from the optimizer-wide ``initial_accumulator_value``, not its own (as in torch)."""
    opts = []
    for cls in (Adagrad, torch.optim.Adagrad):
        torch.manual_seed(0)
        opt = cls([torch.randn(3), torch.randn(2, 2)], initial_accumulator_value=0.25, **impl)
        opts.append(opt)
    assert_same_run(opts[0], opts[1], "after construction")
    assert len(opts[0].state_dict()["state"]) == 2
    for opt in opts:
        torch.manual_seed(1)
        opt.add_param_group({"params": [torch.randn(4)], "initial_accumulator_value": 2.0})
    assert_same_run(opts[0], opts[1], "after add_param_group")
    for step in (1, 2, 3):
        for opt in opts:
            set_grads(all_params(opt), step, gaps=False)
            if step == 1:
                all_params(opt)[2].grad = torch.zeros(4)  # the new sum keeps its start value
            opt.step()
        assert_same_run(opts[0], opts[1], f"after step {step}")
        if step == 1:
            assert torch.equal(opts[0].state[all_params(opts[0])[2]]["sum"], torch.full((4,), 0.25))


def test_adagrad_setstate_converts_number_steps_of_stray_state_like_torch() -> None:
    """torch's second pass: if the first state's ``step`` is still a number (state of a
    parameter in no group), every ``step`` is made a tensor."""
    results = []
    for cls in (Adagrad, torch.optim.Adagrad):
        p, stray = torch.zeros(2), torch.zeros(3, dtype=torch.float64)
        opt = cls([p], lr=0.1)
        state: defaultdict[Any, dict[str, Any]] = defaultdict(dict)
        state[stray] = {"step": 4, "sum": torch.ones(3, dtype=torch.float64)}
        state[p] = {"step": 2, "sum": torch.ones(2)}
        opt.__setstate__({"state": state, "param_groups": opt.param_groups})
        results.append([s["step"] for s in opt.state.values()])
    assert_bitwise_equal(results[0], results[1], "steps")
    assert results[0][0].dtype == torch.float32


def test_adagrad_share_memory_shares_the_sums() -> None:
    opt = Adagrad([torch.zeros(3), torch.zeros(2)])
    opt.share_memory()
    assert all(state["sum"].is_shared() for state in opt.state.values())


def test_adamax_differentiable_fails_on_a_second_step_like_torch() -> None:
    """torch's differentiable Adamax updates ``exp_avg`` in place after ``addcdiv_`` saved it
    for backward, so a backward through two steps fails; ours keeps torch's ops, and fails too.
    """
    outcomes = []
    for cls in (Adamax, torch.optim.Adamax):
        leaf = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
        params = [leaf.clone()]
        opt = cls(params, differentiable=True, lr=0.01)
        for step in (1, 2):
            set_grads(params, step, gaps=False)
            opt.step()
        loss = (params[0] * params[0]).sum()
        outcomes.append(lambda loss=loss, leaf=leaf: torch.autograd.grad(loss, [leaf]))
    assert not same_outcome(outcomes[0], outcomes[1])
