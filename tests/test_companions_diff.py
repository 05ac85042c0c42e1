"""``diff`` compares companions: real torch schedulers and GradScalers, same exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from checks import run, save_tree

from tests.schedulers import step, trained


def test_the_same_training_state_is_identical(tmp_path: Path) -> None:
    _, optimizer, scheduler = trained("OneCycleLR")
    tree = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": torch.amp.GradScaler("cpu").state_dict(),
    }
    a = save_tree(tmp_path / "a.pt", **tree)
    b = save_tree(tmp_path / "b.pt", **tree)
    result = run("diff", a, b, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["companions"] == []


def test_a_scheduler_one_step_on_differs_where_torch_moved_it(tmp_path: Path) -> None:
    model, optimizer, scheduler = trained("StepLR", steps=1)
    before = scheduler.state_dict()
    a = save_tree(tmp_path / "a.pt", scheduler=before)
    step(scheduler, optimizer, model)
    b = save_tree(tmp_path / "b.pt", scheduler=scheduler.state_dict())
    # the optimizer alone is the same in both: only the scheduler differs
    for path in (a, b):
        tree = torch.load(path, weights_only=True)
        torch.save({**tree, "optimizer": optimizer.state_dict()}, path)
    result = run("diff", a, b, "--json")
    assert result.exit_code == 1, result.output
    found = json.loads(result.stdout)
    assert found["ok"] is False and found["pairs"][0]["differences"] == []
    moved = {d["where"]: (d["a"], d["b"]) for d in found["companions"]}
    after = scheduler.state_dict()
    expected = {
        f"scheduler.{k}": (before[k], after[k])
        for k in ("last_epoch", "_step_count")
        if before[k] != after[k]
    } | {
        f"scheduler._last_lr.{i}": (x, y)
        for i, (x, y) in enumerate(zip(before["_last_lr"], after["_last_lr"]))
        if x != y
    }
    assert moved == expected
    text = run("diff", a, b)
    assert text.exit_code == 1 and "scheduler.last_epoch" in text.stdout


def test_a_scaler_only_in_b_is_a_difference(tmp_path: Path) -> None:
    _, optimizer, _ = trained("StepLR")
    a = save_tree(tmp_path / "a.pt", optimizer=optimizer.state_dict())
    b = save_tree(
        tmp_path / "b.pt",
        optimizer=optimizer.state_dict(),
        scaler=torch.amp.GradScaler("cpu").state_dict(),
    )
    result = run("diff", a, b, "--json")
    assert result.exit_code == 1
    (only,) = json.loads(result.stdout)["companions"]
    assert (only["kind"], only["where"], only["b"]) == ("companion_added", "scaler", "GradScaler")


def test_keys_compare_only_those_optimizers(tmp_path: Path) -> None:
    _, optimizer, scheduler = trained("StepLR")
    a = save_tree(tmp_path / "a.pt", optimizer=optimizer.state_dict())
    b = save_tree(
        tmp_path / "b.pt", optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict()
    )
    result = run("diff", a, b, "--key-a", "optimizer", "--key-b", "optimizer")
    assert result.exit_code == 0, result.output
