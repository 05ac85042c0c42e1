"""optckpt.hf_names without a Trainer run: :func:`from_model` on real torch optimizers, and the
refusals of :func:`config_model` that come before transformers is imported.

The Trainer's own folders, its real groups and a model built from a real ``config.json`` are
in ``tests/real/test_names_training_real.py``. Here the model's parameters and its groups come
from a torch module's ``named_parameters()``, split as ``Trainer.create_optimizer`` splits them
(decay: weights of the Linear layers), and the optimizers are real ``torch.optim.AdamW``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from optckpt.hf_names import ModelParams, NoNames, config_model, from_model


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4)
    )


def _decay(name: str) -> bool:
    return name.endswith("weight") and name.split(".")[0] in {"0", "2", "4"}


def _params(model: nn.Module) -> ModelParams:
    params = tuple((n, tuple(p.shape)) for n, p in model.named_parameters())
    groups = (
        tuple(n for n, _ in params if _decay(n)),
        tuple(n for n, _ in params if not _decay(n)),
    )
    return ModelParams(params, groups, "config.json")


def _stepped(model: nn.Module, groups: list[list[str]]) -> dict[str, Any]:
    """A real AdamW over ``groups`` of the model's parameters, stepped once."""
    by_name = dict(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": [by_name[n] for n in g], "weight_decay": 0.1 * (i == 0)}
            for i, g in enumerate(groups)
        ]
    )
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    return optimizer.state_dict()


def _in_id_order(names: dict[Any, str], sd: dict[str, Any]) -> list[str]:
    return [names[pid] for g in sd["param_groups"] for pid in g["params"]]


def test_the_trainers_groups_with_frozen_parameters() -> None:
    model = _model()
    model[0].weight.requires_grad_(False)  # left out of both groups, as Trainer leaves it
    live = [n for n, p in model.named_parameters() if p.requires_grad]
    groups = [[n for n in live if _decay(n)], [n for n in live if not _decay(n)]]
    sd = _stepped(model, groups)
    names, how = from_model(sd, _params(model))
    assert _in_id_order(names, sd) == groups[0] + groups[1]
    assert "weight-decay groups" in how


def test_other_groups_are_aligned_in_model_order() -> None:
    model = _model()
    every = [n for n, _ in model.named_parameters()]
    sd = _stepped(model, [every])  # one group: not the Trainer's split
    names, how = from_model(sd, _params(model))
    assert _in_id_order(names, sd) == every
    assert "aligned by shape" in how


def test_a_state_that_fits_no_way_or_two_ways_gets_no_names() -> None:
    model = _model()
    other = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
    sd = _stepped(other, [[n for n, _ in other.named_parameters()]])
    with pytest.raises(NoNames, match="do not fit the 10 parameters of the model built from"):
        from_model(sd, _params(model))
    # Two LayerNorms of one shape, one trained: which one is not decided by shapes.
    sd = _stepped(model, [["1.weight", "1.bias"]])
    with pytest.raises(NoNames, match=r"more than one way: ID 0 could be 0\.bias or 3\.weight"):
        from_model(sd, _params(model))


def test_configs_refused_before_transformers_is_asked(tmp_path: Path) -> None:
    assert config_model(tmp_path, 6) == (None, None)  # no config.json: nothing to say
    (tmp_path / "config.json").write_text("{not json")
    assert "cannot read it" in (config_model(tmp_path, 6)[1] or "")
    marker = tmp_path / "ran"
    (tmp_path / "custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "custom", "auto_map": {"AutoModel": "custom.Model"}})
    )
    model, note = config_model(tmp_path, 6)
    assert model is None and "auto_map" in (note or "") and not marker.exists()
