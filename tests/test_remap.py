"""optckpt.remap end to end: real torch models and optimizers, changed, remapped, reloaded.

Each test trains a model with a real ``torch.optim`` optimizer, snapshots that optimizer's
state per parameter *name* (through the old model's ``named_parameters()``), changes the
model, remaps, and loads the result into a ``torch.optim`` optimizer built for the new model.
The truth is that snapshot and the new optimizer after ``load_state_dict``, never values
copied from optckpt's output.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from checks import assert_bitwise_equal, two_optimizers
from torch import nn

import optckpt
from optckpt.errors import IncompatibleStateError, UsageError
from optckpt.layout import Layout, ParamSpec, layout_from_json, layout_from_model_state
from optckpt.remapping import remap_checkpoint

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
HF_FOLDER = FIXTURES / "hf_trainer" / "checkpoint-2"

Snapshot = dict[str, dict[str, Any]]


# --------------------------------------------------------------------------- models


class Tower(nn.Module):
    """A trunk (named ``trunk``), an optional adapter between it and the head, a head."""

    def __init__(self, trunk: str = "encoder", adapter: bool = False, width: int = 6) -> None:
        super().__init__()
        self.trunk_name = trunk
        self.add_module(trunk, nn.Sequential(nn.Linear(4, width), nn.LayerNorm(width), nn.ReLU()))
        self.adapter = nn.Linear(width, width) if adapter else None
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = getattr(self, self.trunk_name)(x)
        if self.adapter is not None:
            h = h + torch.relu(self.adapter(h))
        return self.head(h)


class TiedNet(nn.Module):
    """Token embedding tied to the output head, BatchNorm buffers, optional extra layer."""

    def __init__(self, extra: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.norm = nn.BatchNorm1d(6)
        self.body = nn.Linear(6, 6)
        self.extra = nn.Linear(6, 6) if extra else None
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(tokens))
        h = torch.relu(self.body(h))
        if self.extra is not None:
            h = h + self.extra(h)
        return self.head(h)


def _x(model: nn.Module) -> torch.Tensor:
    if isinstance(model, TiedNet):
        return torch.tensor([1, 2, 3, 4, 5])
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    return torch.randn(5, first.in_features, dtype=first.weight.dtype)


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 2) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        model(_x(model)).pow(2).mean().backward()
        optimizer.step()


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> Snapshot:
    """The optimizer's state per parameter name, deep-copied: the independent truth."""
    return {
        name: copy.deepcopy(dict(optimizer.state[p]))
        for name, p in model.named_parameters()
        if p in optimizer.state
    }


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def _assert_bitwise(got: Any, expected: Any) -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor)
        assert (got.dtype, got.shape) == (expected.dtype, expected.shape)
        assert torch.equal(_bits(got), _bits(expected))
    elif isinstance(expected, Mapping):
        assert set(got) == set(expected)
        for key in expected:
            _assert_bitwise(got[key], expected[key])
    else:
        assert got == expected


def _check_loaded(
    new_model: nn.Module,
    new_optimizer: torch.optim.Optimizer,
    before: Snapshot,
    carried: Mapping[str, str],
) -> None:
    """``carried`` maps new names to old ones; every other parameter must have no state.

    Then a torch step runs, and the carried ``step`` counters go on from the old ones.
    """
    params = dict(new_model.named_parameters())
    held = {id(p) for g in new_optimizer.param_groups for p in g["params"]}
    for name, p in params.items():
        if name in carried and carried[name] in before:
            _assert_bitwise(new_optimizer.state[p], before[carried[name]])
        else:
            assert not new_optimizer.state.get(p), f"{name} should have no state"
    steps_before = {
        name: float(before[carried[name]]["step"])
        for name in carried
        if "step" in before.get(carried[name], {})
    }
    _train(new_model, new_optimizer, steps=1)
    for name, p in params.items():
        if id(p) not in held:
            continue
        state = new_optimizer.state[p]
        if "step" in state:
            assert float(state["step"]) == steps_before.get(name, 0.0) + 1, name


def _checkpoint(tmp_path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> Path:
    """A training file: model weights, optimizer, epoch and a scheduler."""
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10)  # adds initial_lr
    path = tmp_path / "ckpt.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": 7,
        },
        path,
    )
    return path


def _trained(
    make: Callable[[Tower], torch.optim.Optimizer],
) -> tuple[Tower, torch.optim.Optimizer, Snapshot]:
    """A Tower trained 2 steps by the optimizer ``make`` gives for it, that optimizer, and its
    state then (:func:`_snapshot`)."""
    model = Tower()
    optimizer = make(model)
    _train(model, optimizer)
    return model, optimizer, _snapshot(model, optimizer)


