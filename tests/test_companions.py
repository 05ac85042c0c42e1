"""Companions (optckpt.companions) found, summarized and checked, against live torch objects:
every torch.optim.lr_scheduler class and a real torch.amp.GradScaler."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.optim import lr_scheduler as sched

from optckpt.companions import find_in_tree, guess_scheduler, is_scheduler_state
from optckpt.companions.kinds import expected_keys
from optckpt.inspect import inspect_checkpoint
from tests.checks import run
from tests.schedulers import SCHEDULERS, TwoLayers, make_optimizer, step, trained

NAMES = list(SCHEDULERS)
# Classes that keep base_lrs and a _step_count (every LRScheduler but the two wrappers).
_WRAPPERS = {"SequentialLR", "ChainedScheduler", "ReduceLROnPlateau"}


def _save(tmp_path: Path, tree: dict[str, Any], name: str = "ckpt.pt") -> Path:
    path = tmp_path / name
    torch.save(tree, path)
    return path


def _companions(path: Path) -> list[dict[str, Any]]:
    companions: list[dict[str, Any]] = inspect_checkpoint(path).to_json()["companions"]
    return companions


def _one(path: Path, kind: str) -> dict[str, Any]:
    (found,) = [c for c in _companions(path) if c["kind"] == kind]
    return found


@pytest.mark.parametrize("name", NAMES)
def test_declared_keys_are_the_installed_torch_classes(name: str) -> None:
    _, _, scheduler = trained(name)
    assert set(scheduler.state_dict()) == expected_keys(name)


@pytest.mark.parametrize("name", NAMES)
def test_every_class_is_found_and_named(name: str) -> None:
    _, _, scheduler = trained(name)
    state = scheduler.state_dict()
    assert is_scheduler_state(state)
    guess = guess_scheduler(state)
    assert guess.name is not None and name in guess.candidates
    if name in ("LambdaLR", "MultiplicativeLR"):  # the same keys: both offered, not sure
        assert set(guess.candidates) == {"LambdaLR", "MultiplicativeLR"}
        assert guess.confidence == 0.5
    else:
        assert (guess.name, guess.confidence, guess.candidates) == (name, 1.0, (name,))


def _check_summary(summary: dict[str, Any], scheduler: Any) -> None:
    """The summary against the live scheduler: what it set last, where it is."""
    assert summary["last_lrs"] == scheduler.get_last_lr()
    assert summary["last_epoch"] == scheduler.last_epoch
    if not isinstance(scheduler, (sched.SequentialLR, sched.ChainedScheduler)) and not isinstance(
        scheduler, sched.ReduceLROnPlateau
    ):
        assert summary["base_lrs"] == scheduler.base_lrs
        assert summary["step_count"] == scheduler._step_count


@pytest.mark.parametrize("name", NAMES)
def test_inspect_summarizes_each_scheduler_as_torch_holds_it(tmp_path: Path, name: str) -> None:
    model, optimizer, scheduler = trained(name)
    path = _save(
        tmp_path,
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        },
    )
    found = _one(path, "lr_scheduler")
    assert found["key"] == "scheduler"
    assert found["optimizer"] == "optimizer"
    assert name in found["class_guess"]["candidates"]
    assert found["warnings"] == []  # a consistent checkpoint
    summary = found["summary"]
    if name == "ChainedScheduler":
        assert summary["last_lrs"] == scheduler.get_last_lr()
    else:
        _check_summary(summary, scheduler)
    if name in ("SequentialLR", "ChainedScheduler"):
        children = scheduler._schedulers
        assert [c["class"] for c in summary["schedulers"]] == [type(c).__name__ for c in children]
        for child, live in zip(summary["schedulers"], children):
            _check_summary(child["summary"], live)
    if name == "SequentialLR":
        assert summary["milestones"] == scheduler._milestones
    if name == "MultiStepLR":  # a Counter in torch: each milestone as often as it counts
        assert summary["milestones"] == sorted(scheduler.milestones.elements())
    if name == "StepLR":
        assert (summary["step_size"], summary["gamma"]) == (2, 0.5)
    if name == "ReduceLROnPlateau":
        assert summary["min_lrs"] == scheduler.min_lrs
        assert summary["num_bad_epochs"] == scheduler.num_bad_epochs
    if name == "CosineAnnealingWarmRestarts":
        assert summary["T_cur"] == scheduler.T_cur


def test_lightning_style_list_of_schedulers_and_counters(tmp_path: Path) -> None:
    _, optimizer, scheduler = trained("StepLR")
    path = _save(
        tmp_path,
        {
            "epoch": 4,
            "global_step": 3,
            "optimizer_states": [optimizer.state_dict()],
            "lr_schedulers": [scheduler.state_dict()],
        },
    )
    found = _companions(path)
    assert [c["key"] for c in found] == ["lr_schedulers.0", ""]
    assert found[1]["kind"] == "trainer"
    assert found[1]["summary"] == {"global_step": 3, "epoch": 4}


def test_several_optimizers_leave_a_scheduler_unpaired(tmp_path: Path) -> None:
    _, a, scheduler = trained("StepLR")
    _, b, _ = trained("StepLR")
    state = scheduler.state_dict()
    path = _save(tmp_path, {"g": a.state_dict(), "d": b.state_dict(), "sched": state})
    found = _one(path, "lr_scheduler")
    assert found["optimizer"] is None and found["warnings"] == []


def test_among_several_optimizers_the_one_with_its_lrs_is_driven(tmp_path: Path) -> None:
    _, generator, scheduler = trained("ExponentialLR")  # decayed lrs
    discriminator = make_optimizer(TwoLayers())  # the constructor's lrs
    path = _save(
        tmp_path,
        {
            "opt_d": discriminator.state_dict(),
            "opt_g": generator.state_dict(),
            "sched": scheduler.state_dict(),
        },
    )
    assert _one(path, "lr_scheduler")["optimizer"] == "opt_g"


# --------------------------------------------------------------------------- warnings


def test_a_scheduler_for_another_group_count_is_a_warning(tmp_path: Path) -> None:
    _, _, scheduler = trained("CosineAnnealingLR")  # built for two groups
    bigger = TwoLayers(extra=True)
    optimizer = make_optimizer(bigger)  # three groups
    sched.CosineAnnealingLR(optimizer, T_max=10)  # sets initial_lr, as any scheduler would
    path = _save(
        tmp_path,
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
    )
    warnings = _one(path, "lr_scheduler")["warnings"]
    assert any("base_lrs has 2 entries, the optimizer has 3 param groups" in w for w in warnings)
    assert any("_last_lr has 2 entries" in w for w in warnings)


def test_nested_schedulers_are_checked_too(tmp_path: Path) -> None:
    _, _, scheduler = trained("SequentialLR")
    optimizer = make_optimizer(TwoLayers(extra=True))
    sched.StepLR(optimizer, 2)
    path = _save(
        tmp_path,
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
    )
    warnings = _one(path, "lr_scheduler")["warnings"]
    assert any(w.startswith("scheduler, scheduler 1 (StepLR): base_lrs") for w in warnings)


def test_a_group_lr_changed_behind_the_schedulers_back_is_a_warning(tmp_path: Path) -> None:
    _, optimizer, scheduler = trained("ExponentialLR")
    optimizer.param_groups[1]["lr"] = 0.3  # a hand-written warmup in the loop
    path = _save(
        tmp_path,
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
    )
    (warning,) = _one(path, "lr_scheduler")["warnings"]
    last = scheduler.get_last_lr()[1]
    assert warning.startswith(f"group 1: lr 0.3 is not the lr the scheduler set last ({last:g})")


def test_an_optimizer_saved_without_initial_lr_is_a_warning(tmp_path: Path) -> None:
    _, _, scheduler = trained("OneCycleLR")
    fresh = make_optimizer(TwoLayers())  # never had a scheduler: no initial_lr, max_lr, ...
    for group, lr in zip(fresh.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    path = _save(
        tmp_path,
        {"optimizer": fresh.state_dict(), "scheduler": scheduler.state_dict()},
    )
    warnings = _one(path, "lr_scheduler")["warnings"]
    lacking = [w.split(" lack ")[1].split(",")[0] for w in warnings]
    assert lacking == ["initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum"]
    # torch agrees: OneCycleLR cannot be built on it to resume
    with pytest.raises(KeyError):
        sched.OneCycleLR(fresh, max_lr=1.0, total_steps=10, last_epoch=3)


def test_reduce_on_plateau_needs_no_initial_lr(tmp_path: Path) -> None:
    _, _, scheduler = trained("ReduceLROnPlateau")
    fresh = make_optimizer(TwoLayers())
    for group, lr in zip(fresh.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    path = _save(
        tmp_path,
        {"optimizer": fresh.state_dict(), "scheduler": scheduler.state_dict()},
    )
    assert _one(path, "lr_scheduler")["warnings"] == []


def test_last_epoch_against_the_optimizer_step_is_reported_not_warned(tmp_path: Path) -> None:
    model = TwoLayers()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    scheduler = sched.StepLR(optimizer, 2)
    for _ in range(4):  # four optimizer steps, one epoch
        optimizer.zero_grad()
        model(torch.randn(5, 3)).sum().backward()
        optimizer.step()
    scheduler.step()
    path = _save(
        tmp_path, {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    )
    found = _one(path, "lr_scheduler")
    assert found["warnings"] == []
    assert found["observations"][0].startswith("last_epoch 1, the optimizer's step 4")


# --------------------------------------------------------------------------- GradScaler


def test_grad_scaler_summary_is_the_live_scaler(tmp_path: Path) -> None:
    model = TwoLayers()
    optimizer = make_optimizer(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
    for _ in range(3):
        optimizer.zero_grad()
        scaler.scale(model(torch.randn(5, 3)).pow(2).mean()).backward()
        scaler.step(optimizer)
        scaler.update()
    path = _save(tmp_path, {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()})
    found = _one(path, "grad_scaler")
    assert found["key"] == "scaler" and found["class"] == "GradScaler"
    assert found["summary"] == {
        "scale": scaler.get_scale(),
        "growth_tracker": scaler._get_growth_tracker(),
        "growth_factor": scaler.get_growth_factor(),
        "backoff_factor": scaler.get_backoff_factor(),
        "growth_interval": scaler.get_growth_interval(),
    }
    assert found["summary"]["scale"] == 1024.0 * 2**3  # grew at every step
    assert found["warnings"] == []


@pytest.mark.parametrize("scale", [0.0, math.inf])
def test_a_dead_scale_is_a_warning(tmp_path: Path, scale: float) -> None:
    model = TwoLayers()
    optimizer = make_optimizer(model)
    scaler = torch.amp.GradScaler("cpu")
    optimizer.zero_grad()
    scaler.scale(model(torch.randn(5, 3)).sum()).backward()
    scaler.step(optimizer)
    scaler.update(new_scale=scale)
    path = _save(tmp_path, {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()})
    found = _one(path, "grad_scaler")
    assert found["summary"]["scale"] == ("inf" if scale else 0.0)
    (warning,) = found["warnings"]
    assert warning.startswith(f"GradScaler scale is {scale:g}")


# --------------------------------------------------------------------------- finding, CLI


def test_a_scheduler_is_not_looked_for_inside_an_optimizer() -> None:
    _, optimizer, scheduler = trained("StepLR")
    tree = {"optimizer": optimizer.state_dict(), "nested": {"s": scheduler.state_dict()}}
    assert [c.key for c in find_in_tree(tree)] == ["nested.s"]


def test_inspect_shows_each_companion(tmp_path: Path) -> None:
    _, optimizer, scheduler = trained("SequentialLR")
    path = _save(
        tmp_path,
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": torch.amp.GradScaler("cpu").state_dict(),
            "epoch": 2,
        },
    )
    result = run("inspect", path)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "lr scheduler at 'scheduler': SequentialLR, drives 'optimizer'" in out
    assert "scheduler 0: LinearLR" in out and "scheduler 1: StepLR" in out
    assert "grad scaler at 'scaler': GradScaler" in out
    assert "trainer at the top level: counters" in out
    step(scheduler, optimizer, TwoLayers())  # keeps the helper honest: the live objects still step


def test_companion_modules_import_no_torch_at_module_level() -> None:
    # inspect shows companions on its torch-free path too (issue 17): torch only inside
    # functions that need it.
    import ast

    import optckpt.companions

    folder = Path(optckpt.companions.__file__).parent
    for module in sorted(folder.glob("*.py")):
        tree = ast.parse(module.read_text())
        for node in tree.body:
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(n == "torch" or n.startswith("torch.") for n in names), module.name
