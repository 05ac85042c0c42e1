"""``remap`` with LR schedulers beside the optimizer: their per-group entries follow the group
mapping, proven by torch itself — the scheduler a training script builds for the new optimizer
loads the result and continues the old schedule for the carried groups."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from optckpt import save_layout
from tests.checks import assert_one_line_error, run
from tests.schedulers import SCHEDULERS, TwoLayers, make_optimizer, step, trained

# Every class whose entries optckpt can make for a new group (LambdaLR's lambdas are code).
FOLLOWING = [n for n in SCHEDULERS if n not in ("LambdaLR", "MultiplicativeLR")]


def _checkpoint(tmp_path: Path, name: str) -> tuple[Path, TwoLayers, torch.optim.Optimizer, Any]:
    model, optimizer, scheduler = trained(name)
    path = tmp_path / "ckpt.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        },
        path,
    )
    return path, model, optimizer, scheduler


def _grown(tmp_path: Path, name: str) -> tuple[Path, TwoLayers, torch.optim.Optimizer, Any]:
    """The new training script's model (one more layer, its own group), a fresh optimizer and
    scheduler built for it, and the layout they give."""
    model = TwoLayers(extra=True)
    optimizer = make_optimizer(model)
    scheduler = SCHEDULERS[name](optimizer)
    layout = tmp_path / "layout.json"
    save_layout(model, optimizer, layout)
    return layout, model, optimizer, scheduler


@pytest.mark.parametrize("name", FOLLOWING)
def test_torch_continues_the_schedule_after_a_group_is_added(tmp_path: Path, name: str) -> None:
    path, old_model, old_optimizer, old_scheduler = _checkpoint(tmp_path, name)
    layout, model, optimizer, scheduler = _grown(tmp_path, name)
    out = tmp_path / "out.pt"
    result = run("remap", path, "--to", layout, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    # Resume as a training script does: build, then load both state dicts.
    saved = torch.load(out, weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    assert len(scheduler.get_last_lr()) == 3
    step(old_scheduler, old_optimizer, old_model)
    step(scheduler, optimizer, model)
    assert scheduler.get_last_lr()[:2] == old_scheduler.get_last_lr()
    assert [g["lr"] for g in optimizer.param_groups[:2]] == [
        g["lr"] for g in old_optimizer.param_groups
    ]
    # The plan lists the new group's entries, and only real changes.
    changes = plan["scheduler_changes"]
    assert changes and all(c["group"] == 2 and c["old"] is None for c in changes)
    assert any(c["key"].endswith("_last_lr") for c in changes)


@pytest.mark.parametrize("name", ["StepLR", "LambdaLR", "CyclicLR", "SequentialLR"])
def test_swapped_groups_swap_their_entries(tmp_path: Path, name: str) -> None:
    path, old_model, old_optimizer, old_scheduler = _checkpoint(tmp_path, name)
    model = TwoLayers()
    groups = make_optimizer(model).param_groups
    swapped = torch.optim.SGD([groups[1], groups[0]], lr=0.1, momentum=0.9)
    scheduler = SCHEDULERS[name](swapped)
    layout = tmp_path / "layout.json"
    save_layout(model, swapped, layout)
    out = tmp_path / "out.pt"
    result = run("remap", path, "--to", layout, "-o", out)
    assert result.exit_code == 0, result.output
    saved = torch.load(out, weights_only=True)
    swapped.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    step(old_scheduler, old_optimizer, old_model)
    step(scheduler, swapped, model)
    assert scheduler.get_last_lr() == old_scheduler.get_last_lr()[::-1]


def _merged_layout(tmp_path: Path) -> Path:
    model = TwoLayers()
    layout = tmp_path / "merged.json"
    save_layout(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), layout)
    return layout


def test_a_merge_of_groups_on_different_schedules_is_refused(tmp_path: Path) -> None:
    path, *_ = _checkpoint(tmp_path, "StepLR")
    out = tmp_path / "out.pt"
    result = run("remap", path, "--to", _merged_layout(tmp_path), "-o", out)
    assert_one_line_error(result.stderr, "merges source groups on different schedules")
    assert result.exit_code == 4 and "--drop-scheduler" in result.stderr
    assert not out.exists()


def test_drop_scheduler_leaves_it_out_and_says_so(tmp_path: Path) -> None:
    path, *_ = _checkpoint(tmp_path, "StepLR")
    out = tmp_path / "out.pt"
    result = run(
        "remap", path, "--to", _merged_layout(tmp_path), "-o", out, "--drop-scheduler", "--json"
    )
    assert result.exit_code == 0, result.output
    (change,) = json.loads(result.stdout)["scheduler_changes"]
    assert (change["group"], change["key"], change["old"]) == (None, "scheduler", "StepLR")
    assert change["new"] is None
    assert change["why"].startswith("dropped (--drop-scheduler)")
    assert set(torch.load(out, weights_only=True)) == {"model", "optimizer"}


def test_a_lambda_scheduler_cannot_make_a_new_groups_entry(tmp_path: Path) -> None:
    path, *_ = _checkpoint(tmp_path, "LambdaLR")
    layout, *_ = _grown(tmp_path, "LambdaLR")
    result = run("remap", path, "--to", layout, "--dry-run")
    assert_one_line_error(result.stderr, "cannot give new group 2 a lr_lambdas", "code")
    assert result.exit_code == 4


def test_lightning_list_of_schedulers_follows(tmp_path: Path) -> None:
    model, optimizer, scheduler = trained("ExponentialLR")
    path = tmp_path / "l.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "optimizer_states": [optimizer.state_dict()],
            "lr_schedulers": [scheduler.state_dict()],
        },
        path,
    )
    layout, *_ = _grown(tmp_path, "ExponentialLR")
    result = run("remap", path, "--to", layout, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    keys = {c["key"] for c in json.loads(result.stdout)["scheduler_changes"]}
    assert keys == {"lr_schedulers.0.base_lrs", "lr_schedulers.0._last_lr"}


def test_no_scheduler_no_scheduler_changes(tmp_path: Path) -> None:
    model, optimizer, _ = trained("StepLR")
    path = tmp_path / "plain.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    layout, *_ = _grown(tmp_path, "StepLR")
    result = run("remap", path, "--to", layout, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    assert "scheduler_changes" not in json.loads(result.stdout)


def test_a_tied_merge_takes_the_lowest_source_group_as_hyperparameters_do() -> None:
    """A target group with as many parameters from source group 1 (seen first) as from 0
    carries group 0's entries, as changes.majority picks its hyperparameters."""
    from optckpt.changes import majority
    from optckpt.companions.remap import GroupMapping

    mapping = GroupMapping([[1, 0], [2, 1, 1]], [{}, {}], 3)
    assert [mapping.major(i) for i in range(2)] == [majority([1, 0])[0], majority([2, 1, 1])[0]]
    assert mapping.major(0) == 0
