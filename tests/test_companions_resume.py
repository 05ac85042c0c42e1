"""``resume-step`` checks that the companions agree and writes them unchanged with ``-o``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from checks import run, save_tree

from tests.schedulers import TwoLayers, make_optimizer, trained


def test_consistent_companions_pass_and_are_reported(tmp_path: Path) -> None:
    model, optimizer, scheduler = trained("CosineAnnealingLR")
    path = save_tree(
        tmp_path / "ckpt.pt",
        model=model.state_dict(),
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        scaler=torch.amp.GradScaler("cpu").state_dict(),
        epoch=1,
    )
    result = run("resume-step", path, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    (check,) = [c for c in report["checks"] if c["name"] == "companions agree"]
    assert check["ok"] is True
    assert "CosineAnnealingLR at 'scheduler'" in check["detail"]
    assert [c["kind"] for c in report["companions"]] == ["lr_scheduler", "grad_scaler", "trainer"]
    summary = report["companions"][0]["summary"]
    assert summary["last_lrs"] == scheduler.get_last_lr()


def test_a_scheduler_that_does_not_fit_fails_the_check(tmp_path: Path) -> None:
    _, _, scheduler = trained("StepLR")  # two groups
    model = TwoLayers(extra=True)
    optimizer = make_optimizer(model)  # three groups
    torch.optim.lr_scheduler.StepLR(optimizer, 2)
    path = save_tree(
        tmp_path / "ckpt.pt",
        model=model.state_dict(),
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
    )
    out = tmp_path / "out.pt"
    result = run("resume-step", path, "--json", "-o", out)
    assert result.exit_code == 1, result.output
    (check,) = [c for c in json.loads(result.stdout)["checks"] if c["name"] == "companions agree"]
    assert check["ok"] is False
    assert "StepLR at 'scheduler': scheduler: base_lrs has 2 entries" in check["detail"]
    assert not out.exists()


def test_output_keeps_the_companions_as_read_and_says_so(tmp_path: Path) -> None:
    model, optimizer, scheduler = trained("OneCycleLR")
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    path = save_tree(
        tmp_path / "ckpt.pt",
        model=model.state_dict(),
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        scaler=scaler.state_dict(),
    )
    out = tmp_path / "out.pt"
    result = run("resume-step", path, "--steps", "2", "-o", out)
    assert result.exit_code == 0, result.output
    assert "keeps OneCycleLR at 'scheduler', GradScaler at 'scaler' as read" in result.stderr
    written = torch.load(out, weights_only=True)
    assert written["scheduler"] == scheduler.state_dict()
    assert written["scaler"] == scaler.state_dict()
    # while the optimizer did advance
    before = optimizer.state_dict()["state"][0]["momentum_buffer"]
    assert not torch.equal(written["optimizer"]["state"][0]["momentum_buffer"], before)
