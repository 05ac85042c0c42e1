"""SparseAdam, Adafactor, LBFGS and Muon against ``torch.optim``, beyond the parity table.

The table rows live in ``rows_special.py``; here are the behaviours the table cannot express
(``test_base`` checks the constructor signatures): SparseAdam's refusal of dense grads and
sparse parameters, LBFGS's single group, losses, sparse grads and line-search corner, Muon's
2-D-only parameters and a group's unknown ``adjust_lr_fn``, and loading groups saved without
the newer keys.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from test_parity import (
    ROWS,
    all_params,
    assert_bitwise_equal,
    assert_same_run,
    same_outcome,
    set_grads,
)

from optckpt.optim import LBFGS, Adafactor, Muon, SparseAdam

# The rows' feeders, taken from the table: importing rows_special before test_parity would
# close the import cycle between them the wrong way round.
_BY_NAME = {row.name: row for row in ROWS}
sparse_grad = _BY_NAME["SparseAdam"].grad
lbfgs_closure = _BY_NAME["LBFGS"].closure
one_dtype = _BY_NAME["LBFGS"].params
assert sparse_grad is not None and lbfgs_closure is not None and one_dtype is not None

PAIRS = [
    pytest.param(ours, getattr(torch.optim, ours.__name__), id=ours.__name__)
    for ours in (SparseAdam, Adafactor, LBFGS, Muon)
]


def refused_alike(ours: Any, theirs: Any) -> None:
    """torch raises; ours raises the same type (or a subclass)."""
    assert not same_outcome(ours, theirs), "torch accepts this"


@pytest.mark.parametrize(("ours", "theirs"), PAIRS)
def test_step_returns_the_closures_loss(ours: type, theirs: type) -> None:
    losses = []
    for cls in (ours, theirs):
        params = [torch.ones(2, 3), torch.ones(3, 2)]
        optimizer = cls(params)
        if cls.__name__ == "SparseAdam":
            set_grads(params, 1, gaps=False, to_grad=sparse_grad)
        else:
            set_grads(params, 1, gaps=False)
        closure = lbfgs_closure(params, 1, False) if cls.__name__ == "LBFGS" else lambda: 42.0
        losses.append(optimizer.step(closure))
    assert_bitwise_equal(losses[0], losses[1], "loss")


# --- SparseAdam ---------------------------------------------------------------------------------


def test_sparse_adam_refuses_a_dense_grad_like_torch() -> None:
    """A dense grad fails the step after the sparse ones before it have stepped, as in torch."""
    runs = []
    for cls in (SparseAdam, torch.optim.SparseAdam):
        params = [torch.ones(4, 3), torch.ones(4, 3), torch.ones(2, 3)]
        set_grads(params, 1, gaps=False)
        params[0].grad = params[0].grad.to_sparse()
        runs.append(cls(params, lr=0.1))
    ours, theirs = runs
    refused_alike(ours.step, theirs.step)
    assert_same_run(ours, theirs, "after the refused step")
    assert len(theirs.state) == 1


def test_sparse_adam_refuses_sparse_params_like_torch() -> None:
    def params() -> list[torch.Tensor]:
        return [torch.ones(2, 2), torch.ones(2, 2).to_sparse()]

    refused_alike(lambda: SparseAdam(params()), lambda: torch.optim.SparseAdam(params()))


def test_sparse_adam_steps_groups_saved_without_maximize_like_torch() -> None:
    """torch reads ``maximize`` with ``.get``: groups from before it existed still step."""
    source = torch.optim.SparseAdam([torch.ones(4, 3)])
    saved = source.state_dict()
    del saved["param_groups"][0]["maximize"]
    runs = []
    for cls in (SparseAdam, torch.optim.SparseAdam):
        optimizer = cls([torch.ones(4, 3)])
        optimizer.load_state_dict(copy.deepcopy(saved))
        set_grads(all_params(optimizer), 1, to_grad=sparse_grad)
        optimizer.step()
        runs.append(optimizer)
    assert_same_run(*runs, "after a step")


# --- Adafactor ----------------------------------------------------------------------------------


def test_adafactor_fills_foreach_when_loading_old_groups_like_torch() -> None:
    source = torch.optim.Adafactor([torch.ones(2, 3), torch.ones(3)])
    set_grads(all_params(source), 1, gaps=False)
    source.step()
    saved = source.state_dict()
    del saved["param_groups"][0]["foreach"]
    runs = []
    for cls in (Adafactor, torch.optim.Adafactor):
        optimizer = cls([torch.ones(2, 3), torch.ones(3)])
        optimizer.load_state_dict(copy.deepcopy(saved))
        assert optimizer.param_groups[0]["foreach"] is None
        runs.append(optimizer)
    assert_same_run(*runs, "after loading")


# --- LBFGS --------------------------------------------------------------------------------------


def test_lbfgs_refuses_several_groups_like_torch() -> None:
    def groups() -> list[dict[str, Any]]:
        return [{"params": [torch.ones(2)]}, {"params": [torch.ones(2)], "lr": 0.1}]

    refused_alike(lambda: LBFGS(groups()), lambda: torch.optim.LBFGS(groups()))


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_lbfgs_steps_sparse_grads_like_torch(line_search_fn: str | None) -> None:
    """The closure may set sparse grads; LBFGS densifies them."""
    start = one_dtype(torch.float32)
    runs = []
    for cls in (LBFGS, torch.optim.LBFGS):
        params = [p.clone() for p in start]
        dense_closure = lbfgs_closure(params, 1, False)

        def closure(params: list[torch.Tensor] = params, dense: Any = dense_closure) -> Any:
            loss = dense()
            for p in params:
                p.grad = p.grad.to_sparse()
            return loss

        optimizer = cls(params, max_iter=4, line_search_fn=line_search_fn)
        for _ in range(2):
            optimizer.step(closure)
        runs.append(optimizer)
    assert_same_run(*runs, "after two steps")


def test_lbfgs_fails_like_torch_without_evaluations_left() -> None:
    """``max_eval=0`` leaves the line search a negative budget: torch fails, and so do we."""
    start = one_dtype(torch.float64)
    runs = []
    for cls in (LBFGS, torch.optim.LBFGS):
        params = [p.clone() for p in start]
        optimizer = cls(params, max_eval=0, line_search_fn="strong_wolfe")
        runs.append((optimizer, lbfgs_closure(params, 1, False)))
    (ours, ours_closure), (theirs, theirs_closure) = runs
    refused_alike(lambda: ours.step(ours_closure), lambda: theirs.step(theirs_closure))


# --- Muon ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3,), (2, 2, 2), ()])
def test_muon_refuses_params_that_are_not_matrices_like_torch(shape: tuple[int, ...]) -> None:
    def params() -> list[torch.Tensor]:
        return [torch.ones(2, 2), torch.ones(shape)]

    refused_alike(lambda: Muon(params()), lambda: torch.optim.Muon(params()))


def test_muon_group_with_another_adjust_lr_fn_steps_unscaled_like_torch() -> None:
    """Only the constructor checks ``adjust_lr_fn``; an unknown one in a group means no scaling."""
    runs = []
    for cls in (Muon, torch.optim.Muon):
        params = [torch.ones(4, 2), torch.ones(2, 5)]
        optimizer = cls([{"params": params, "adjust_lr_fn": "unscaled"}], lr=0.1)
        for step in (1, 2):
            set_grads(params, step, gaps=False)
            optimizer.step()
        runs.append(optimizer)
    assert_same_run(*runs, "after two steps")
