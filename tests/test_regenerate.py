"""optckpt.regenerate and optckpt.synthetic: seeded runs of the bundled optimizers.

The reference runs here are written with plain ``torch`` and ``torch.optim`` from the recipe
that optckpt.synthetic's docstring and the README document, not with optckpt's code, so they
check both the result and the documentation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from checks import RecordedProgress, assert_bitwise_equal

from optckpt.errors import IncompatibleStateError, UsageError
from optckpt.layout import layout_from_json
from optckpt.optim import names
from optckpt.optim.registry import UnknownOptimizerError
from optckpt.regenerate import Setting, parse_setting, regenerate, regenerate_checkpoint

# Two groups over tensors of 1 to 3 dimensions; only ``lr`` in the groups, which every
# optimizer has.
GENERAL = {
    "params": {
        "enc.weight": {"shape": [5, 3]},
        "enc.bias": {"shape": [5]},
        "conv.weight": {"shape": [2, 3, 4]},
        "head.weight": {"shape": [2, 5]},
    },
    "groups": [
        {"params": ["enc.weight", "conv.weight", "head.weight"], "lr": 0.01},
        {"params": ["enc.bias"], "lr": 0.002},
    ],
}
# Muon takes 2-D parameters only; LBFGS one group only.
MATRICES = {
    "params": {"a.weight": {"shape": [6, 4]}, "b.weight": {"shape": [3, 6]}},
    "groups": [{"params": ["a.weight"], "lr": 0.01}, {"params": ["b.weight"], "lr": 0.005}],
}
ONE_GROUP = {
    "params": {"a.weight": {"shape": [4, 3]}, "a.bias": {"shape": [4]}},
    "groups": [{"params": ["a.weight", "a.bias"], "lr": 0.5}],
}


def layout_for(name: str) -> dict[str, Any]:
    return {"Muon": MATRICES, "LBFGS": ONE_GROUP}.get(name, GENERAL)


def torch_run(
    name: str, layout: dict[str, Any], steps: int, seed: int
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The documented recipe, with torch.optim: seeded parameters, seeded gradients."""
    gen = torch.Generator().manual_seed(seed)
    params = {
        n: torch.randn(
            spec["shape"], generator=gen, dtype=getattr(torch, spec.get("dtype", "float32"))
        )
        for n, spec in layout["params"].items()
    }
    groups = [
        {
            **{k: v for k, v in g.items() if k != "params"},
            "params": [(n, params[n]) for n in g["params"]],
        }
        for g in layout["groups"]
    ]
    optimizer = getattr(torch.optim, name)(groups)
    order = [params[n] for g in layout["groups"] for n in g["params"]]
    grads = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        drawn = [torch.randn(p.shape, generator=grads, dtype=p.dtype) for p in order]
        if name == "LBFGS":

            def closure(drawn: list[torch.Tensor] = drawn) -> torch.Tensor:
                loss = torch.zeros((), dtype=torch.float64)
                for p, t in zip(order, drawn, strict=True):
                    p.grad = p.detach() - t
                    loss += 0.5 * (p.detach() - t).abs().double().pow(2).sum()
                return loss

            optimizer.step(closure)
        else:
            for p, g in zip(order, drawn, strict=True):
                p.grad = g.to_sparse() if name == "SparseAdam" else g
            optimizer.step()
    return params, optimizer.state_dict()


@pytest.mark.parametrize("name", names())
def test_regenerated_state_is_torchs_bit_for_bit(name: str) -> None:
    layout = layout_for(name)
    ours = regenerate(name, layout_from_json(layout), steps=3, seed=7)
    params, state_dict = torch_run(name, layout, steps=3, seed=7)
    assert_bitwise_equal(ours.optimizer, state_dict, name)
    assert_bitwise_equal(ours.model, params, name)
    assert ours.dropped == []


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
def test_layout_dtypes_are_kept_and_match_torch(dtype: str) -> None:
    layout = json.loads(json.dumps(GENERAL))
    for spec in layout["params"].values():
        spec["dtype"] = dtype
    ours = regenerate("adam", layout_from_json(layout), steps=2, seed=1)
    params, state_dict = torch_run("Adam", layout, steps=2, seed=1)
    assert {t.dtype for t in ours.model.values()} == {getattr(torch, dtype)}
    assert_bitwise_equal(ours.optimizer, state_dict)
    assert_bitwise_equal(ours.model, params)


