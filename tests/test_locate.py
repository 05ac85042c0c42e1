"""optckpt.locate: finding optimizer state dicts in nested checkpoints, by key path.

The state dicts here come from real ``torch.optim`` optimizers, so "is an optimizer state
dict" means what torch produces, not what our own code once produced.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch

from optckpt.errors import ExitCode, NoOptimizerStateError, UsageError
from optckpt.io import load_checkpoint
from optckpt.locate import (
    locate_optimizers,
    resolve,
    select_one,
    select_optimizers,
    tensor_paths,
    value_at,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _state_dict(
    cls: type[torch.optim.Optimizer] = torch.optim.Adam, **kwargs: Any
) -> dict[str, Any]:
    model = torch.nn.Linear(3, 2)
    optimizer = cls(model.parameters(), **kwargs)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return optimizer.state_dict()


def _keys(root: Any) -> list[str]:
    return [found.key for found in locate_optimizers(root)]


def test_bare_state_dict_is_at_the_empty_key() -> None:
    sd = _state_dict()
    located = locate_optimizers(sd)
    assert [f.key for f in located] == [""]
    assert located[0].state_dict is sd
    assert select_optimizers(sd, "")[0].state_dict is sd


def test_training_checkpoint() -> None:
    sd = _state_dict()
    root = {"model": torch.nn.Linear(3, 2).state_dict(), "optimizer": sd, "epoch": 3}
    assert _keys(root) == ["optimizer"]
    assert select_optimizers(root, "optimizer")[0].state_dict is sd
    assert select_optimizers(root, None)[0].state_dict is sd


def test_lightning_optimizer_states_list() -> None:
    first, second = _state_dict(torch.optim.SGD, lr=0.1, momentum=0.9), _state_dict()
    scheduler = {"step_size": 10, "last_epoch": 1, "_last_lr": [0.1]}
    root = {
        "epoch": 1,
        "state_dict": OrderedDict(w=torch.zeros(2)),
        "optimizer_states": [first, second],
        "lr_schedulers": [scheduler],
    }
    assert _keys(root) == ["optimizer_states.0", "optimizer_states.1"]
    assert select_optimizers(root, "optimizer_states.1")[0].state_dict is second
    assert [f.state_dict for f in select_optimizers(root, None)] == [first, second]


def test_every_optimizer_found_in_order_at_any_depth() -> None:
    a, b, c = _state_dict(), _state_dict(torch.optim.SGD), _state_dict(torch.optim.Adagrad)
    root = {"gan": {"generator": {"opt": a}, "discriminator": (b,)}, "extra": [{"x": c}]}
    assert _keys(root) == ["gan.generator.opt", "gan.discriminator.0", "extra.0.x"]


def test_lightning_fixture() -> None:
    root = load_checkpoint(FIXTURES / "lightning.ckpt").root
    assert _keys(root) == ["optimizer_states.0"]
    assert resolve(root, "optimizer_states.0") is root["optimizer_states"][0]


def test_trainer_folder_key_contains_a_dot() -> None:
    root = load_checkpoint(FIXTURES / "hf_trainer" / "checkpoint-2").root
    assert _keys(root) == ["optimizer.pt"]
    assert resolve(root, "optimizer.pt") is root["optimizer.pt"]
    assert select_optimizers(root, "optimizer.pt")[0].state_dict is root["optimizer.pt"]


def test_dotted_keys_resolve_at_every_level() -> None:
    sd = _state_dict()
    root = {"run.v2": {"optimizer.pt": {"inner": sd}}}
    assert _keys(root) == ["run.v2.optimizer.pt.inner"]
    assert resolve(root, "run.v2.optimizer.pt.inner") is sd
    assert select_optimizers(root, "run.v2.optimizer.pt.inner")[0].state_dict is sd


def test_longest_fitting_key_wins() -> None:
    nested, dotted = _state_dict(), _state_dict()
    root = {"a": {"b": nested}, "a.b": dotted}
    assert resolve(root, "a.b") is dotted
    assert resolve(root, "a") is root["a"]


def test_resolve_root_and_missing() -> None:
    root = {"a": [1, {"b": 2}]}
    assert resolve(root, "") is root
    assert resolve(root, "a.1.b") == 2
    for missing in ("b", "a.2", "a.1.c", "a.0.x", "a.1.b.c"):
        with pytest.raises(KeyError):
            resolve(root, missing)


def test_wrong_key_lists_the_existing_ones() -> None:
    root = {"optimizer": _state_dict(), "optimizer_states": [_state_dict()], "epoch": 1}
    with pytest.raises(UsageError) as info:
        select_optimizers(root, "optimiser")
    assert info.value.exit_code == ExitCode.USAGE == 2
    message = str(info.value)
    assert "optimiser" in message
    assert "'optimizer'" in message and "'optimizer_states.0'" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "key", ["epoch", "model", "model.weight", "optimizer.state", "optimizer.param_groups.0"]
)
def test_key_to_something_else_is_a_usage_error(key: str) -> None:
    root = {"model": torch.nn.Linear(3, 2).state_dict(), "optimizer": _state_dict(), "epoch": 1}
    with pytest.raises(UsageError) as info:
        select_optimizers(root, key)
    assert "not an optimizer state dict" in str(info.value)
    assert "'optimizer'" in str(info.value)


def test_nothing_found_lists_top_level_keys() -> None:
    root = {"model": torch.nn.Linear(3, 2).state_dict(), "epoch": 7, "global_step": 70}
    assert locate_optimizers(root) == []
    with pytest.raises(NoOptimizerStateError) as info:
        select_optimizers(root, None)
    assert info.value.exit_code == 3
    for key in root:
        assert key in str(info.value)


def test_nothing_found_in_a_list_or_a_tensor() -> None:
    for root in ([1, 2], torch.zeros(3), None):
        with pytest.raises(NoOptimizerStateError):
            select_optimizers(root, None)


def test_nothing_found_in_a_model_file() -> None:
    root = load_checkpoint(FIXTURES / "hf_trainer" / "checkpoint-2" / "model.safetensors").root
    with pytest.raises(NoOptimizerStateError):
        select_optimizers(root, None)


LOOKALIKES = {
    "state is a list": {"state": [], "param_groups": [{"params": [0], "lr": 0.1}]},
    "state is a tensor": {"state": torch.zeros(1), "param_groups": [{"params": [0]}]},
    "no state": {"param_groups": [{"params": [0], "lr": 0.1}]},
    "no param_groups": {"state": {0: {"step": 1}}},
    "param_groups is a dict": {"state": {}, "param_groups": {"params": [0]}},
    "a group without params": {"state": {}, "param_groups": [{"lr": 0.1}]},
    "params is a tensor": {"state": {}, "param_groups": [{"params": torch.arange(3)}]},
    "a group is a list": {"state": {}, "param_groups": [[0, 1]]},
    "scheduler": {"last_epoch": 3, "_last_lr": [0.1], "base_lrs": [0.1]},
}


@pytest.mark.parametrize("name", list(LOOKALIKES))
def test_not_fooled_by_lookalikes(name: str) -> None:
    lookalike = LOOKALIKES[name]
    root = {"model": {"w": torch.zeros(2)}, "thing": lookalike}
    assert locate_optimizers(root) == []
    assert locate_optimizers(lookalike) == []
    with pytest.raises(UsageError):
        select_optimizers(root, "thing")


def test_lookalike_beside_a_real_one() -> None:
    root = {"opt": _state_dict(), "fake": LOOKALIKES["state is a list"]}
    assert _keys(root) == ["opt"]


def test_tensor_paths_are_the_keys_themselves() -> None:
    """A key path is the tuple of keys: int and str keys, and dotted keys, stay apart."""
    a, b, c, d = (torch.zeros(1) for _ in range(4))
    tree = {0: a, "0": b, "x.y": {"z": c}, "x": [{"y.z": d}], "n": 1}
    assert [(path, t) for path, t in tensor_paths(tree)] == [
        ((0,), a),
        (("0",), b),
        (("x.y", "z"), c),
        (("x", 0, "y.z"), d),
    ]
    assert [path for path, _ in tensor_paths(a, ("at",))] == [("at",)]


def test_value_at_follows_a_key_path() -> None:
    tree = {"a": [{"b": 1}], 0: "zero"}
    assert value_at(tree, ("a", 0, "b")) == 1
    assert value_at(tree, (0,)) == "zero"
    assert value_at(tree, ()) is tree
    for missing in (("a", 1), ("a", "0"), ("b",), ("a", 0, "b", "c")):
        assert value_at(tree, missing, "none") == "none", missing


def test_located_carries_its_key_path() -> None:
    sd = {"state": {}, "param_groups": [{"params": []}]}
    tree = {"a.b": {"c": sd}, "l": [sd]}
    assert [(f.key, f.path) for f in locate_optimizers(tree)] == [
        ("a.b.c", ("a.b", "c")),
        ("l.0", ("l", 0)),
    ]
    assert select_optimizers(tree, "a.b.c")[0].path == ("a.b", "c")
    assert select_optimizers(tree, "l.0")[0].path == ("l", 0)


def test_select_one_names_the_choices() -> None:
    sd = {"state": {}, "param_groups": [{"params": []}]}
    assert select_one({"opt": sd}, None).key == "opt"
    assert select_one({"a": sd, "b": sd}, "b").path == ("b",)
    with pytest.raises(UsageError, match=r"several optimizer state dicts \('a', 'b'\); pick one"):
        select_one({"a": sd, "b": sd}, None)