def _trained_tower() -> tuple[torch.optim.Optimizer, Snapshot]:
    """The AdamW (lr 1e-2, two groups: decay, no decay) of a trained Tower, and its state."""
    _, optimizer, before = _trained(
        lambda m: _no_decay_groups(list(m.named_parameters()), torch.optim.AdamW, lr=1e-2)
    )
    return optimizer, before


def _no_decay_groups(
    named: list[tuple[str, nn.Parameter]], opt: Callable[..., torch.optim.Optimizer], **kwargs: Any
) -> torch.optim.Optimizer:
    return opt(
        [
            {"params": [(n, p) for n, p in named if p.dim() > 1], "weight_decay": 0.05},
            {"params": [(n, p) for n, p in named if p.dim() <= 1], "weight_decay": 0.0},
        ],
        **kwargs,
    )


def _identity(model: nn.Module) -> dict[str, str]:
    return {n: n for n, _ in model.named_parameters()}


# --------------------------------------------------------------------------- model changes


def test_add_a_layer_id_only_adamw_names_from_the_model_weights(tmp_path: Path) -> None:
    old, optimizer, before = _trained(lambda old: torch.optim.AdamW(old.parameters(), lr=1e-2))
    path = _checkpoint(tmp_path, old, optimizer)

    new = Tower(adapter=True)  # the adapter sits between encoder and head in parameter order
    new_optimizer = torch.optim.AdamW(new.parameters(), lr=1e-2)
    saved = torch.load(path, weights_only=True)
    with pytest.raises(ValueError, match="doesn't match the size of optimizer's group") as info:
        new_optimizer.load_state_dict(saved["optimizer"])
    assert "optckpt" not in str(info.value)  # torch's own error, untouched by us

    result = remap_checkpoint(path, optckpt.layout_of(new, new_optimizer), tmp_path / "out.pt")
    plan = result.plan
    assert (result.key, plan.names_source) == ("optimizer", "recovered")
    assert plan.groups[0].carried == [n for n, _ in old.named_parameters()]
    assert plan.groups[0].new == ["adapter.weight", "adapter.bias"]
    assert plan.dropped == [] and plan.warnings == []

    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert out["epoch"] == 7 and out["scheduler"] == saved["scheduler"]
    assert out["model"].keys() == saved["model"].keys()
    assert all(torch.equal(out["model"][k], saved["model"][k]) for k in saved["model"])
    new_optimizer.load_state_dict(out["optimizer"])
    _check_loaded(new, new_optimizer, before, _identity(old))


def test_remove_a_layer_sgd_momentum(tmp_path: Path) -> None:
    old = Tower(adapter=True)
    optimizer = torch.optim.SGD(old.parameters(), lr=0.1, momentum=0.9)
    _train(old, optimizer)
    before = _snapshot(old, optimizer)
    path = _checkpoint(tmp_path, old, optimizer)

    new = Tower()
    new_optimizer = torch.optim.SGD(new.parameters(), lr=0.1, momentum=0.9)
    result = remap_checkpoint(path, optckpt.layout_of(new, new_optimizer), tmp_path / "out.pt")
    assert result.plan.dropped == ["adapter.weight", "adapter.bias"]
    assert result.plan.groups[0].new == []
    new_optimizer.load_state_dict(torch.load(tmp_path / "out.pt", weights_only=True)["optimizer"])
    _check_loaded(new, new_optimizer, before, _identity(new))


def test_rename_a_submodule_adam() -> None:
    old = Tower(trunk="encoder")
    optimizer = torch.optim.Adam(old.parameters(), lr=1e-2, amsgrad=True)
    _train(old, optimizer)
    before = _snapshot(old, optimizer)

    new = Tower(trunk="backbone")
    new_optimizer = torch.optim.Adam(new.parameters(), lr=1e-2, amsgrad=True)
    new_sd, plan = optckpt.remap(
        optimizer.state_dict(),
        to=optckpt.layout_of(new, new_optimizer),
        rename=[r"^encoder\.=backbone."],
        model_state=old.state_dict(),
    )
    old_names = [n for n, _ in old.named_parameters() if n.startswith("encoder.")]
    assert plan.groups[0].renamed == [(n, n.replace("encoder.", "backbone.", 1)) for n in old_names]
    assert plan.groups[0].carried == ["head.weight", "head.bias"]
    assert plan.dropped == [] and plan.groups[0].new == []
    new_optimizer.load_state_dict(new_sd)
    carried = {n.replace("encoder.", "backbone.", 1): n for n in before}
    _check_loaded(new, new_optimizer, before, carried)