def test_same_arguments_give_the_same_checkpoint_and_another_seed_does_not() -> None:
    layout = layout_from_json(GENERAL)
    a = regenerate("adamw", layout, steps=2, seed=3)
    b = regenerate("adamw", layout, steps=2, seed=3)
    assert_bitwise_equal(a.optimizer, b.optimizer)
    assert_bitwise_equal(a.model, b.model)
    c = regenerate("adamw", layout, steps=2, seed=4)
    assert not torch.equal(a.model["enc.weight"], c.model["enc.weight"])
    assert not torch.equal(a.optimizer["state"][0]["exp_avg"], c.optimizer["state"][0]["exp_avg"])


def test_zero_steps_leave_the_state_empty_and_the_parameters_as_drawn() -> None:
    result = regenerate("adam", layout_from_json(GENERAL), steps=0, seed=2)
    params, state_dict = torch_run("Adam", GENERAL, steps=0, seed=2)
    assert result.optimizer["state"] == {}
    assert_bitwise_equal(result.optimizer, state_dict)
    assert_bitwise_equal(result.model, params)


def test_groups_carry_names_unless_asked_not_to() -> None:
    layout = layout_from_json(GENERAL)
    named = regenerate("sgd", layout, steps=1).optimizer["param_groups"]
    assert [g["param_names"] for g in named] == [g["params"] for g in layout.groups]
    bare = regenerate("sgd", layout, steps=1, names=False).optimizer["param_groups"]
    assert all("param_names" not in g for g in bare)
    assert [g["params"] for g in bare] == [[0, 1, 2], [3]]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("lr=3e-4", Setting(None, "lr", 3e-4)),
        ("betas=0.9,0.95", Setting(None, "betas", (0.9, 0.95))),
        ("betas=[0.9, 0.95]", Setting(None, "betas", (0.9, 0.95))),
        ("betas=(0.9,0.95)", Setting(None, "betas", (0.9, 0.95))),
        ("1.betas= (0.5, 0.75) ", Setting(1, "betas", (0.5, 0.75))),
        ("lr=(0.1)", Setting(None, "lr", 0.1)),
        ("x=(1,2),(3,4)", Setting(None, "x", ("(1", "2)", "(3", "4)"))),  # not one tuple
        ("line_search_fn=strong_wolfe", Setting(None, "line_search_fn", "strong_wolfe")),
        ("weight_decay=0", Setting(None, "weight_decay", 0)),
        ("1.lr=1e-5", Setting(1, "lr", 1e-5)),
        ("amsgrad=true", Setting(None, "amsgrad", True)),
        ("nesterov=True", Setting(None, "nesterov", True)),
        ("foreach=None", Setting(None, "foreach", None)),
        ("0.momentum=0.9", Setting(0, "momentum", 0.9)),
    ],
)
def test_parse_setting(text: str, expected: Setting) -> None:
    assert parse_setting(text) == expected


@pytest.mark.parametrize("text", ["lr", "=1", "1.=3", "a-b=1"])
def test_parse_setting_refuses_malformed_text(text: str) -> None:
    with pytest.raises(UsageError, match="--set"):
        parse_setting(text)


def test_settings_override_every_group_then_one_group() -> None:
    layout = layout_from_json(GENERAL)
    settings = [parse_setting(s) for s in ("lr=3e-4", "betas=0.9,0.95", "1.lr=1e-5")]
    result = regenerate("adamw", layout, steps=1, settings=settings)
    groups = result.optimizer["param_groups"]
    assert [g["lr"] for g in groups] == [3e-4, 1e-5]
    assert [g["betas"] for g in groups] == [(0.9, 0.95), (0.9, 0.95)]
    # the same run in torch.optim, with the same hyperparameters
    reference = json.loads(json.dumps(GENERAL))
    reference["groups"][0].update(lr=3e-4, betas=(0.9, 0.95))
    reference["groups"][1].update(lr=1e-5, betas=(0.9, 0.95))
    _, state_dict = torch_run("AdamW", reference, steps=1, seed=0)
    assert_bitwise_equal(result.optimizer, state_dict)


