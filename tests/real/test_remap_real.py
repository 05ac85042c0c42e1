"""remap against checkpoints of real training: torch.optim, a real LR scheduler, real models.

Each test trains a model with a ``torch.optim`` optimizer (and a real ``StepLR`` where the
test is about trained hyperparameters), saves what a training script saves, changes the model,
writes the new layout as the README says (``save_layout(new_model, fresh_optimizer)``), runs
``optckpt remap``, and loads the result into a ``torch.optim`` optimizer built for the new model:
the truth is the old optimizer's state per parameter name and torch's own load and step.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from checks import TORCH_CLASSES, assert_bitwise_equal, assert_one_line_error
from torch import nn
from typer.testing import CliRunner

import optckpt
from optckpt.cli.app import app

runner = CliRunner()


def _model(head: int = 3, extra: bool = False) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, head)]
    if extra:
        layers += [nn.ReLU(), nn.Linear(head, 2)]
    return nn.Sequential(*layers)


def _train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: int = 3,
    scheduler: Any = None,
    sparse: bool = False,
) -> None:
    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        if sparse:
            x: torch.Tensor = torch.randint(0, 10, (6,))
        else:
            first = next(m for m in model.modules() if isinstance(m, nn.Linear))
            x = torch.randn(5, first.in_features)
        loss = model(x).square().mean()
        loss.backward()
        return loss

    for _ in range(steps):
        if isinstance(optimizer, torch.optim.LBFGS):
            optimizer.step(closure)  # type: ignore[no-untyped-call]
        else:
            closure()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()


def _by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, Any]]:
    """The optimizer's state per parameter name, deep-copied: the independent truth."""
    return {
        n: copy.deepcopy(dict(optimizer.state[p]))
        for n, p in model.named_parameters()
        if p in optimizer.state
    }


def _remap(*args: str) -> Any:
    return runner.invoke(app, ["remap", *args])


class Decayed(NamedTuple):
    path: Path  # the checkpoint: model, optimizer, scheduler, epoch
    lr: float  # the optimizer's lr, as the scheduler left it
    before: dict[str, dict[str, Any]]  # its state by parameter name (see _by_name)


@pytest.fixture
def decayed(tmp_path: Path) -> Decayed:
    """A GAN-style Adam (betas (0.5, 0.999)) whose lr a real StepLR decayed 1e-3 -> 1e-5."""
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.5, 0.999))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.1)
    _train(model, optimizer, steps=5, scheduler=scheduler)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)
    path = tmp_path / "ckpt.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": 5,
        },
        path,
    )
    return Decayed(path, optimizer.param_groups[0]["lr"], _by_name(model, optimizer))


def _fresh_layout(tmp_path: Path, model: nn.Module, **groups: Any) -> Path:
    """The README recipe: the new model with a fresh optimizer, as the new script builds it."""
    path = tmp_path / "new_layout.json"
    optckpt.save_layout(model, torch.optim.Adam(model.parameters(), **groups), path)
    return path