def test_rename_rules_apply_in_order_with_groups() -> None:
    old = Tower(trunk="encoder")
    optimizer = torch.optim.SGD(old.named_parameters(), lr=0.1, momentum=0.5)
    _train(old, optimizer)
    before = _snapshot(old, optimizer)
    new = Tower(trunk="trunk")
    new_optimizer = torch.optim.SGD(new.parameters(), lr=0.1, momentum=0.5)
    # encoder.0.weight -> enc.0.weight -> trunk.0.weight, through a regex group
    new_sd, plan = optckpt.remap(
        optimizer.state_dict(),
        to=optckpt.layout_of(new, new_optimizer),
        rename=[r"^encoder\.(\d)=enc.\1", r"^enc\.=trunk."],
    )
    assert plan.names_source == "param_names"
    assert len(plan.groups[0].renamed) == 4
    new_optimizer.load_state_dict(new_sd)
    _check_loaded(
        new, new_optimizer, before, {n.replace("encoder.", "trunk.", 1): n for n in before}
    )


def test_freeze_the_backbone_adamw(tmp_path: Path) -> None:
    old, optimizer, before = _trained(lambda old: torch.optim.AdamW(old.parameters(), lr=1e-2))
    path = _checkpoint(tmp_path, old, optimizer)

    new = Tower()
    new.encoder.requires_grad_(False)
    new_optimizer = torch.optim.AdamW([p for p in new.parameters() if p.requires_grad], lr=1e-2)
    result = remap_checkpoint(path, optckpt.layout_of(new, new_optimizer), tmp_path / "out.pt")
    assert result.plan.groups[0].carried == ["head.weight", "head.bias"]
    assert result.plan.dropped == [n for n, _ in old.named_parameters() if n.startswith("encoder.")]
    new_optimizer.load_state_dict(torch.load(tmp_path / "out.pt", weights_only=True)["optimizer"])
    _check_loaded(
        new, new_optimizer, before, {"head.weight": "head.weight", "head.bias": "head.bias"}
    )


def test_unfreeze_a_backbone_that_was_frozen_when_saved(tmp_path: Path) -> None:
    old = Tower()
    old.encoder.requires_grad_(False)  # the optimizer never held the encoder
    optimizer = torch.optim.Adam([p for p in old.parameters() if p.requires_grad], lr=1e-2)
    _train(old, optimizer)
    before = _snapshot(old, optimizer)
    path = _checkpoint(tmp_path, old, optimizer)

    new = Tower()
    new_optimizer = torch.optim.Adam(new.parameters(), lr=1e-2)
    result = remap_checkpoint(path, optckpt.layout_of(new, new_optimizer), tmp_path / "out.pt")
    assert result.plan.names_source == "recovered"
    assert result.plan.groups[0].carried == ["head.weight", "head.bias"]
    assert result.plan.groups[0].new == [n for n in _identity(new) if n.startswith("encoder.")]
    new_optimizer.load_state_dict(torch.load(tmp_path / "out.pt", weights_only=True)["optimizer"])
    _check_loaded(
        new, new_optimizer, before, {"head.weight": "head.weight", "head.bias": "head.bias"}
    )


def test_split_biases_and_norms_into_a_no_decay_group_with_param_names() -> None:
    _, optimizer, before = _trained(
        lambda old: torch.optim.AdamW(old.named_parameters(), lr=1e-2, weight_decay=0.1)
    )
    old_sd = optimizer.state_dict()
    assert "param_names" in old_sd["param_groups"][0]

    new = Tower()
    new_optimizer = _no_decay_groups(list(new.named_parameters()), torch.optim.AdamW, lr=1e-3)
    layout = optckpt.layout_of(new, new_optimizer)
    # By default both groups keep the trained values of the one source group, and the plan
    # lists the layout's values it did not take.
    kept_sd, kept = optckpt.remap(old_sd, to=layout)
    assert [g.hyperparams_from for g in kept.groups] == ["source group 0", "source group 0"]
    assert [(g["lr"], g["weight_decay"]) for g in kept_sd["param_groups"]] == [(1e-2, 0.1)] * 2
    assert kept.hyperparam_changes == []
    assert [(k.group, k.key, k.kept, k.layout) for k in kept.hyperparams_kept] == [
        (0, "lr", 1e-2, 1e-3),
        (0, "weight_decay", 0.1, 0.05),
        (1, "lr", 1e-2, 1e-3),
        (1, "weight_decay", 0.1, 0.0),
    ]
    # The split's new decay values are asked for with --hyperparams layout.
    new_sd, plan = optckpt.remap(old_sd, to=layout, hyperparams="layout")
    assert plan.names_source == "param_names"
    assert [g.carried for g in plan.groups] == [
        g["param_names"] for g in new_optimizer.param_groups
    ]
    assert [(c.group, c.key, c.old, c.new, c.why) for c in plan.hyperparam_changes] == [
        (0, "lr", 1e-2, 1e-3, "--hyperparams layout"),
        (0, "weight_decay", 0.1, 0.05, "--hyperparams layout"),
        (1, "lr", 1e-2, 1e-3, "--hyperparams layout"),
        (1, "weight_decay", 0.1, 0.0, "--hyperparams layout"),
    ]
    expected_hyper = [
        {k: v for k, v in g.items() if k not in ("params", "param_names")}
        for g in new_optimizer.param_groups
    ]
    new_optimizer.load_state_dict(new_sd)
    for group, hyper in zip(new_optimizer.param_groups, expected_hyper):
        assert {k: group[k] for k in hyper} == hyper  # the layout's lr and weight_decay
    assert [g["weight_decay"] for g in new_optimizer.param_groups] == [0.05, 0.0]
    _check_loaded(new, new_optimizer, before, _identity(new))


