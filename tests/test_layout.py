"""optckpt.layout: layouts from JSON, model state dicts and live models (naming: test_names).

Expected names, shapes and groups come from the torch modules and optimizers themselves
(``named_parameters()``, ``param_groups``), never from an earlier optckpt result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from checks import TiedNet, saved_model_state
from safetensors.torch import save_file
from torch import nn

import optckpt
from optckpt.errors import UnreadableCheckpointError, UsageError
from optckpt.io.safetensors_format import write_safetensors
from optckpt.layout import (
    Layout,
    ParamSpec,
    find_model_state,
    layout_from_json,
    layout_from_model_state,
    load_layout,
    model_parameters,
    parse_group_rule,
)

# --------------------------------------------------------------------------- models


def _sequential() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 3))


# --------------------------------------------------------------------------- JSON layouts


def test_json_layout_round_trips_and_lists_become_tuples() -> None:
    data = {
        "params": {"a.weight": {"shape": [3, 2], "dtype": "float64"}, "a.bias": {"shape": [3]}},
        "groups": [
            {"params": ["a.weight"], "lr": 0.1, "betas": [0.9, 0.95]},
            {"params": ["a.bias"]},
        ],
    }
    layout = layout_from_json(data)
    assert layout.params == {"a.weight": ParamSpec((3, 2), "float64"), "a.bias": ParamSpec((3,))}
    assert layout.groups[0] == {"lr": 0.1, "betas": (0.9, 0.95), "params": ["a.weight"]}
    assert layout.names() == ["a.weight", "a.bias"]
    assert layout_from_json(json.loads(json.dumps(layout.to_json()))) == layout


def test_json_layout_without_groups_is_one_group_of_every_param() -> None:
    layout = layout_from_json({"params": {"x": {"shape": [2]}, "y": {"shape": []}}})
    assert layout.groups == [{"params": ["x", "y"]}]


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"groups": []}, "not a layout"),
        ({"params": {"x": {"dtype": "float32"}}}, "not a layout"),
        ({"params": {"x": {"shape": ["two"]}}}, "not a layout"),
        ({"params": {"x": {"shape": [2]}}, "groups": [{"lr": 1}]}, "not a layout"),
        (
            {"params": {"x": {"shape": [2]}}, "groups": [{"params": ["y"]}]},
            "'y', which is not in params",
        ),
        (
            {"params": {"x": {"shape": [2]}}, "groups": [{"params": ["x"]}, {"params": ["x"]}]},
            "'x' is in more than one group",
        ),
        # a dtype must be torch's own: "load" once resolved to the torch.load function
        ({"params": {"x": {"shape": [2], "dtype": "load"}}}, "dtype 'load', which torch has not"),
        (
            {"params": {"x": {"shape": [2]}}, "groups": [{"params": ["x"], "lr": 10**400}]},
            "an integer of 1329 bits, too large for any float",
        ),
    ],
)
def test_malformed_json_layouts_are_usage_errors(data: dict[str, Any], needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        layout_from_json(data, "my.json")


def test_load_layout_json_file(tmp_path: Path) -> None:
    path = tmp_path / "layout.json"
    path.write_text(
        json.dumps({"params": {"w": {"shape": [2, 2]}}, "groups": [{"params": ["w"], "lr": 1}]})
    )
    assert load_layout(path) == Layout({"w": ParamSpec((2, 2))}, [{"lr": 1, "params": ["w"]}])
    with pytest.raises(UsageError, match="--group splits a model state dict"):
        load_layout(path, ["w:lr=2"])
    path.write_text("{not json")
    with pytest.raises(UsageError, match="cannot read the layout"):
        load_layout(path)
    path.write_text("[" * 100_000 + "]" * 100_000)  # json.loads recurses once a level
    with pytest.raises(UsageError, match="nested too deeply"):
        load_layout(path)


def test_load_layout_missing_or_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(UnreadableCheckpointError, match="no such file"):
        load_layout(tmp_path / "nope.pt")
    torch.save({"epoch": 3, "note": "no tensors"}, tmp_path / "other.pt")
    with pytest.raises(UsageError, match="neither a JSON layout nor a model state dict"):
        load_layout(tmp_path / "other.pt")


# --------------------------------------------------------------------------- model state dicts


def test_model_parameters_are_named_parameters_after_a_save_and_load(tmp_path: Path) -> None:
    model = TiedNet()
    state = saved_model_state(model, tmp_path / "m.pt")
    assert "head.weight" in state and "norm.running_mean" in state  # both are in the state dict
    found = model_parameters(state)
    assert list(found) == [n for n, _ in model.named_parameters()]
    assert all(found[n].shape == p.shape for n, p in model.named_parameters())


def test_model_parameters_skip_non_floating_tensors_and_keep_untied_equal_values() -> None:
    weight = torch.ones(2, 2)
    state = {
        "a": weight,
        "b": weight.clone(),
        "mask": torch.ones(2, dtype=torch.bool),
        "n": torch.tensor(3),
    }
    assert list(model_parameters(state)) == ["a", "b"]


def test_find_model_state_at_the_root_or_under_usual_keys() -> None:
    weights = {"w": torch.zeros(2)}
    assert find_model_state(weights) is weights
    for key in ("model", "state_dict", "model_state_dict", "module"):
        assert find_model_state({key: weights, "epoch": 1}) is weights
    assert find_model_state({"optimizer": {"state": {}, "param_groups": []}}) is None
    assert find_model_state({}) is None


@pytest.mark.parametrize(
    ("rule", "regex", "values"),
    [
        ("bias$:weight_decay=0", "bias$", {"weight_decay": 0}),
        (
            r"\.bias$|norm:weight_decay=0.0,lr=1e-4",
            r"\.bias$|norm",
            {"weight_decay": 0.0, "lr": 1e-4},
        ),
        ("x:betas=[0.8,0.9],amsgrad=true", "x", {"betas": [0.8, 0.9], "amsgrad": True}),
        ("x:foreach=null,name=no_decay", "x", {"foreach": None, "name": "no_decay"}),
        ('x:name="a,b",lr=2', "x", {"name": "a,b", "lr": 2}),
        ("(?:enc|dec)oder:lr=1", "(?:enc|dec)oder", {"lr": 1}),
        ("head:", "head", {}),
    ],
)
def test_group_rules_parse_json_values(rule: str, regex: str, values: dict[str, Any]) -> None:
    pattern, parsed = parse_group_rule(rule)
    assert pattern.pattern == regex
    assert parsed == values


@pytest.mark.parametrize(
    ("rule", "needle"),
    [
        ("no colon", "expected 'REGEX:key=value"),
        (":lr=1", "expected 'REGEX:key=value"),
        ("([unclosed:lr=1", "bad regex"),
        ("x:lr", "expected key=value, got 'lr'"),
    ],
)
def test_bad_group_rules_are_usage_errors(rule: str, needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        parse_group_rule(rule)


def test_layout_from_model_state_splits_by_first_matching_rule() -> None:
    model = _sequential()
    layout = layout_from_model_state(
        model.state_dict(),
        [r"^1\.:weight_decay=0,betas=[0.8,0.9]", r"bias$:weight_decay=0.5", "nothing:lr=9"],
    )
    named = dict(model.named_parameters())
    assert layout.params == {n: ParamSpec(tuple(p.shape), "float32") for n, p in named.items()}
    assert layout.groups == [
        {"params": ["0.weight", "3.weight"]},
        {"weight_decay": 0, "betas": (0.8, 0.9), "params": ["1.weight", "1.bias"]},
        {"weight_decay": 0.5, "params": ["0.bias", "3.bias"]},
    ]  # the rule that matches nothing leaves no empty group


def test_load_layout_from_torch_files(tmp_path: Path) -> None:
    model = _sequential().double()
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    torch.save({"model": model.state_dict(), "optimizer": None, "epoch": 1}, tmp_path / "train.pt")
    expected = [n for n, _ in model.named_parameters()]
    for name in ("bare.pt", "train.pt"):
        layout = load_layout(tmp_path / name)
        assert layout.names() == expected
        assert {p.dtype for p in layout.params.values()} == {"float64"}


def test_plain_safetensors_is_refused_as_a_layout(tmp_path: Path) -> None:
    # safetensors sorts tensors by name ("0.bias" before "0.weight"): not the model's order,
    # which is the order torch numbers the parameters of Optimizer(model.parameters()) in.
    model = _sequential()
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    with pytest.raises(UsageError, match="sorted by name"):
        load_layout(tmp_path / "model.safetensors")


def test_optckpt_safetensors_keeps_the_model_order(tmp_path: Path) -> None:
    model = _sequential()
    write_safetensors({"model": model.state_dict(), "epoch": 1}, tmp_path / "ckpt.safetensors")
    layout = load_layout(tmp_path / "ckpt.safetensors")
    assert layout.names() == [n for n, _ in model.named_parameters()]


# --------------------------------------------------------------------------- live models


def test_layout_of_a_model_alone_takes_the_trainable_parameters() -> None:
    model = _sequential()
    model[0].requires_grad_(False)
    layout = optckpt.layout_of(model)
    assert layout.groups == [{"params": ["1.weight", "1.bias", "3.weight", "3.bias"]}]
    assert layout.params["3.weight"] == ParamSpec((3, 6), "float32")


def test_layout_of_follows_the_optimizer_groups_and_leaves_frozen_params_out() -> None:
    model = _sequential()
    model[0].requires_grad_(False)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [(n, p) for n, p in trainable if p.dim() > 1], "weight_decay": 0.1},
            {"params": [(n, p) for n, p in trainable if p.dim() <= 1], "weight_decay": 0.0},
        ],
        lr=0.01,
        betas=(0.8, 0.9),
    )
    layout = optckpt.layout_of(model, optimizer)
    assert set(layout.params) == {n for n, _ in trainable}
    for group, torch_group in zip(layout.groups, optimizer.param_groups):
        assert group["params"] == torch_group["param_names"]
        assert {k: v for k, v in group.items() if k != "params"} == {
            k: v for k, v in torch_group.items() if k not in ("params", "param_names")
        }


def test_layout_of_refuses_an_optimizer_over_another_model() -> None:
    optimizer = torch.optim.SGD(_sequential().parameters(), lr=0.1)
    with pytest.raises(UsageError, match="group 0 holds a tensor that is not a parameter"):
        optckpt.layout_of(_sequential(), optimizer)


def test_save_layout_writes_json_that_loads_back(tmp_path: Path) -> None:
    model = _sequential()
    optimizer = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01))
    path = tmp_path / "layout.json"
    written = optckpt.save_layout(model, optimizer, path)
    data = json.loads(path.read_text())
    assert data["groups"][0]["lr"] == pytest.approx(0.01)  # a Tensor lr is written as a number
    loaded = optckpt.load_layout(path)
    assert loaded.params == written.params
    assert loaded.names() == [n for n, _ in model.named_parameters()]
    assert loaded.groups[0]["betas"] == (0.9, 0.999)