def test_unknown_setting_and_group_are_usage_errors() -> None:
    layout = layout_from_json(GENERAL)
    with pytest.raises(UsageError, match=r"SGD has no such hyperparameter.*momentum"):
        regenerate("sgd", layout, settings=[parse_setting("betas=0.9,0.99")])
    with pytest.raises(UsageError, match="2 group"):
        regenerate("sgd", layout, settings=[parse_setting("2.lr=1")])


def test_settings_are_validated_by_the_optimizer_as_torch_validates_them() -> None:
    with pytest.raises(ValueError, match="Invalid learning rate") as torch_error:
        torch.optim.Adam([torch.zeros(1)], lr=-1.0)
    with pytest.raises(IncompatibleStateError, match=str(torch_error.value)):
        regenerate("adam", layout_from_json(GENERAL), settings=[parse_setting("lr=-1.0")])


def test_an_optimizer_that_refuses_the_layout_is_incompatible() -> None:
    with pytest.raises(IncompatibleStateError, match="Muon"):
        regenerate("muon", layout_from_json(GENERAL))


def test_unknown_optimizer() -> None:
    with pytest.raises(UnknownOptimizerError, match="did you mean AdamW"):
        regenerate("adamww", layout_from_json(GENERAL))


def test_layout_keys_the_optimizer_lacks_are_dropped_and_listed() -> None:
    layout = json.loads(json.dumps(GENERAL))
    layout["groups"][0].update(weight_decay=0.1, initial_lr=0.01)
    result = regenerate("rprop", layout_from_json(layout), steps=1)
    assert result.dropped == ["weight_decay"]
    assert "weight_decay" not in result.optimizer["param_groups"][0]
    assert "initial_lr" not in result.optimizer["param_groups"][0]


def test_a_model_state_dict_layout_gives_the_starting_values(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    out = tmp_path / "regen.pt"
    result = regenerate_checkpoint("adam", path, out, steps=2, seed=5)
    assert result.params_from == f"model state dict {path}"
    saved = torch.load(out, weights_only=True)
    assert list(saved["model"]) == list(model.state_dict())  # buffers kept
    assert torch.equal(saved["model"]["1.running_mean"], model.state_dict()["1.running_mean"])
    # torch.optim.Adam from the same weights and the documented gradients
    params = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.Adam(list(zip([n for n, _ in model.named_parameters()], params)))
    gen = torch.Generator().manual_seed(6)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        optimizer.step()
    assert_bitwise_equal(saved["optimizer"], optimizer.state_dict())
    for (name, _), p in zip(model.named_parameters(), params, strict=True):
        assert torch.equal(saved["model"][name], p)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_written_checkpoints_load_into_torch_optim(tmp_path: Path, suffix: str) -> None:
    from optckpt.io import load_checkpoint

    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps(GENERAL))
    out = tmp_path / f"regen{suffix}"
    result = regenerate_checkpoint("nadam", layout, out, steps=2, seed=9)
    assert (result.optimizer, result.num_params, result.params_from) == ("NAdam", 4, "seeded")
    saved = load_checkpoint(out).root
    reference_params, reference_state = torch_run("NAdam", GENERAL, steps=2, seed=9)
    assert_bitwise_equal(saved["optimizer"], reference_state)
    assert_bitwise_equal(saved["model"], reference_params)
    # torch.optim loads it
    params = {n: t.clone() for n, t in saved["model"].items()}
    optimizer = torch.optim.NAdam(
        [{"params": [(n, params[n]) for n in g["params"]]} for g in GENERAL["groups"]]
    )
    optimizer.load_state_dict(saved["optimizer"])
    assert_bitwise_equal(optimizer.state_dict(), reference_state)


def test_bare_writes_the_optimizer_state_dict_alone(tmp_path: Path) -> None:
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps(GENERAL))
    out = tmp_path / "bare.pt"
    regenerate_checkpoint("sgd", layout, out, bare=True, settings=["momentum=0.9"])
    saved = torch.load(out, weights_only=True)
    assert set(saved) == {"state", "param_groups"}
    assert saved["param_groups"][0]["momentum"] == 0.9