def test_reorder_groups_state_follows_names_and_hyperparams_follow_their_source() -> None:
    optimizer, before = _trained_tower()
    old_hyper = {
        name: {k: v for k, v in g.items() if k not in ("params", "param_names")}
        for g in optimizer.param_groups
        for name in g["param_names"]
    }
    old_sd = optimizer.state_dict()

    new = Tower()
    named = list(new.named_parameters())
    new_optimizer = torch.optim.AdamW(
        [
            {"params": [(n, p) for n, p in named if p.dim() <= 1]},
            {"params": [(n, p) for n, p in named if p.dim() > 1]},
        ],
        lr=0.5,  # a layout with no hyperparameters: these must not win
    )
    layout = layout_from_json(
        {
            "params": {n: {"shape": list(p.shape)} for n, p in named},
            "groups": [{"params": g["param_names"]} for g in new_optimizer.param_groups],
        }
    )
    new_sd, plan = optckpt.remap(old_sd, to=layout)
    assert [g.hyperparams_from for g in plan.groups] == ["source group 1", "source group 0"]
    new_optimizer.load_state_dict(new_sd)
    for group in new_optimizer.param_groups:
        for name in group["param_names"]:
            for key, value in old_hyper[name].items():
                assert group[key] == value, (name, key)
    _check_loaded(new, new_optimizer, before, _identity(new))


def test_batchnorm_buffers_and_tied_weights_names_recovered(tmp_path: Path) -> None:
    old = TiedNet()
    optimizer = torch.optim.Adam(old.parameters(), lr=1e-2)
    _train(old, optimizer)
    before = _snapshot(old, optimizer)
    path = _checkpoint(tmp_path, old, optimizer)

    new = TiedNet(extra=True)
    new_optimizer = torch.optim.Adam(new.parameters(), lr=1e-2)
    result = remap_checkpoint(path, optckpt.layout_of(new, new_optimizer), tmp_path / "out.pt")
    assert result.plan.names_source == "recovered"
    assert result.plan.groups[0].carried == [n for n, _ in old.named_parameters()]
    assert result.plan.groups[0].new == ["extra.weight", "extra.bias"]
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert "norm.running_mean" in out["model"]  # buffers stay in the model weights
    new_optimizer.load_state_dict(out["optimizer"])
    _check_loaded(new, new_optimizer, before, _identity(old))


def test_batchnorm_model_alone_is_unique_only_without_its_buffers(tmp_path: Path) -> None:
    # running_mean / running_var have the shape of the norm's weight and bias: counted as
    # parameters, they would make the alignment ambiguous.
    old = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 6))
    optimizer = torch.optim.SGD(old.parameters(), lr=0.1, momentum=0.9)
    _train(old, optimizer)
    before = _snapshot(old, optimizer)
    path = _checkpoint(tmp_path, old, optimizer)
    new = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 6))
    new_optimizer = torch.optim.SGD(new.parameters(), lr=0.1, momentum=0.9)
    result = remap_checkpoint(path, optckpt.layout_of(new, new_optimizer), tmp_path / "out.pt")
    assert result.plan.groups[0].carried == list(_identity(old))
    new_optimizer.load_state_dict(torch.load(tmp_path / "out.pt", weights_only=True)["optimizer"])
    _check_loaded(new, new_optimizer, before, _identity(old))


# --------------------------------------------------------------------------- sources of names