def _load_and_step(
    out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, sparse: bool = False
) -> dict[str, Any]:
    saved = torch.load(out, weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    _train(model, optimizer, steps=1, sparse=sparse)
    return saved


# --------------------------------------------------------------------------- trained values


def test_a_steplr_decayed_lr_and_gan_betas_are_kept(decayed: Decayed, tmp_path: Path) -> None:
    path, trained_lr, before = decayed
    new = _model(extra=True)
    layout = _fresh_layout(tmp_path, new)  # lr 1e-3, betas (0.9, 0.999)
    out = tmp_path / "out.pt"

    result = _remap(str(path), "--to", str(layout), "-o", str(out), "--json")
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["hyperparam_changes"] == []  # nothing differs from the trained values
    assert plan["hyperparams_kept"] == [
        {"group": 0, "key": "lr", "kept": trained_lr, "layout": 1e-3},
        {"group": 0, "key": "betas", "kept": [0.5, 0.999], "layout": [0.9, 0.999]},
    ]
    group = plan["groups"][0]
    assert (group["hyperparams"]["lr"], group["hyperparams"]["betas"]) == (trained_lr, [0.5, 0.999])
    assert group["hyperparams"]["initial_lr"] == 1e-3  # StepLR's, trained too

    new_optimizer = torch.optim.Adam(new.parameters())  # the new script's fresh optimizer
    saved = torch.load(out, weights_only=True)
    new_optimizer.load_state_dict(saved["optimizer"])
    assert new_optimizer.param_groups[0]["lr"] == trained_lr
    assert new_optimizer.param_groups[0]["betas"] == (0.5, 0.999)
    params = dict(new.named_parameters())
    for name, state in before.items():  # carried state bitwise equal, by name
        assert_bitwise_equal(dict(new_optimizer.state[params[name]]), state, name)
    assert not new_optimizer.state.get(params["4.weight"])
    # the scheduler resumes on the remapped groups, at the trained lr
    scheduler = torch.optim.lr_scheduler.StepLR(new_optimizer, step_size=2, gamma=0.1)
    scheduler.load_state_dict(saved["scheduler"])
    _train(new, new_optimizer, steps=1, scheduler=scheduler)
    assert new_optimizer.param_groups[0]["lr"] == pytest.approx(1e-6)  # epoch 6: decayed again
    assert saved["epoch"] == 5


def test_hyperparams_layout_and_set_change_them_and_the_plan_lists_each(
    decayed: Decayed, tmp_path: Path
) -> None:
    path, trained_lr, _ = decayed
    new = _model(extra=True)
    layout = _fresh_layout(tmp_path, new)

    out = tmp_path / "layout.pt"
    result = _remap(str(path), "--to", str(layout), "--hyperparams", "layout", "-o", str(out))
    assert result.exit_code == 0, result.stderr
    assert f"group 0 lr: {trained_lr!r} -> 0.001 (--hyperparams layout)" in result.stdout
    assert "group 0 betas: (0.5, 0.999) -> (0.9, 0.999) (--hyperparams layout)" in result.stdout
    new_optimizer = torch.optim.Adam(new.parameters(), lr=0.5)
    _load_and_step(out, new, new_optimizer)
    assert new_optimizer.param_groups[0]["lr"] == 1e-3
    assert new_optimizer.param_groups[0]["betas"] == (0.9, 0.999)

    result = _remap(
        str(path), "--to", str(layout), "--set", "0.lr=3e-4", "--set", "betas=(0.5,0.99)",
        "--dry-run", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["hyperparam_changes"] == [
        {"group": 0, "key": "lr", "old": trained_lr, "new": 3e-4, "why": "--set"},
        {"group": 0, "key": "betas", "old": [0.5, 0.999], "new": [0.5, 0.99], "why": "--set"},
    ]
    assert plan["hyperparams_kept"] == []  # --set decided both keys the layout differs on

    # --set wins over --hyperparams layout; a value equal to the trained one is no change
    result = _remap(
        str(path), "--to", str(layout), "--hyperparams", "layout", "--set", f"lr={trained_lr!r}",
        "--dry-run", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    changes = json.loads(result.stdout)["hyperparam_changes"]
    assert [(c["key"], c["why"]) for c in changes] == [("betas", "--hyperparams layout")]


def test_a_group_of_only_new_parameters_takes_the_layouts_values(
    decayed: Decayed, tmp_path: Path
) -> None:
    path, trained_lr, before = decayed
    new = _model(extra=True)
    body = [p for n, p in new.named_parameters() if not n.startswith("4.")]
    head = [new[4].weight, new[4].bias]
    fresh = torch.optim.Adam([{"params": body}, {"params": head, "lr": 5e-3}], betas=(0.8, 0.9))
    optckpt.save_layout(new, fresh, tmp_path / "new.json")
    out = tmp_path / "out.pt"

    result = _remap(str(path), "--to", str(tmp_path / "new.json"), "-o", str(out), "--json")
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert [g["hyperparams_from"] for g in plan["groups"]] == [
        "source group 0",
        "layout, then source group 0",  # initial_lr: no fresh optimizer has it
    ]
    body_hp, head_hp = (g["hyperparams"] for g in plan["groups"])
    assert (body_hp["lr"], body_hp["betas"]) == (trained_lr, [0.5, 0.999])  # trained
    assert (head_hp["lr"], head_hp["betas"]) == (5e-3, [0.8, 0.9])  # the layout's
    assert head_hp["initial_lr"] == body_hp["initial_lr"] == 1e-3  # the scheduler's, carried
    why = "a group of new parameters: the layout's value"
    assert plan["hyperparam_changes"] == [  # against the checkpoint's first group
        {"group": 1, "key": "lr", "old": trained_lr, "new": 5e-3, "why": why},
        {"group": 1, "key": "betas", "old": [0.5, 0.999], "new": [0.8, 0.9], "why": why},
    ]

    new_optimizer = torch.optim.Adam([{"params": body}, {"params": head}])
    _load_and_step(out, new, new_optimizer)
    assert [g["lr"] for g in new_optimizer.param_groups] == [trained_lr, 5e-3]
    params = dict(new.named_parameters())
    reloaded = torch.optim.Adam([{"params": body}, {"params": head}])
    reloaded.load_state_dict(torch.load(out, weights_only=True)["optimizer"])  # step is shared
    for name, state in before.items():
        assert_bitwise_equal(dict(reloaded.state[params[name]]), state, name)
    # a scheduler resuming at the trained epoch finds initial_lr in every group
    torch.optim.lr_scheduler.StepLR(reloaded, step_size=2, gamma=0.1, last_epoch=5)


# --------------------------------------------------------------------------- shapes, every optimizer


def _options(name: str) -> dict[str, Any]:
    return {"SGD": {"momentum": 0.9}, "RMSprop": {"momentum": 0.5, "centered": True}}.get(name, {})


def _built(name: str, wide: bool = False) -> tuple[nn.Module, torch.optim.Optimizer, bool]:
    sparse = name == "SparseAdam"
    if sparse:
        model: nn.Module = nn.Sequential(nn.Embedding(10, 5 if wide else 4, sparse=True))
    elif name == "Muon":  # 2-D parameters only
        model = nn.Sequential(
            nn.Linear(4, 6, bias=False), nn.Linear(6, 4 if wide else 3, bias=False)
        )
    else:
        model = _model(head=4 if wide else 3)
    return model, TORCH_CLASSES[name](model.parameters(), **_options(name)), sparse


@pytest.mark.parametrize("name", sorted(TORCH_CLASSES))
def test_every_optimizer_loads_and_steps_after_remap_and_refuses_a_changed_shape(
    name: str, tmp_path: Path
) -> None:
    old, optimizer, sparse = _built(name)
    _train(old, optimizer, steps=2, sparse=sparse)
    before = _by_name(old, optimizer)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": old.state_dict(), "optimizer": optimizer.state_dict()}, path)

    # the same model, its layout written from a fresh optimizer: everything carries, bitwise
    same, fresh, _ = _built(name)
    optckpt.save_layout(same, fresh, tmp_path / "same.json")
    out = tmp_path / "out.pt"
    result = _remap(str(path), "--to", str(tmp_path / "same.json"), "-o", str(out))
    assert result.exit_code == 0, result.stderr
    fresh.load_state_dict(torch.load(out, weights_only=True)["optimizer"])
    params = dict(same.named_parameters())
    for param_name, state in before.items():
        assert_bitwise_equal(dict(fresh.state[params[param_name]]), state, param_name)
    _train(same, fresh, steps=1, sparse=sparse)

    # a changed 2-D shape is exit 4, naming the parameter and both shapes
    wide, wide_fresh, _ = _built(name, wide=True)
    optckpt.save_layout(wide, wide_fresh, tmp_path / "wide.json")
    refused = _remap(str(path), "--to", str(tmp_path / "wide.json"), "-o", str(tmp_path / "w.pt"))
    assert refused.exit_code == 4, (refused.stdout, refused.stderr)
    assert_one_line_error(refused.stderr, "shapes changed", "--reset-mismatched")
    assert not (tmp_path / "w.pt").exists()
    if name != "LBFGS":  # LBFGS's state is one flat vector over all parameters
        changed = "0.weight" if sparse else ("1.weight" if name == "Muon" else "2.weight")
        shape = list(dict(old.named_parameters())[changed].shape)
        assert f"{changed}: {shape} in the checkpoint" in refused.stderr

    # with --reset-mismatched the changed parameters start afresh, and torch steps it
    reset = _remap(
        str(path), "--to", str(tmp_path / "wide.json"), "--reset-mismatched", "-o", str(out),
        "--force",
    )  # fmt: skip
    assert reset.exit_code == 0, reset.stderr
    _load_and_step(out, wide, wide_fresh, sparse)


def test_adafactor_shape_change_is_exit_4_like_adam(tmp_path: Path) -> None:
    """torch.optim.Adafactor keeps factored row_var [6, 1] / col_var [1, 4] for a [6, 4]
    weight: a layout where that weight is [6, 5] must be refused before torch's step fails."""
    for cls in (torch.optim.Adafactor, torch.optim.Adam):
        old = _model()
        optimizer = cls(old.parameters())
        _train(old, optimizer)
        assert "row_var" in optimizer.state[old[0].weight] or cls is torch.optim.Adam
        torch.save({"model": old.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "a")
        new = nn.Sequential(
            nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)
        )  # 0.weight [6, 4] -> [6, 5]
        optckpt.save_layout(new, cls(new.parameters()), tmp_path / "new.json")
        result = _remap(str(tmp_path / "a"), "--to", str(tmp_path / "new.json"), "--dry-run")
        assert result.exit_code == 4, (cls, result.stdout)
        assert_one_line_error(
            result.stderr,
            "shapes changed: 0.weight: [6, 4] in the checkpoint, [6, 5] in the layout",
        )


# --------------------------------------------------------------------------- outside torch.optim


def test_transformers_adafactor_is_remapped_with_a_warning_about_unchecked_keys(
    tmp_path: Path,
) -> None:
    from real.transformers_adafactor import TransformersAdafactor

    old = _model()
    optimizer = TransformersAdafactor(old.parameters(), beta1=0.9)
    _train(old, optimizer)
    before = _by_name(old, optimizer)
    torch.save({"model": old.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "a")
    new = _model(extra=True)
    optckpt.save_layout(new, TransformersAdafactor(new.parameters()), tmp_path / "new.json")
    out = tmp_path / "out.pt"
    result = _remap(str(tmp_path / "a"), "--to", str(tmp_path / "new.json"), "-o", str(out))
    assert result.exit_code == 0, result.stderr
    assert (
        "warning: the optimizer is none of torch.optim's (state keys RMS, exp_avg_sq_col, "
        "exp_avg_sq_row): the shapes of those keys were not checked against the layout"
    ) in result.stdout
    new_optimizer = TransformersAdafactor(new.parameters())
    new_optimizer.load_state_dict(torch.load(out, weights_only=True)["optimizer"])
    params = dict(new.named_parameters())
    for name, state in before.items():
        assert_bitwise_equal(dict(new_optimizer.state[params[name]]), state, name)
    # its trained beta1 is kept over the fresh optimizer's None
    assert new_optimizer.param_groups[0]["beta1"] == 0.9
    _train(new, new_optimizer, steps=1)