def test_group_rules_split_a_model_state_dict_layout(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    out = tmp_path / "regen.pt"
    regenerate_checkpoint("adamw", path, out, group_rules=[r"bias$:weight_decay=0"])
    groups = torch.load(out, weights_only=True)["optimizer"]["param_groups"]
    assert [g["param_names"] for g in groups] == [["0.weight", "1.weight"], ["0.bias", "1.bias"]]
    assert [g["weight_decay"] for g in groups] == [0.01, 0]
    with pytest.raises(UsageError, match="--group"):
        regenerate_checkpoint(
            "adamw", tmp_path / "x.json", tmp_path / "y.pt", group_rules=["a:lr=1"]
        )


def test_tied_weights_of_a_model_layout_stay_tied(tmp_path: Path) -> None:
    emb = torch.nn.Embedding(6, 4)
    head = torch.nn.Linear(4, 6, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    out = tmp_path / "regen.pt"
    regenerate_checkpoint("sgd", path, out, steps=1)
    saved = torch.load(out, weights_only=True)
    assert saved["optimizer"]["param_groups"][0]["param_names"] == ["emb.weight"]
    assert torch.equal(saved["model"]["emb.weight"], saved["model"]["head.weight"])
    assert not torch.equal(saved["model"]["emb.weight"], emb.weight.detach())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"shape": [-1, 4]}, "negative dimension"),
        ({"dtype": "float8_e4m3fn"}, "cannot be seeded"),
        ({"dtype": "int64"}, "cannot be seeded"),
    ],
)
def test_layouts_that_cannot_be_seeded_are_usage_errors(change: dict, message: str) -> None:
    layout = json.loads(json.dumps(GENERAL))
    layout["params"]["enc.weight"].update(change)
    with pytest.raises(UsageError, match=message):
        regenerate("adam", layout_from_json(layout))


def test_seeds_are_bounded_by_the_gradient_generator() -> None:
    from optckpt.cli.options import MAX_SEED as CLI_MAX_SEED
    from optckpt.synthetic import MAX_SEED

    assert MAX_SEED == CLI_MAX_SEED == 2**64 - 2
    torch.Generator().manual_seed(MAX_SEED + 1)  # the gradients' seed: the largest torch takes
    with pytest.raises(ValueError, match="Overflow"):
        torch.Generator().manual_seed(MAX_SEED + 2)
    regenerate("sgd", layout_from_json(GENERAL), seed=MAX_SEED)
    with pytest.raises(UsageError, match="--seed"):
        regenerate("sgd", layout_from_json(GENERAL), seed=MAX_SEED + 1)


def test_settings_torch_asserts_on_are_incompatible_not_a_crash() -> None:
    with pytest.raises(IncompatibleStateError, match="capturable"):
        regenerate("adam", layout_from_json(GENERAL), settings=[parse_setting("capturable=true")])


def test_non_finite_settings_parse_as_floats() -> None:
    assert parse_setting("lr=inf").value == float("inf")
    assert parse_setting("eps=nan").value != parse_setting("eps=nan").value  # NaN
    with pytest.raises(IncompatibleStateError, match="Invalid learning rate: nan"):
        regenerate("adam", layout_from_json(GENERAL), settings=[parse_setting("lr=nan")])


def test_an_empty_layout_group_is_kept_named() -> None:
    layout = json.loads(json.dumps(GENERAL))
    layout["groups"].append({"params": [], "lr": 0.5})
    result = regenerate("adam", layout_from_json(layout), steps=1)
    assert result.optimizer["param_groups"][2]["params"] == []
    assert result.optimizer["param_groups"][2]["param_names"] == []


def test_a_dtype_safetensors_cannot_hold_is_refused_before_the_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps({"params": {"w": {"shape": [2], "dtype": "complex128"}}}))

    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the steps ran")

    monkeypatch.setattr("optckpt.regenerate.regenerate", never)
    with pytest.raises(
        UsageError, match=r"cannot store w in safetensors: it has no torch\.complex128"
    ):
        regenerate_checkpoint("adam", layout, tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == [layout]


def test_a_layout_without_parameters_is_a_usage_error() -> None:
    with pytest.raises(ValueError, match="empty parameter list"):
        torch.optim.Adam([])
    with pytest.raises(UsageError, match="the layout has no parameters"):
        regenerate("adam", layout_from_json({"params": {}, "groups": []}))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_writing_reports_its_bytes_to_progress(tmp_path: Path, suffix: str) -> None:
    progress = RecordedProgress()
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps(GENERAL))
    out = tmp_path / f"out{suffix}"
    regenerate_checkpoint("adam", layout, out, steps=2, progress=progress)
    (total,) = progress.started
    assert 0 < total <= sum(progress.written) <= out.stat().st_size