def test_id_only_bare_checkpoint_with_from_layout(tmp_path: Path) -> None:
    old, optimizer, before = _trained(
        lambda old: torch.optim.SGD(old.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    )
    torch.save(optimizer.state_dict(), tmp_path / "bare.pt")
    optckpt.save_layout(old, optimizer, tmp_path / "old.json")

    new = Tower(adapter=True)
    new_optimizer = torch.optim.SGD(new.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    optckpt.save_layout(new, new_optimizer, tmp_path / "new.json")
    with pytest.raises(UsageError, match="pass --from OLD_LAYOUT"):
        remap_checkpoint(tmp_path / "bare.pt", tmp_path / "new.json", tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()
    result = remap_checkpoint(
        tmp_path / "bare.pt",
        tmp_path / "new.json",
        tmp_path / "out.pt",
        source=tmp_path / "old.json",
    )
    assert result.plan.names_source == "layout" and result.key == ""
    new_optimizer.load_state_dict(torch.load(tmp_path / "out.pt", weights_only=True))
    _check_loaded(new, new_optimizer, before, _identity(old))


def test_ambiguous_checkpoint_is_refused_then_works_with_from(tmp_path: Path) -> None:
    old = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    old[0].requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in old.parameters() if p.requires_grad], lr=1e-2)
    _train(old, optimizer)
    before = _snapshot(old, optimizer)
    path = _checkpoint(tmp_path, old, optimizer)
    new = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    new_optimizer = torch.optim.AdamW(new.parameters(), lr=1e-2)
    layout = optckpt.layout_of(new, new_optimizer)
    with pytest.raises(UsageError, match=r"more than one way.*pass --from OLD_LAYOUT"):
        remap_checkpoint(path, layout, tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()
    result = remap_checkpoint(
        path, layout, tmp_path / "out.pt", source=optckpt.layout_of(old, optimizer)
    )
    assert result.plan.groups[0].new == ["0.weight", "0.bias"]
    new_optimizer.load_state_dict(torch.load(tmp_path / "out.pt", weights_only=True)["optimizer"])
    _check_loaded(new, new_optimizer, before, {n: n for n in before})


def test_hugging_face_folder_is_named_from_a_from_layout(tmp_path: Path) -> None:
    # The fixture's model: Sequential(Linear(8,16), LayerNorm(16), ReLU(), Linear(16,4)),
    # AdamW over model.parameters(); the folder's model.safetensors is not used for names
    # (sorted by name, not in the model's order), so the folder alone cannot be named.
    def model() -> nn.Module:
        return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 4))

    old_layout = optckpt.layout_of(model())
    new = nn.Sequential(*model(), nn.Linear(4, 2))
    new_optimizer = torch.optim.AdamW(new.parameters(), lr=5e-5, weight_decay=0.0)
    layout = optckpt.layout_of(new, new_optimizer)
    with pytest.raises(UsageError, match="pass --from"):
        remap_checkpoint(HF_FOLDER, layout)
    with pytest.raises(UsageError, match="pass --from"):
        remap_checkpoint(HF_FOLDER, layout, tmp_path / "folder")
    assert not (tmp_path / "folder").exists()
    with pytest.raises(UsageError, match="pass --from"):
        remap_checkpoint(HF_FOLDER / "optimizer.pt", layout, tmp_path / "out.pt")
    result = remap_checkpoint(
        HF_FOLDER / "optimizer.pt", layout, tmp_path / "out.pt", source=old_layout
    )
    assert result.plan.groups[0].new == ["4.weight", "4.bias"]
    # the folder itself comes out a folder, its optimizer.pt the file remapped alone
    remap_checkpoint(HF_FOLDER, layout, tmp_path / "folder", source=old_layout)
    assert_bitwise_equal(
        torch.load(tmp_path / "folder" / "optimizer.pt", weights_only=True),
        torch.load(tmp_path / "out.pt", weights_only=True),
    )
    saved = torch.load(HF_FOLDER / "optimizer.pt", weights_only=True)
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    new_optimizer.load_state_dict(out)
    for i, name in enumerate(old_layout.names()):  # old IDs are positions in model order
        _assert_bitwise(new_optimizer.state[dict(new.named_parameters())[name]], saved["state"][i])
    _train(new, new_optimizer, steps=1)


def test_a_ddp_prefix_is_stripped_and_the_plan_says_so(tmp_path: Path) -> None:
    wrapped = nn.Module()
    wrapped.module = Tower()  # what DistributedDataParallel's state_dict() looks like
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-2)
    _train(wrapped.module, optimizer)
    before = _snapshot(wrapped, optimizer)
    path = _checkpoint(tmp_path, wrapped, optimizer)
    new = Tower()
    new_optimizer = torch.optim.AdamW(new.parameters(), lr=1e-2)
    layout = optckpt.layout_of(new, new_optimizer)

    result = remap_checkpoint(path, layout, tmp_path / "out.pt")
    plan = result.plan
    assert plan.prefixes_stripped == ["module."] and plan.to_json()["prefixes_stripped"] == [
        "module."
    ]
    assert plan.groups[0].carried == list(_identity(new))  # the target's names
    assert plan.dropped == [] and plan.warnings == []
    new_optimizer.load_state_dict(torch.load(tmp_path / "out.pt", weights_only=True)["optimizer"])
    _check_loaded(new, new_optimizer, before, {n: f"module.{n}" for n in _identity(new)})
    # a --rename that removes the prefix is a rename, and nothing is left to strip
    renamed = remap_checkpoint(path, layout, rename=[r"^module\.="]).plan
    assert len(renamed.groups[0].renamed) == 6 and renamed.prefixes_stripped == []


