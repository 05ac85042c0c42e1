"""Companions in what the training libraries write: a Lightning ``.ckpt`` (a GAN's StepLR
beside two optimizers, the trainer's counters) and a transformers Trainer ``checkpoint-N/``
(``scheduler.pt``, a LambdaLR, and ``trainer_state.json``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from checks import run

from optckpt.inspect import inspect_checkpoint

from .conftest import TrainingOutputs

pytestmark = pytest.mark.slow


def _by_kind(companions: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    assert len({c["kind"] for c in companions}) == len(companions)
    return {c["kind"]: c for c in companions}


def test_lightning_scheduler_and_counters(training_outputs: TrainingOutputs) -> None:
    path = training_outputs.lightning
    saved = torch.load(path, weights_only=False)  # what Lightning wrote, read by torch
    found = _by_kind(inspect_checkpoint(path).to_json()["companions"])
    scheduler = found["lr_scheduler"]
    assert (scheduler["key"], scheduler["class"]) == ("lr_schedulers.0", "StepLR")
    # the generator's Adam, the one the StepLR was built on (configure_optimizers)
    assert scheduler["optimizer"] == "optimizer_states.0"
    assert scheduler["warnings"] == []
    generator_groups = saved["optimizer_states"][0]["param_groups"]
    assert scheduler["summary"]["last_lrs"] == [g["lr"] for g in generator_groups]
    assert scheduler["summary"]["base_lrs"] == [g["initial_lr"] for g in generator_groups]
    assert scheduler["summary"]["last_epoch"] == saved["lr_schedulers"][0]["last_epoch"]
    trainer = found["trainer"]
    assert trainer["class"] == "Lightning"
    assert trainer["summary"]["global_step"] == saved["global_step"]
    assert trainer["summary"]["epoch"] == saved["epoch"]
    # manual optimization: Lightning counts both optimizers' steps
    assert trainer["summary"]["optimizer_steps"] == saved["global_step"]


def test_trainer_folder_scheduler_and_state(training_outputs: TrainingOutputs) -> None:
    folder = training_outputs.trainer / "checkpoint-2"
    optimizer = torch.load(folder / "optimizer.pt", weights_only=True)
    state = json.loads((folder / "trainer_state.json").read_text())
    found = _by_kind(inspect_checkpoint(folder).to_json()["companions"])
    scheduler = found["lr_scheduler"]
    assert scheduler["key"] == "scheduler.pt" and scheduler["optimizer"] == "optimizer.pt"
    # LambdaLR and MultiplicativeLR keep the same keys: Trainer's is a LambdaLR
    assert set(scheduler["class_guess"]["candidates"]) == {"LambdaLR", "MultiplicativeLR"}
    assert scheduler["warnings"] == []
    lrs = [g["lr"] for g in optimizer["param_groups"]]
    assert scheduler["summary"]["last_lrs"] == lrs
    assert scheduler["summary"]["last_epoch"] == state["global_step"]
    trainer = found["trainer"]
    assert (trainer["key"], trainer["class"]) == ("trainer_state.json", "TrainerState")
    assert trainer["summary"]["global_step"] == state["global_step"] == 2
    assert trainer["summary"]["epoch"] == state["epoch"]
    assert trainer["observations"] == ["global_step 2, the optimizer's step 2"]


def test_accelerate_scheduler_drives_the_first_optimizer(training_outputs: TrainingOutputs) -> None:
    found = _by_kind(inspect_checkpoint(training_outputs.accelerate).to_json()["companions"])
    scheduler = found["lr_scheduler"]
    assert (scheduler["key"], scheduler["class"]) == ("scheduler.bin", "StepLR")
    assert scheduler["optimizer"] == "optimizer.bin"
    assert scheduler["warnings"] == []


def test_remapping_a_trainer_optimizer_file_warns_about_its_scheduler_file(
    training_outputs: TrainingOutputs, tmp_path: Path
) -> None:
    folder = training_outputs.trainer / "checkpoint-2"
    optimizer = torch.load(folder / "optimizer.pt", weights_only=True)
    # the Trainer's two groups (decay, no decay) become one: the scheduler's lists must follow
    ids = [pid for g in optimizer["param_groups"] for pid in g["params"]]
    shapes = [list(optimizer["state"][pid]["exp_avg"].shape) for pid in ids]
    params = {f"p{i}": {"shape": shape, "dtype": "float32"} for i, shape in enumerate(shapes)}
    names = list(params)
    first = len(optimizer["param_groups"][0]["params"])
    source = {"params": params, "groups": [{"params": names[:first]}, {"params": names[first:]}]}
    target = {"params": params, "groups": [{"params": names}]}
    (tmp_path / "from.json").write_text(json.dumps(source))
    (tmp_path / "to.json").write_text(json.dumps(target))
    result = run(
        "remap",
        folder / "optimizer.pt",
        "--from",
        tmp_path / "from.json",
        "--to",
        tmp_path / "to.json",
        "--dry-run",
        "--json",
    )
    assert result.exit_code == 0, result.output
    warnings = json.loads(result.stdout)["warnings"]
    assert any("scheduler.pt drives this optimizer and is not rewritten" in w for w in warnings)


def _trainer_layout(folder: Path, out: Path, *, merge: bool = False, extra: bool = False) -> Path:
    """A layout of the Trainer's model as optckpt names it (from its config.json): its two
    groups (decay, no decay), or one merged group; with ``extra``, a new group of one new
    parameter."""
    from optckpt.inspect import inspect_checkpoint as inspect

    (optimizer,) = inspect(folder).to_json()["optimizers"]
    assert optimizer["names_source"] == "model config"
    params = {
        p["name"]: {"shape": p["state"]["exp_avg"]["shape"], "dtype": "float32"}
        for p in optimizer["params"]
    }
    groups: list[list[str]] = [[], []]
    for p in optimizer["params"]:
        groups[p["group"]].append(p["name"])
    if merge:
        groups = [groups[0] + groups[1]]
    if extra:
        params["extra.weight"] = {"shape": [2, 2], "dtype": "float32"}
        groups.append(["extra.weight"])
    out.write_text(json.dumps({"params": params, "groups": [{"params": g} for g in groups]}))
    return out


def test_remapping_a_trainer_folder_rewrites_its_scheduler_file(
    training_outputs: TrainingOutputs, tmp_path: Path
) -> None:
    folder = training_outputs.trainer / "checkpoint-2"
    layout = _trainer_layout(folder, tmp_path / "merged.json", merge=True)
    out = tmp_path / "merged"
    result = run("remap", folder, "--to", layout, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    keys = {c["key"] for c in json.loads(result.stdout)["scheduler_changes"]}
    assert keys == {"scheduler.pt.base_lrs", "scheduler.pt._last_lr", "scheduler.pt.lr_lambdas"}
    # torch's LambdaLR for the one-group optimizer loads it and continues the schedule
    old = torch.load(folder / "scheduler.pt", weights_only=True)
    saved = torch.load(out / "optimizer.pt", weights_only=True)
    (group,) = saved["param_groups"]
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in group["params"]]
    new_optimizer = torch.optim.AdamW(params, lr=1e-3)
    new_optimizer.load_state_dict(saved)
    scheduler = torch.optim.lr_scheduler.LambdaLR(new_optimizer, lambda step: 1.0)
    scheduler.load_state_dict(torch.load(out / "scheduler.pt", weights_only=True))
    assert scheduler.get_last_lr() == old["_last_lr"][:1]
    assert scheduler.base_lrs == old["base_lrs"][:1] and scheduler.last_epoch == old["last_epoch"]
    assert (out / "trainer_state.json").read_bytes() == (folder / "trainer_state.json").read_bytes()


def test_a_trainer_scheduler_that_cannot_follow_is_refused_or_dropped(
    training_outputs: TrainingOutputs, tmp_path: Path
) -> None:
    folder = training_outputs.trainer / "checkpoint-2"
    layout = _trainer_layout(folder, tmp_path / "grown.json", extra=True)
    refused = run("remap", folder, "--to", layout, "-o", tmp_path / "no")
    assert refused.exit_code == 4 and "cannot give new group 2 a lr_lambdas" in refused.stderr
    assert not (tmp_path / "no").exists()
    out = tmp_path / "dropped"
    result = run("remap", folder, "--to", layout, "-o", out, "--drop-scheduler")
    assert result.exit_code == 0, result.output
    written = {p.name for p in out.iterdir()}
    assert "scheduler.pt" not in written
    assert written == {p.name for p in folder.iterdir()} - {"scheduler.pt"}
