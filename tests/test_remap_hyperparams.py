"""optckpt.remap_hyperparams: which values remap's target groups take, and what the plan lists.

The groups are the ``param_groups`` of real ``torch.optim`` optimizers (and of real LR
schedulers, which add ``initial_lr``, ``max_lr``, ...); the end-to-end behaviour on trained
checkpoints is in ``tests/real/test_remap_real.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from checks import assert_one_line_error
from torch import nn
from typer.testing import CliRunner

import optckpt
from optckpt.cli.app import app
from optckpt.errors import UsageError
from optckpt.regenerate import Setting
from optckpt.remap_hyperparams import HyperparamPlan, parse_settings, plan_hyperparams, same

runner = CliRunner()


def _groups(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return optimizer.state_dict()["param_groups"]


def _adam(lr: float = 1e-3, **kwargs: Any) -> list[dict[str, Any]]:
    """The groups of a real Adam over two parameter groups (decay and no decay)."""
    model = nn.Linear(4, 3)
    return _groups(
        torch.optim.Adam(
            [{"params": [model.weight], "weight_decay": 0.1}, {"params": [model.bias]}],
            lr=lr,
            **kwargs,
        )
    )


def _target(*groups: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"params": [f"p{i}"], **g} for i, g in enumerate(groups)]


def _changes(plan: HyperparamPlan) -> list[tuple[int, str, Any, Any, str]]:
    return [(c.group, c.key, c.old, c.new, c.why) for c in plan.changes]


# --------------------------------------------------------------------------- carried groups


def test_carried_groups_keep_the_trained_values_and_the_layouts_are_listed_as_not_taken() -> None:
    saved = _adam(lr=1e-5, betas=(0.5, 0.999))
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in _adam()]
    plan = plan_hyperparams(_target(*fresh), [[0], [1]], saved)
    assert [g.values["lr"] for g in plan.groups] == [1e-5, 1e-5]
    assert [g.values["betas"] for g in plan.groups] == [(0.5, 0.999)] * 2
    assert [g.values["weight_decay"] for g in plan.groups] == [0.1, 0]
    assert [g.origin for g in plan.groups] == ["source group 0", "source group 1"]
    assert plan.changes == []
    assert [(k.group, k.key, k.kept, k.layout) for k in plan.kept] == [
        (0, "lr", 1e-5, 1e-3),
        (0, "betas", (0.5, 0.999), (0.9, 0.999)),
        (1, "lr", 1e-5, 1e-3),
        (1, "betas", (0.5, 0.999), (0.9, 0.999)),
    ]


def test_hyperparams_layout_takes_every_value_the_layout_gives() -> None:
    saved = _adam(lr=1e-5, betas=(0.5, 0.999))
    plan = plan_hyperparams(_target({"lr": 1e-3}, {}), [[0], [1]], saved, prefer="layout")
    assert [g.values["lr"] for g in plan.groups] == [1e-3, 1e-5]  # group 1's layout gives none
    assert [g.values["betas"] for g in plan.groups] == [(0.5, 0.999)] * 2
    assert _changes(plan) == [(0, "lr", 1e-5, 1e-3, "--hyperparams layout")]
    assert plan.kept == []


def test_a_key_the_source_group_lacks_comes_from_the_layout() -> None:
    saved = _adam()
    for group in saved:
        del group["decoupled_weight_decay"]  # as torch < 2.6 wrote Adam's groups
    plan = plan_hyperparams(_target({"decoupled_weight_decay": False}), [[0]], saved)
    assert plan.groups[0].values["decoupled_weight_decay"] is False
    assert _changes(plan) == [
        (0, "decoupled_weight_decay", None, False, "not in source group 0: the layout's value")
    ]


def test_a_tensor_lr_is_kept_as_a_tensor() -> None:
    model = nn.Linear(4, 3)
    saved = _groups(torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01)))
    plan = plan_hyperparams(_target({"lr": 0.01}), [[0, 0]], saved)  # save_layout wrote a number
    lr = plan.groups[0].values["lr"]
    assert isinstance(lr, torch.Tensor) and float(lr) == pytest.approx(0.01)
    assert [(k.key, k.layout) for k in plan.kept] == [("lr", 0.01)]  # a float is no tensor


# --------------------------------------------------------------------------- merges


def test_a_merge_takes_the_majority_groups_values_and_lists_each_differing_key() -> None:
    saved = _adam(betas=(0.5, 0.999))
    saved[1]["betas"] = (0.9, 0.99)
    plan = plan_hyperparams(_target({}), [[1, 0, 1, 1]], saved)  # 3 from group 1, 1 from 0
    assert plan.groups[0].origin == "source group 1 (merged with 0)"
    assert plan.groups[0].values["weight_decay"] == 0
    why = (
        "merged groups 0, 1: the 1 parameter(s) from group 0 take group 1's value (3 parameter(s))"
    )
    assert _changes(plan) == [
        (0, "betas", (0.5, 0.999), (0.9, 0.99), why),
        (0, "weight_decay", 0.1, 0, why),
    ]


def test_a_tie_goes_to_the_lower_source_group_and_equal_groups_merge_silently() -> None:
    saved = _adam()
    plan = plan_hyperparams(_target({}), [[1, 0]], saved)
    assert plan.groups[0].origin == "source group 0 (merged with 1)"
    assert [c.key for c in plan.changes] == ["weight_decay"]
    saved[1]["weight_decay"] = 0.1
    assert plan_hyperparams(_target({}), [[1, 0]], saved).changes == []


# --------------------------------------------------------------------------- new groups


def test_a_group_of_new_parameters_takes_the_layouts_values_else_the_first_groups() -> None:
    saved = _adam(lr=1e-5)
    plan = plan_hyperparams(_target({}, {"lr": 5e-3}, {}), [[0, 1], [], []], saved)
    assert plan.groups[1].values["lr"] == 5e-3
    assert plan.groups[1].values["weight_decay"] == 0.1  # the checkpoint's first group's
    assert plan.groups[1].origin == "layout, then source group 0"
    assert plan.groups[2].values == {k: v for k, v in saved[0].items() if k != "params"}
    assert plan.groups[2].origin == "source group 0 (no parameter of this group was carried)"
    merged = (
        "merged groups 0, 1: the 1 parameter(s) from group 1 take group 0's value (1 parameter(s))"
    )
    assert _changes(plan) == [
        (0, "weight_decay", 0, 0.1, merged),  # a tie: the lower source group wins
        (1, "lr", 1e-5, 5e-3, "a group of new parameters: the layout's value"),
    ]


def test_scheduler_keys_of_a_new_group_come_from_the_first_carried_group() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    optimizer = torch.optim.SGD(
        [{"params": model[0].parameters()}, {"params": model[1].parameters(), "lr": 0.2}],
        lr=0.1,
        momentum=0.9,
    )
    torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[0.1, 0.2], total_steps=10)
    saved = _groups(optimizer)
    owned = {"initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum"}
    assert owned <= set(saved[0])
    # target group 0 is all new; group 1 carries from source group 1
    plan = plan_hyperparams(_target({"lr": 0.05}, {}), [[], [1, 1]], saved)
    new = plan.groups[0].values
    assert {k: new[k] for k in owned} == {k: saved[1][k] for k in owned}
    assert new["lr"] == 0.05
    assert [c.key for c in plan.changes] == ["lr"]  # vs the first group's 0.1 (scheduled)
    # the layout gives one: it wins for the new group
    given = plan_hyperparams(_target({"max_lr": 0.3}, {}), [[], [1, 1]], saved)
    assert given.groups[0].values["max_lr"] == 0.3
    assert given.groups[0].values["initial_lr"] == saved[1]["initial_lr"]


def test_no_saved_groups_means_the_layouts_values() -> None:
    plan = plan_hyperparams(_target({"lr": 0.1}), [[]], [])
    assert (plan.groups[0].values, plan.groups[0].origin, plan.changes) == (
        {"lr": 0.1},
        "layout",
        [],
    )


# --------------------------------------------------------------------------- --set


@pytest.mark.parametrize(
    ("text", "setting"),
    [
        ("lr=3e-4", Setting(None, "lr", 3e-4)),
        ("1.lr=1e-5", Setting(1, "lr", 1e-5)),
        ("betas=0.5,0.99", Setting(None, "betas", (0.5, 0.99))),
        ("betas=(0.5, 0.99)", Setting(None, "betas", (0.5, 0.99))),
        ("0.amsgrad=True", Setting(0, "amsgrad", True)),
        ("foreach=None", Setting(None, "foreach", None)),
    ],
)
def test_set_is_parsed_as_regenerate_parses_it(text: str, setting: Setting) -> None:
    assert parse_settings([text]) == [setting]


def test_set_wins_over_checkpoint_and_layout_and_lists_only_real_changes() -> None:
    saved = _adam(lr=1e-5)
    plan = plan_hyperparams(
        _target({"lr": 1e-3}, {"lr": 1e-3}),
        [[0], [1]],
        saved,
        prefer="layout",
        settings=["0.lr=3e-4", "betas=(0.5,0.99)", "1.eps=1e-08"],  # group 1's eps is 1e-08
    )
    assert [g.values["lr"] for g in plan.groups] == [3e-4, 1e-3]
    assert _changes(plan) == [
        (0, "lr", 1e-5, 3e-4, "--set"),
        (0, "betas", (0.9, 0.999), (0.5, 0.99), "--set"),
        (1, "lr", 1e-5, 1e-3, "--hyperparams layout"),
        (1, "betas", (0.9, 0.999), (0.5, 0.99), "--set"),
    ]


def test_set_on_a_kept_key_clears_the_kept_entry() -> None:
    saved = _adam(lr=1e-5)
    plan = plan_hyperparams(_target({"lr": 1e-3}), [[0]], saved, settings=["lr=1e-5"])
    assert plan.kept == [] and plan.changes == []


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["2.lr=0.1"], "--set 2.lr: the layout has 2 group(s), numbered from 0"),
        (["colour=3"], "--set colour: Adam has no such hyperparameter (it has amsgrad, "),
        (["params=[1]"], "--set params: params is no hyperparameter"),
        (["lr"], "--set 'lr': expected KEY=VALUE or GROUP.KEY=VALUE"),
    ],
)
def test_bad_settings_are_usage_errors(settings: list[str], message: str) -> None:
    with pytest.raises(UsageError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        plan_hyperparams(_target({}, {}), [[0], [1]], _adam(), settings=settings, optimizer="Adam")


def test_scheduler_keys_may_be_set() -> None:
    plan = plan_hyperparams(_target({}), [[0]], _adam(), settings=["initial_lr=0.01"])
    assert plan.groups[0].values["initial_lr"] == 0.01
    assert _changes(plan) == [(0, "initial_lr", None, 0.01, "--set")]  # the source had none


def test_a_bad_preference_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="--hyperparams 'fresh': expected checkpoint or layout"):
        plan_hyperparams(_target({}), [[0]], _adam(), prefer="fresh")


# --------------------------------------------------------------------------- equality


@pytest.mark.parametrize(
    ("a", "b", "equal"),
    [
        ((0.9, 0.999), [0.9, 0.999], True),  # a layout's JSON list is torch's tuple
        (0, 0.0, True),
        (True, 1, False),
        (None, None, True),
        (math.nan, math.nan, True),
        (torch.tensor(0.01), torch.tensor(0.01), True),
        (torch.tensor(0.01), 0.01, False),
        (torch.tensor(0.01), torch.tensor(0.01, dtype=torch.float64), False),
        ((0.9, 0.999), (0.9, 0.99), False),
        ((0.9,), 0.9, False),
        ("original", "match_rms_adamw", False),
    ],
)
def test_same(a: Any, b: Any, equal: bool) -> None:
    assert same(a, b) is equal and same(b, a) is equal


# --------------------------------------------------------------------------- command line


@pytest.fixture
def checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.5, 0.999))
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).square().mean().backward()
        optimizer.step()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "c")
    optckpt.save_layout(model, torch.optim.AdamW(model.parameters()), tmp_path / "layout.json")
    return tmp_path / "c", tmp_path / "layout.json"


def test_cli_set_and_hyperparams(checkpoint: tuple[Path, Path]) -> None:
    path, layout = checkpoint
    args = ["remap", str(path), "--to", str(layout), "--dry-run"]
    kept = runner.invoke(app, args)
    assert kept.exit_code == 0, kept.stderr
    assert (
        "kept the checkpoint's trained values where the layout differs: 0.lr 0.0001 (layout "
        "0.001); 0.betas (0.5, 0.999) (layout (0.9, 0.999)); take the layout's with "
        "--hyperparams layout or --set N.KEY=VALUE"
    ) in kept.stdout
    result = runner.invoke(app, [*args, "--set", "0.lr=2e-4", "--hyperparams", "layout", "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["hyperparam_changes"] == [
        {"group": 0, "key": "lr", "old": 1e-4, "new": 2e-4, "why": "--set"},
        {
            "group": 0,
            "key": "betas",
            "old": [0.5, 0.999],
            "new": [0.9, 0.999],
            "why": "--hyperparams layout",
        },
    ]
    assert data["hyperparams_kept"] == []
    assert data["groups"][0]["hyperparams"]["lr"] == 2e-4


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--hyperparams", "fresh"], "--hyperparams 'fresh': expected checkpoint or layout"),
        (["--set", "5.lr=1"], "--set 5.lr: the layout has 1 group(s), numbered from 0"),
        (["--set", "colour=red"], "--set colour: AdamW has no such hyperparameter"),
        (["--set", "lr"], "expected KEY=VALUE or GROUP.KEY=VALUE"),
    ],
)
def test_cli_bad_hyperparameter_options_are_exit_2_and_write_nothing(
    checkpoint: tuple[Path, Path], tmp_path: Path, extra: list[str], needle: str
) -> None:
    path, layout = checkpoint
    out = tmp_path / "out.pt"
    result = runner.invoke(app, ["remap", str(path), "--to", str(layout), *extra, "-o", str(out)])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert_one_line_error(result.stderr, needle)
    assert not out.exists()


def test_cli_shows_a_tensor_lr_as_a_tensor(tmp_path: Path) -> None:
    model = nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.named_parameters(), lr=torch.tensor(0.5))
    torch.save(optimizer.state_dict(), tmp_path / "c.pt")
    optckpt.save_layout(model, torch.optim.Adam(model.parameters(), lr=0.5), tmp_path / "l.json")
    args = ["remap", str(tmp_path / "c.pt"), "--to", str(tmp_path / "l.json"), "--dry-run"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert "0.lr tensor(0.5) (layout 0.5)" in result.stdout
    changed = runner.invoke(app, [*args, "--hyperparams", "layout"])
    assert "group 0 lr: tensor(0.5) -> 0.5 (--hyperparams layout)" in changed.stdout


# --------------------------------------------------------------------------- values torch refuses


@pytest.mark.parametrize(
    ("setting", "needle"),
    [
        ("lr=1e-4x", "not supported between"),  # a typo: a string, not a number
        ("lr=-1", "Invalid learning rate: -1"),
        ("lr=nan", "Invalid learning rate: nan"),
        ("betas=5", "not subscriptable"),
        ("1.eps=-1", "Invalid epsilon value: -1"),
    ],
)
def test_values_torch_refuses_are_refused_as_regenerate_refuses_them(
    setting: str, needle: str
) -> None:
    """torch.optim.Adam's constructor is the judge (exit 4, as for regenerate --set): the
    output would otherwise load and fail, or train with NaN, at the first step."""
    with pytest.raises(optckpt.errors.IncompatibleStateError, match="target group") as e:
        plan_hyperparams(_target({}, {}), [[0], [1]], _adam(), settings=[setting], optimizer="Adam")
    assert needle in str(e.value)


def test_the_checkpoints_own_values_are_not_judged() -> None:
    """Only values the layout or --set brought in are tried: a checkpoint's trained values are
    what torch loaded and stepped with, odd or not."""
    saved = _adam()
    saved[0]["lr"] = -1.0  # as a LambdaLR returning a negative factor would leave it
    plan = plan_hyperparams(_target({}, {}), [[0], [1]], saved, optimizer="Adam")
    assert plan.groups[0].values["lr"] == -1.0


def test_remap_cli_refuses_a_set_torch_refuses(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(1, 3)).sum().backward()
    optimizer.step()
    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "c.pt"
    )
    layout = tmp_path / "layout.json"
    optckpt.save_layout(model, optimizer, layout)
    out = tmp_path / "out.pt"
    result = runner.invoke(
        app,
        ["remap", str(tmp_path / "c.pt"), "--to", str(layout), "-o", str(out), "--set", "lr=-1"],
    )
    assert result.exit_code == 4
    assert_one_line_error(result.stderr, "Adam refuses the hyperparameters of target group 0")
    assert not out.exists()