def test_several_groups_in_any_order_are_named_from_the_model_weights(tmp_path: Path) -> None:
    # The head's group first: each group is in model order, the groups are not; the shapes
    # leave one assignment, so no --from is needed and nothing is assumed about group order.
    old = Tower()
    optimizer = torch.optim.Adam(
        [
            {"params": old.head.parameters(), "lr": 1e-2},
            {"params": old.encoder.parameters(), "lr": 1e-3},
        ]
    )
    _train(old, optimizer)
    before = _snapshot(old, optimizer)
    path = _checkpoint(tmp_path, old, optimizer)
    new = Tower()
    new_optimizer = torch.optim.Adam(
        [{"params": new.head.parameters()}, {"params": new.encoder.parameters()}]
    )
    layout = optckpt.layout_of(new, new_optimizer)
    bare = Layout(layout.params, [{"params": g["params"]} for g in layout.groups])  # no lr
    result = remap_checkpoint(path, bare, tmp_path / "out.pt")
    assert result.plan.names_source == "recovered"
    assert result.plan.warnings == []
    assert result.plan.groups[0].carried == ["head.weight", "head.bias"]
    new_optimizer.load_state_dict(torch.load(tmp_path / "out.pt", weights_only=True)["optimizer"])
    assert [g["lr"] for g in new_optimizer.param_groups] == [1e-2, 1e-3]
    _check_loaded(new, new_optimizer, before, _identity(new))


# --------------------------------------------------------------------------- rules


def test_merged_source_groups_take_the_majoritys_values_and_list_the_changes() -> None:
    optimizer, before = _trained_tower()
    new = Tower()
    # one group, no hyperparameters: everything from the sources, which disagree on decay;
    # 4 of the 6 parameters (biases and norms) come from group 1, whose values win
    layout = layout_from_model_state(new.state_dict())
    new_sd, plan = optckpt.remap(optimizer.state_dict(), to=layout)
    assert plan.warnings == []
    assert [c.to_json() for c in plan.hyperparam_changes] == [
        {
            "group": 0,
            "key": "weight_decay",
            "old": 0.05,
            "new": 0.0,
            "why": "merged groups 0, 1: the 2 parameter(s) from group 0 take group 1's value "
            "(4 parameter(s))",
        }
    ]
    assert plan.groups[0].hyperparams_from == "source group 1 (merged with 0)"
    new_optimizer = torch.optim.AdamW(new.parameters(), lr=0.5)
    new_optimizer.load_state_dict(new_sd)
    assert new_optimizer.param_groups[0]["weight_decay"] == 0.0
    assert new_optimizer.param_groups[0]["lr"] == 1e-2
    _check_loaded(new, new_optimizer, before, _identity(new))


def test_layout_hyperparams_win_when_asked_and_the_rest_come_from_the_source() -> None:
    old = Tower()
    optimizer = torch.optim.Adam(old.parameters(), lr=1e-2, betas=(0.8, 0.9))
    _train(old, optimizer)
    layout = layout_from_model_state(old.state_dict(), ["head:lr=0.001,weight_decay=0.5"])
    kept_sd, kept = optckpt.remap(optimizer.state_dict(), to=layout, model_state=old.state_dict())
    head = kept_sd["param_groups"][1]
    assert (head["lr"], head["weight_decay"], head["betas"]) == (1e-2, 0, (0.8, 0.9))
    assert [(k.group, k.key) for k in kept.hyperparams_kept] == [(1, "lr"), (1, "weight_decay")]
    new_sd, plan = optckpt.remap(
        optimizer.state_dict(), to=layout, model_state=old.state_dict(), hyperparams="layout"
    )
    assert [g.hyperparams_from for g in plan.groups] == ["source group 0", "source group 0"]
    assert [(c.group, c.key, c.old, c.new) for c in plan.hyperparam_changes] == [
        (1, "lr", 1e-2, 0.001),
        (1, "weight_decay", 0, 0.5),
    ]
    head = new_sd["param_groups"][1]
    assert (head["lr"], head["weight_decay"], head["betas"]) == (0.001, 0.5, (0.8, 0.9))
    assert new_sd["param_groups"][0]["lr"] == 1e-2
    assert [g["param_names"] for g in new_sd["param_groups"]] == [
        g["params"] for g in layout.groups
    ]


