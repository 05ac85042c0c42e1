"""optckpt.optim.guess against every optimizer class of the installed ``torch.optim``.

The classes are enumerated from ``torch.optim`` itself, so a torch upgrade that adds an
optimizer, or a group key, fails here until the guesser's tables know it.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from checks import TORCH_CLASSES
from torch import nn

from optckpt.optim import guess as guess_module
from optckpt.optim.guess import guess_optimizer

# Group keys torch added over the releases; a checkpoint from an older torch lacks them.
VERSIONED_KEYS = {
    "foreach",
    "maximize",
    "capturable",
    "differentiable",
    "fused",
    "decoupled_weight_decay",
}

# Options that make an optimizer write its optional state keys.
OPTIONS: dict[str, list[dict[str, Any]]] = {
    "SGD": [{}, {"momentum": 0.9}, {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1}],
    "Adam": [{}, {"amsgrad": True}, {"weight_decay": 0.1}],
    "AdamW": [{}, {"amsgrad": True}, {"weight_decay": 0.0}],
    "RMSprop": [{}, {"momentum": 0.5, "centered": True}],
    "NAdam": [{}, {"decoupled_weight_decay": True, "weight_decay": 0.1}],
    "RAdam": [{}, {"decoupled_weight_decay": True, "weight_decay": 0.1}],
    "Adagrad": [{}, {"lr_decay": 0.1}],
}


def _cases() -> list[tuple[str, dict[str, Any]]]:
    return [(name, kw) for name in sorted(TORCH_CLASSES) for kw in OPTIONS.get(name, [{}])]


def _build(name: str, **kwargs: Any) -> tuple[nn.Module, torch.optim.Optimizer]:
    if name == "SparseAdam":
        model: nn.Module = nn.Embedding(10, 3, sparse=True)  # SparseAdam takes sparse grads only
    elif name == "Muon":
        model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2, bias=False))  # 2-D only
    else:
        model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    return model, TORCH_CLASSES[name](model.parameters(), **kwargs)


def _step(name: str, model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 2) -> None:
    for _ in range(steps):

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            x = torch.randint(0, 10, (6,)) if name == "SparseAdam" else torch.randn(6, 4)
            loss = model(x).square().mean()
            loss.backward()
            return loss

        optimizer.step(closure)  # every torch optimizer takes a closure; LBFGS needs one


def _stepped(name: str, **kwargs: Any) -> dict[str, Any]:
    model, optimizer = _build(name, **kwargs)
    _step(name, model, optimizer)
    return optimizer.state_dict()


def test_the_guesser_knows_every_torch_optimizer() -> None:
    # The keys it compares are optckpt.optim.specs' (tests/optim/test_specs.py checks them).
    assert set(guess_module.CANDIDATES) == set(TORCH_CLASSES)


@pytest.mark.parametrize(("name", "kwargs"), _cases())
def test_stepped_state_dict(name: str, kwargs: dict[str, Any]) -> None:
    guess = guess_optimizer(_stepped(name, **kwargs))
    assert guess.name == name
    assert guess.sure
    assert guess.candidates == (name,)


@pytest.mark.parametrize(("name", "kwargs"), _cases())
def test_before_any_step(name: str, kwargs: dict[str, Any]) -> None:
    _, optimizer = _build(name, **kwargs)
    sd = optimizer.state_dict()  # Adagrad fills its state at construction, the others do not
    for state_dict in (sd, {**sd, "state": {}}):
        guess = guess_optimizer(state_dict)
        assert (guess.name, guess.sure) == (name, True)


def test_named_parameters_and_scheduler_keys_do_not_confuse_it() -> None:
    model = nn.Linear(4, 3)
    optimizer = torch.optim.RAdam(model.named_parameters())
    torch.optim.lr_scheduler.StepLR(optimizer, step_size=3)  # adds initial_lr to every group
    _step("RAdam", model, optimizer)
    sd = optimizer.state_dict()
    assert "param_names" in sd["param_groups"][0] and "initial_lr" in sd["param_groups"][0]
    guess = guess_optimizer(sd)
    assert (guess.name, guess.sure) == ("RAdam", True)


@pytest.mark.parametrize(("flag", "name"), [(False, "Adam"), (True, "AdamW")])
def test_adam_and_adamw_are_told_apart_by_decoupled_weight_decay(flag: bool, name: str) -> None:
    # torch.optim.Adam(decoupled_weight_decay=True) is AdamW in all but name: the flag decides.
    sd = _stepped("Adam", decoupled_weight_decay=flag, weight_decay=0.1)
    guess = guess_optimizer(sd)
    assert (guess.name, guess.sure, guess.candidates) == (name, True, (name,))
    assert "decoupled_weight_decay" in guess.reason


@pytest.mark.parametrize("source", ["Adam", "AdamW"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_without_decoupled_weight_decay_it_cannot_be_sure(source: str, weight_decay: float) -> None:
    sd = _stepped(source, weight_decay=weight_decay)
    for group in sd["param_groups"]:
        del group["decoupled_weight_decay"]  # as torch < 2.6 wrote it
    guess = guess_optimizer(sd)
    assert set(guess.candidates) == {"Adam", "AdamW"}
    assert not guess.sure
    assert guess.name == ("AdamW" if weight_decay else "Adam")


def _as_older_torch(sd: dict[str, Any], dropped: set[str]) -> dict[str, Any]:
    old = copy.deepcopy(sd)
    for group in old["param_groups"]:
        for key in dropped:
            group.pop(key, None)
    return old


@pytest.mark.parametrize("name", sorted(TORCH_CLASSES))
@pytest.mark.parametrize("stepped", [True, False])
def test_older_torch_groups_are_never_confidently_wrong(name: str, stepped: bool) -> None:
    """Checkpoints from a torch that had none of the versioned group keys yet."""
    model, optimizer = _build(name)
    if stepped:
        _step(name, model, optimizer)
    guess = guess_optimizer(_as_older_torch(optimizer.state_dict(), VERSIONED_KEYS))
    if guess.sure:
        assert guess.name == name
    assert name in guess.candidates
    if stepped and name not in ("Adam", "AdamW"):
        assert guess.name == name


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_torch_1_11_adam_family_checkpoint(name: str) -> None:
    # torch 1.11's Adam and AdamW groups: lr betas eps weight_decay amsgrad maximize.
    sd = _as_older_torch(_stepped(name), VERSIONED_KEYS - {"maximize"})
    assert set(sd["param_groups"][0]) == {
        "params",
        "lr",
        "betas",
        "eps",
        "weight_decay",
        "amsgrad",
        "maximize",
    }
    guess = guess_optimizer(sd)
    assert set(guess.candidates) == {"Adam", "AdamW"}
    assert not guess.sure


GARBAGE = [
    {"state": {}, "param_groups": []},
    {"state": {}, "param_groups": [{"params": [0]}]},
    {"state": {}, "param_groups": [{"params": [0], "colour": "red", "size": 3}]},
    {"state": {0: {"banana": torch.zeros(2)}}, "param_groups": [{"params": [0], "colour": "red"}]},
    {
        "state": {0: {"banana": torch.zeros(2), "step": torch.tensor(1.0)}},
        "param_groups": [{"params": [0]}],
    },
]


@pytest.mark.parametrize("sd", GARBAGE)
def test_garbage_is_no_optimizer(sd: dict[str, Any]) -> None:
    guess = guess_optimizer(sd)
    assert guess.name is None
    assert not guess.sure


@pytest.mark.parametrize("beta1", [None, 0.9])
@pytest.mark.parametrize("stepped", [True, False])
def test_transformers_adafactor_is_an_unknown_optimizer_with_no_candidates(
    beta1: float | None, stepped: bool
) -> None:
    # transformers' own Adafactor (rebuilt from its source: transformers is not installed):
    # exp_avg_sq_row / exp_avg_sq_col / RMS are no torch.optim class's, whatever else fits.
    from real.transformers_adafactor import stepped_state_dict

    sd = stepped_state_dict(beta1=beta1, steps=2 if stepped else 0)
    guess = guess_optimizer(sd)
    assert (guess.name, guess.candidates, guess.sure) == (None, (), False)
    if stepped:
        first = "exp_avg, " if beta1 else ""
        keys = f"RMS, {first}exp_avg_sq, exp_avg_sq_col, exp_avg_sq_row"
        assert guess.reason == f"state keys {keys}, step fit no torch.optim class"
    else:
        assert guess.reason.startswith("group keys beta1, clip_threshold, decay_rate")
        assert guess.reason.endswith("fit no torch.optim class")


def test_state_keys_of_no_class_beat_group_keys_that_fit() -> None:
    sd = _stepped("Adam")
    for state in sd["state"].values():
        state["RMS"] = torch.tensor(1.0)
    guess = guess_optimizer(sd)
    assert (guess.name, guess.candidates) == (None, ())
    assert "RMS" in guess.reason


def test_one_cycle_lr_keys_are_no_evidence() -> None:
    model = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=10)
    _step("SGD", model, optimizer)
    sd = optimizer.state_dict()
    assert {"max_lr", "min_lr", "max_momentum", "base_momentum"} <= set(sd["param_groups"][0])
    guess = guess_optimizer(sd)
    assert (guess.name, guess.sure, guess.confidence) == ("SGD", True, 1.0)