def test_a_group_of_only_new_parameters_takes_group_0_hyperparams() -> None:
    optimizer, _ = _trained_tower()
    new = Tower(adapter=True)
    layout = layout_from_model_state(new.state_dict(), ["^adapter:"])
    new_sd, plan = optckpt.remap(optimizer.state_dict(), to=layout)
    assert plan.groups[1].new == ["adapter.weight", "adapter.bias"]
    assert plan.groups[1].hyperparams_from.startswith("source group 0 (no parameter")
    assert new_sd["param_groups"][1]["weight_decay"] == 0.05  # the checkpoint's first group's
    assert plan.warnings == []
    assert [(c.group, c.key) for c in plan.hyperparam_changes] == [(0, "weight_decay")]  # merged


def test_shape_change_is_an_error_naming_both_shapes_unless_reset() -> None:
    old = Tower(width=6)
    optimizer = torch.optim.AdamW(old.parameters(), lr=1e-2)
    _train(old, optimizer)
    before = _snapshot(old, optimizer)
    old_sd = copy.deepcopy(optimizer.state_dict())
    new = Tower(width=6)
    new.head = nn.Linear(6, 5)  # 5 classes instead of 3
    new_optimizer = torch.optim.AdamW(new.parameters(), lr=1e-2)
    layout = optckpt.layout_of(new, new_optimizer)
    with pytest.raises(IncompatibleStateError) as info:
        optckpt.remap(old_sd, to=layout, model_state=old.state_dict())
    assert isinstance(info.value, ValueError)  # what torch raises, so torch code catches it
    assert "head.weight: [3, 6] in the checkpoint, [5, 6] in the layout" in str(info.value)
    assert "head.bias: [3] in the checkpoint, [5] in the layout" in str(info.value)
    assert "--reset-mismatched" in str(info.value)

    new_sd, plan = optckpt.remap(
        old_sd, to=layout, model_state=old.state_dict(), reset_mismatched=True
    )
    assert plan.groups[0].reset == ["head.weight", "head.bias"]
    assert plan.dropped == []
    new_optimizer.load_state_dict(new_sd)
    carried = {n: n for n in before if not n.startswith("head.")}
    _check_loaded(new, new_optimizer, before, carried)


def test_float64_target_casts_floating_state_but_not_step() -> None:
    old, optimizer, before = _trained(
        lambda old: torch.optim.AdamW(old.parameters(), lr=1e-2, amsgrad=True)
    )
    new = Tower().double()
    new_optimizer = torch.optim.AdamW(new.parameters(), lr=1e-2, amsgrad=True)
    layout = optckpt.layout_of(new, new_optimizer)
    assert {p.dtype for p in layout.params.values()} == {"float64"}
    new_sd, _ = optckpt.remap(optimizer.state_dict(), to=layout, model_state=old.state_dict())
    for pid, state in new_sd["state"].items():
        name = new_sd["param_groups"][0]["param_names"][pid]
        for key, value in state.items():
            old_value = before[name][key]
            if key == "step":
                assert value.dtype == old_value.dtype == torch.float32
                _assert_bitwise(value, old_value)
            else:
                _assert_bitwise(value, old_value.to(torch.float64))
    expected = {
        name: {k: v if k == "step" else v.double() for k, v in state.items()}
        for name, state in before.items()
    }
    new_optimizer.load_state_dict(new_sd)
    _check_loaded(new, new_optimizer, expected, _identity(new))


def test_two_names_renamed_onto_one_is_refused() -> None:
    old = Tower(adapter=True)
    optimizer = torch.optim.SGD(old.named_parameters(), lr=0.1)
    layout = optckpt.layout_of(Tower())
    with pytest.raises(
        UsageError, match=r"maps both 'adapter\.weight' and 'head\.weight' to 'head\.weight'"
    ):
        optckpt.remap(optimizer.state_dict(), to=layout, rename=[r"^adapter\.=head."])


@pytest.mark.parametrize(
    ("rule", "needle"),
    [("no-equals", "expected 'REGEX=REPLACEMENT'"), ("=x", "expected"), ("(a=b", "bad regex")],
)
def test_bad_rename_rules(rule: str, needle: str) -> None:
    optimizer = torch.optim.SGD(Tower().named_parameters(), lr=0.1)
    with pytest.raises(UsageError, match=needle):
        optckpt.remap(optimizer.state_dict(), to=optckpt.layout_of(Tower()), rename=[rule])


def test_identity_remap_reproduces_the_state_and_leaves_the_input_alone() -> None:
    model = Tower()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, optimizer)
    sd = optimizer.state_dict()
    pristine = copy.deepcopy(sd)
    new_sd, plan = optckpt.remap(
        sd, to=optckpt.layout_of(model, optimizer), model_state=model.state_dict()
    )
    _assert_bitwise(sd, pristine)  # the input is not modified
    assert plan.groups[0].carried == list(_identity(model))
    assert new_sd["state"].keys() == sd["state"].keys()
    for pid in sd["state"]:
        _assert_bitwise(new_sd["state"][pid], sd["state"][pid])
    assert new_sd["param_groups"][0]["param_names"] == list(_identity(model))


def test_state_in_no_group_is_dropped_with_a_warning() -> None:
    model = Tower()
    optimizer = torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9)
    _train(model, optimizer)
    sd = optimizer.state_dict()
    sd["state"][99] = {"momentum_buffer": torch.zeros(2)}
    new_sd, plan = optckpt.remap(sd, to=optckpt.layout_of(model))
    assert 99 not in new_sd["state"]
    assert plan.warnings == ["dropped state under IDs in no param group: 99"]


def test_plan_json_is_plain_data() -> None:
    model = Tower()
    optimizer = torch.optim.Adam(model.named_parameters(), lr=torch.tensor(0.01))
    _train(model, optimizer)
    layout = Layout(
        {**optckpt.layout_of(model).params, "extra": ParamSpec((2,))},
        [{"params": [*_identity(model), "extra"]}],
    )
    _, plan = optckpt.remap(optimizer.state_dict(), to=layout)
    data = json.loads(json.dumps(plan.to_json()))
    assert data["names_source"] == "param_names"
    assert data["groups"][0]["new"] == ["extra"]
    assert data["groups"][0]["hyperparams"]["lr"] == pytest.approx(0.01)
    assert data["groups"][0]["hyperparams"]["betas"] == [0.9, 0.999]


# --------------------------------------------------------------------------- files


def test_remap_checkpoint_writing_rules(tmp_path: Path) -> None:
    model = Tower()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, optimizer)
    path = _checkpoint(tmp_path, model, optimizer)
    original = path.read_bytes()
    layout = optckpt.layout_of(Tower(adapter=True))
    dry = remap_checkpoint(path, layout)
    assert dry.out is None and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
    with pytest.raises(UsageError, match="is the input"):
        remap_checkpoint(path, layout, path)
    (tmp_path / "taken.pt").write_bytes(b"precious")
    with pytest.raises(UsageError, match="--force"):
        remap_checkpoint(path, layout, tmp_path / "taken.pt")
    assert (tmp_path / "taken.pt").read_bytes() == b"precious"
    remap_checkpoint(path, layout, tmp_path / "taken.pt", force=True)
    assert torch.load(tmp_path / "taken.pt", weights_only=True)["epoch"] == 7
    remap_checkpoint(path, layout, tmp_path / "out.safetensors")
    from optckpt.io import load_checkpoint

    back = load_checkpoint(tmp_path / "out.safetensors").root
    assert back["optimizer"]["param_groups"][0]["param_names"] == layout.names()
    assert path.read_bytes() == original
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_failing_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = Tower()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, optimizer)
    path = _checkpoint(tmp_path, model, optimizer)
    (tmp_path / "taken.pt").write_bytes(b"precious")
    real_save = torch.save

    def disk_full(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    layout = optckpt.layout_of(Tower(adapter=True))
    for out in (tmp_path / "new.pt", tmp_path / "taken.pt"):
        with pytest.raises(OSError, match="No space left"):
            remap_checkpoint(path, layout, out, force=True)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "taken.pt"]
    assert (tmp_path / "taken.pt").read_bytes() == b"precious"


def test_several_optimizers_need_a_key(tmp_path: Path) -> None:
    model = Tower()
    optimizers = two_optimizers(model, _train)
    torch.save({"optimizers": optimizers, "model": model.state_dict()}, tmp_path / "two.pt")
    layout = optckpt.layout_of(model)
    with pytest.raises(
        UsageError, match=r"several optimizer state dicts \('optimizers.0', 'optimizers.1'\)"
    ):
        remap_checkpoint(tmp_path / "two.pt", layout, tmp_path / "out.pt")
    result = remap_checkpoint(tmp_path / "two.pt", layout, tmp_path / "out.pt", key="optimizers.1")
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert result.key == "optimizers.1"
    assert out["optimizers"][0]["param_groups"][0].get("momentum") == 0.9  # the other one, kept
    assert "exp_avg" in out["optimizers"][1]["state"][0]
